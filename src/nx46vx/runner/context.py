"""``RunContext``: the services every phase uses — journal, governor, progress, checkpointer, reports.

``with ctx.phase(name):`` opens a phase (``PHASE_START``, its budget, a log line)
and closes it (``PHASE_END`` with its seconds, ``GLOBAL_STATS.json``, a progress
report, ``HEALTH``, a journal sync), whatever happens inside.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..config import RunConfig
from ..errors import OutputNotWritableError
from ..features import resolve_device
from ..governor import TRAINING_PHASES, Governor
from ..journal import ChainLink, Journal
from ..progress import Progress
from ..telemetry import boot_info, health
from .checkpointer import Checkpointer
from .quota import OutputQuota
from .reporter import Reporter

if TYPE_CHECKING:
    from .phases.base import Phase
    from .state import RunState

log = logging.getLogger("nx46vx")

MIN_FREE_BYTES = 64 << 20


def check_output_writable(output: Path) -> None:
    """Fail before any work when the output folder cannot hold the run's files."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".nx46vx-probe-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        raise OutputNotWritableError("output folder is not writable", path=output, expected="a writable folder", found=str(exc)) from None
    free = shutil.disk_usage(output).free
    if free < MIN_FREE_BYTES:
        raise OutputNotWritableError(
            "output folder is nearly full", path=output, expected=f">= {MIN_FREE_BYTES >> 20} MiB free", found=f"{free >> 20} MiB free"
        )


def install_log_handler() -> logging.Handler | None:
    """Give the ``nx46vx`` logger a stderr handler at INFO when nothing would show its lines.

    Progress bars hide themselves off a terminal (a notebook's batch log, a redirected
    run), so the runner's concise log lines are what a user sees there.
    """
    if log.handlers or logging.getLogger().handlers:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nx46vx %(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


class RunContext:
    """Services of one ``run()`` call; phases reach everything outside :class:`RunState` through it.

    Parameters
    ----------
    config : RunConfig
    output : Path
        The output folder.
    input_roots : sequence of Path or None
        Folders to search for data and previous runs (None: every folder under ``/kaggle/input``).
    resume : str
        ``auto``, ``never`` or a path.
    phases : sequence of Phase
        The phases of this run, in order (the checkpointer saves and restores each).
    clock : callable
        Monotonic clock of the governor (a :class:`~nx46vx.governor.VirtualClock` in tests).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        output: Path,
        input_roots: Sequence[Path] | None,
        resume: str,
        phases: Sequence["Phase"],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.output = output
        self.input_roots = input_roots
        self.resume = resume
        self.phases = list(phases)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.wall_start = time.monotonic()
        self.governor = Governor(config.budget, n_test=0, clock=clock)
        self.progress = Progress()
        self.device = resolve_device(config.search.device)
        self.distill_device = resolve_device(config.distill.device)
        self.journal: Journal | None = None
        self._pending: list[tuple[str, str, dict[str, Any]]] = []
        self.previous_journal: Path | None = None
        self.io_seconds = 0.0
        self.quota = OutputQuota(output, config.output.quota_gb)
        self.reporter = Reporter(self)
        self.checkpointer = Checkpointer(self)
        self._handler = install_log_handler()

    @contextlib.contextmanager
    def session(self, state: "RunState") -> Iterator[None]:
        """The run's frame: output checked before any work, signals turned into a graceful stop, everything released at the end."""
        check_output_writable(self.output)
        self.reporter.state = state
        self.governor.install_signal_handlers()
        try:
            self.set_aside_previous_journal()
            yield
        finally:
            self.governor.restore_signal_handlers()
            self.close()

    # ------------------------------------------------------------------ journal

    def event(self, event: str, phase: str, data: dict[str, Any] | None = None) -> None:
        """Journal an event (held until the journal opens, right after discovery)."""
        if self.journal is None:
            self._pending.append((event, phase, data or {}))
        else:
            self.journal.record(event, phase, data or {})

    def set_aside_previous_journal(self) -> None:
        """Move an earlier run's ``journal.jsonl`` in this folder to ``journals/`` (the new one continues its chain)."""
        previous = self.output / "journal.jsonl"
        if previous.exists():
            journals = self.output / "journals"
            journals.mkdir(exist_ok=True)
            target = journals / f"journal-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.jsonl"
            os.replace(previous, target)
            self.previous_journal = target

    def open_journal(self, link: ChainLink, run_start: dict[str, Any]) -> None:
        """Open ``journal.jsonl`` continuing ``link``; write ``RUN_START``, ``BOOT`` and what was held."""
        self.journal = Journal(self.output / "journal.jsonl", run_id=self.run_id, link=link)
        self.journal.record("RUN_START", "run", run_start)
        self.journal.record("BOOT", "run", boot_info())
        for event, phase, data in self._pending:
            self.journal.record(event, phase, data)
        self._pending.clear()

    def admit_cache(self, path: Path, nbytes: int, phase: str) -> bool:
        """Whether a cache file of ``nbytes`` may be written under the output quota; a refusal is journaled (``OUTPUT_QUOTA``).

        Main thread only (the journal is not thread-safe): background loaders ask ``quota.allow`` directly.
        """
        if self.quota.allow(nbytes):
            return True
        self.event("OUTPUT_QUOTA", phase, {"refused": str(path), "bytes": int(nbytes), "used_bytes": self.quota.used, "quota_bytes": self.quota.limit})
        return False

    # ------------------------------------------------------------------ phases

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        """Time, journal and report one phase; the yielded dict becomes ``PHASE_END``'s data."""
        self.governor.enter(name)
        self.event("PHASE_START", name, {"phase": name})
        self._phase_budget(name)
        self.reporter.report(force=True)
        log.info("phase %s started (%.1f %% done)", name, 100.0 * self.progress.global_progress())
        end: dict[str, Any] = {}
        yield end
        self.governor.leave()
        if name not in TRAINING_PHASES[1:]:  # training progress comes from the cursors
            self.progress.set(name, 1.0)
        seconds = round(self.governor.phase_elapsed.get(name, 0.0), 6)
        self.event("PHASE_END", name, dict(end, seconds=seconds))
        self.reporter.write_global_stats(name)
        self.reporter.report(force=True)
        self.event("HEALTH", name, health())
        if self.journal is not None:
            self.journal.sync()
        log.info("phase %s done in %.1f s", name, seconds)

    def _phase_budget(self, name: str) -> None:
        """``TIME_BUDGET_STATE`` with this phase's share of the budget and its deadline."""
        state = self.governor.state()
        deadline = self.governor.phase_deadline(name)
        state.update(phase_share=self.governor.share(name) if name in TRAINING_PHASES else None,
                     phase_deadline_s=None if deadline == float("inf") else round(deadline, 3))
        self.event("TIME_BUDGET_STATE", name, state)

    def close(self) -> None:
        """Release the journal and the log handler this run installed."""
        if self.journal is not None:
            self.journal.close()
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler = None
