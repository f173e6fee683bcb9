"""Progress where users look: ``roadmap_realtime.json``, ``GLOBAL_PROGRESS_REALTIME``, ``GLOBAL_STATS.json`` and log lines."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import orjson

from .. import reports
from ..atomic import write_json_atomic
from ..progress import train_progress
from ..telemetry import health

if TYPE_CHECKING:
    from .context import RunContext
    from .state import RunState

log = logging.getLogger("nx46vx")

LOG_EVERY_S = 30.0
ZERO_CURSOR = {"epoch": 0, "candidate": 0, "iter": 0}


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


class Reporter:
    """Reports of one run; :meth:`report` is cheap to call from every loop (it rate-limits itself)."""

    def __init__(self, ctx: "RunContext") -> None:
        self.ctx = ctx
        self.state: "RunState | None" = None
        self.stats: dict[str, Any] = {"files_processed": 0, "slices_processed": 0, "voxels_processed": 0, "volumes": {}}
        self.session_iters_start = 0
        self._last_report = float("-inf")
        self._last_log = float("-inf")
        self._reports = 0
        self._shown = 0.0

    def cursor(self) -> dict[str, int]:
        """The search's ``(epoch, candidate, iter)`` cursor: live, else as resumed, else zeros."""
        search = self.state.search if self.state is not None else None
        if search is not None:
            return search.cursor()
        saved = next((p.state_dict() for p in self.ctx.phases if p.name == "search"), None)
        if not saved:
            return dict(ZERO_CURSOR)
        fista = saved.get("fista")
        return {"epoch": int(saved["epoch"]), "candidate": int(saved["batch_start"]), "iter": int(fista["iter"]) if fista else 0}

    def count_volume(self, shape: Sequence[int]) -> None:
        """A volume was decoded (for ``GLOBAL_STATS.json``)."""
        self.stats["files_processed"] += 1
        self.stats["slices_processed"] += int(shape[0])
        self.stats["voxels_processed"] += int(np.prod(shape))

    def session_iterations(self) -> int:
        search = self.state.search if self.state is not None else None
        return (search.candidate_iterations - self.session_iters_start) if search is not None else 0

    def report(self, *, force: bool = False) -> None:
        """``GLOBAL_PROGRESS_REALTIME`` + ``roadmap_realtime.json`` every ``progress.interval_s`` and when forced; a log line every 30 s."""
        ctx = self.ctx
        governor, progress = ctx.governor, ctx.progress
        now = governor.elapsed()
        if not force and now - self._last_report < ctx.config.progress.interval_s:
            return
        self._last_report = now
        self._reports += 1
        search = self.state.search if self.state is not None else None
        if search is not None:
            progress.set("search", train_progress(search.epoch, search.progress(), ctx.config.search.max_epochs, done=search.done))
        computed = progress.global_progress()
        remaining = progress.remaining_estimate(sum(governor.cumulative_seconds().values()))
        roadmap = {
            "global_progress_percent": round(100.0 * computed, 6),
            "train_progress_percent": round(100.0 * progress.fractions["search"], 6),
            "phase": governor.state()["phase"],
            "phase_percent": {p: round(100.0 * f, 6) for p, f in progress.fractions.items()},
            "weights": progress.weights,
            "cursor": self.cursor(),
            "remaining_estimate_s": None if remaining is None else round(remaining, 3),
            "elapsed_s": round(now, 3),
            "run_id": ctx.run_id,
        }
        path = ctx.output / "roadmap_realtime.json"
        write_json_atomic(path, roadmap)
        phase = roadmap["phase"] or "run"
        ctx.event("GLOBAL_PROGRESS_REALTIME", phase, roadmap)
        shown = orjson.loads(path.read_bytes())["global_progress_percent"]
        if shown != roadmap["global_progress_percent"] or shown + 1e-9 < self._shown:
            ctx.event("PROGRESS_INTEGRITY_ALERT", phase, {"shown_percent": shown, "computed_percent": roadmap["global_progress_percent"], "previous_shown_percent": self._shown})
        self._shown = shown
        if self._reports % ctx.config.progress.health_every == 0:
            ctx.event("HEALTH", phase, health())
        if now - self._last_log >= LOG_EVERY_S or force:
            self._last_log = now
            c = roadmap["cursor"]
            log.info("%s %.1f %% | cursor epoch %d cand %d iter %d | ETA %s", phase, roadmap["global_progress_percent"], c["epoch"], c["candidate"], c["iter"], _eta(remaining))

    def write_global_stats(self, phase: str) -> None:
        """``GLOBAL_STATS.json``, rewritten at every phase end so a killed run still has it."""
        ctx = self.ctx
        search = self.state.search if self.state is not None else None
        stats = reports.global_stats(
            dict(self.stats, phase=phase),
            search.epoch_results if search else [],
            search_s=ctx.governor.phase_seconds().get("search", 0.0),
            candidate_iterations=self.session_iterations(),
            samples=2 * ctx.config.search.samples_per_class,
        )
        write_json_atomic(ctx.output / "GLOBAL_STATS.json", stats)
