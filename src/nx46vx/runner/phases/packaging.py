"""Phase 7: the final submission, the reports, the journal's last root and ``results.zip``."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import checkpoint as ckpt
from ... import distill, reports
from ...atomic import write_json_atomic
from ...config import RunConfig
from ...package import write_results_zip
from ...search import CandidateSearch
from ...segment import BASELINE
from ..masks import publish_submission
from ..quota import folder_bytes

if TYPE_CHECKING:
    from ..context import RunContext
    from ..state import RunState

log = logging.getLogger("nx46vx")

#: What ``results.zip`` holds besides the newest checkpoint (the one a resume needs; the kept older ones stay in the folder only).
RESULT_FILES = ["journal.jsonl", "postmortem.json", "RUN_PROFILE_SUMMARY.json", "GLOBAL_STATS.json", "roadmap_realtime.json", "previews", "submission.zip"]
#: Bytes per second assumed for ``results.zip`` before this session measured its checkpoint writes (a slow disk's rate).
ZIP_BYTES_PER_S_PRIOR = 50e6


@dataclass
class RunResult:
    """What a run produced.

    ``status``: ``complete``, ``stopped_by_deadline`` (a time limit cut a training
    phase: the next session continues it) or ``stopped_by_signal``.
    ``model_digest``: SHA-256 over the final model parameters (every candidate's
    ``(w, α, β, b)``, the standardiser and the student), equal for an
    interrupted-and-resumed run and an uninterrupted one.
    """

    status: str
    stop_reason: str | None
    output_dir: Path
    submission: Path
    journal: Path
    run_id: str
    cursor: dict[str, int]
    model_digest: str
    segmenter: str
    validation_scores: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("output_dir", "submission", "journal"):
            out[key] = str(out[key])
        return out


def model_digest(search: CandidateSearch | None, student: distill.DistillState | None = None) -> str:
    """SHA-256 over every candidate's parameters, the standardiser and the student's weights (what exists)."""
    h = hashlib.sha256()
    if search is not None:
        h.update(search.theta.numpy().tobytes())
        if search.standardiser is not None:
            h.update(search.standardiser.mean.tobytes())
            h.update(search.standardiser.std.tobytes())
    if student is not None:
        h.update(distill.student_digest(student))
    return h.hexdigest()


class PackagingPhase:
    """Submission, reports, ``results.zip``. No state worth keeping: it is cheap and always redone."""

    name = "packaging"

    def __init__(self) -> None:
        self.done = False
        self.result: RunResult | None = None

    def signature(self, config: RunConfig) -> dict[str, Any]:
        return {}

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        return None

    def run(self, ctx: "RunContext", state: "RunState") -> None:
        with ctx.phase(self.name) as end:
            if state.segmenter != BASELINE:  # the baseline's submission is already in place
                state.submission = publish_submission(ctx, state.masks, state.shapes, segmenter=state.segmenter, phase=self.name)
            if state.search is not None and state.search.history:
                reports.write_curve(ctx.output / "previews" / "training_curve.png", [h["best_objective"] for h in state.search.history])
            self.result = self._result(ctx, state)
            end.update(submission=str(state.submission))
        self._finish(ctx, state, self.result)
        self.done = True

    def _result(self, ctx: "RunContext", state: "RunState") -> RunResult:
        stop = ctx.governor.stop_reason or ("deadline" if state.unfinished else None)
        return RunResult(
            status={"deadline": "stopped_by_deadline", "signal": "stopped_by_signal", None: "complete"}[stop],
            stop_reason=stop,
            output_dir=ctx.output,
            submission=state.submission,
            journal=ctx.output / "journal.jsonl",
            run_id=ctx.run_id,
            cursor=ctx.reporter.cursor(),
            model_digest=model_digest(state.search, state.student),
            segmenter=state.segmenter,
            validation_scores=state.validation_scores,
            resumed_from=state.resumed_from,
            wall_s=time.monotonic() - ctx.wall_start,
        )

    def _finish(self, ctx: "RunContext", state: "RunState", result: RunResult) -> None:
        """Post-mortem, profile, optional publication, the last Merkle root, ``RUN_END`` and ``results.zip``."""
        journal = ctx.journal
        phase_seconds = ctx.governor.phase_seconds()
        latest = ckpt.list_checkpoints(ctx.output / "checkpoints")
        write_json_atomic(ctx.output / "postmortem.json", reports.postmortem(
            dict(result.to_dict(), cumulative_phase_seconds=ctx.governor.cumulative_seconds(), unfinished=state.unfinished),
            phase_fractions=ctx.progress.fractions, phase_seconds=phase_seconds, latest_checkpoint=str(latest[-1]) if latest else None,
        ))
        profile = reports.profile_summary(
            wall_s=result.wall_s, phase_seconds=phase_seconds, journal_s=journal.write_seconds, io_s=ctx.io_seconds, journal_events=journal.events,
            candidate_iterations=ctx.reporter.session_iterations(), search_s=phase_seconds.get("search", 0.0), resumed_rate=ctx.checkpointer.resumed_rate,
        )
        write_json_atomic(ctx.output / "RUN_PROFILE_SUMMARY.json", profile)
        journal.record("RUN_PROFILE_SUMMARY", self.name, profile)
        publish(ctx)
        members = results_zip_plan(ctx)
        journal.merkle_root(self.name)
        journal.record("RUN_END", "run", {"status": result.status, "stop_reason": result.stop_reason, "model_digest": result.model_digest, "cursor": result.cursor, "wall_s": round(result.wall_s, 3)})
        journal.close()
        if members is not None:
            write_results_zip(ctx.output / "results.zip", ctx.output, members)


def results_zip_plan(ctx: "RunContext") -> list[str] | None:
    """The members of ``results.zip`` — :data:`RESULT_FILES` and the newest committed checkpoint — or None when it does not fit.

    It must fit the time left (its bytes at the measured checkpoint write rate ×
    ``reserve_safety``) and the output quota (it is a copy: the folder holds every
    file already). The decision is journaled (``RESULTS_ZIP``); a skipped archive's
    stale predecessor is removed, so a ``results.zip`` never holds an older run state
    than the folder beside it.
    """
    output, checkpointer = ctx.output, ctx.checkpointer
    newest = checkpointer.last or ckpt.latest_committed(output / "checkpoints")  # written and hashed in this session, or found
    members = [m for m in RESULT_FILES if (output / m).exists()] + ([f"checkpoints/{newest.name}"] if newest is not None else [])
    nbytes = sum(folder_bytes(output / m) if (output / m).is_dir() else (output / m).stat().st_size for m in members)
    archive = output / "results.zip"
    previous = archive.stat().st_size if archive.is_file() else 0
    seconds = nbytes / (checkpointer.write_rate() or ZIP_BYTES_PER_S_PRIOR) * ctx.config.budget.reserve_safety
    time_left = ctx.governor.remaining()
    reason = None
    if seconds > time_left:
        reason = "time"
    elif not ctx.quota.allow(nbytes - previous):
        reason = "output quota"
    if reason is not None:
        archive.unlink(missing_ok=True)
        log.warning("results.zip is not written (%s): %d bytes, %.1f s predicted; the output folder holds every file", reason, nbytes, seconds)
    ctx.event("RESULTS_ZIP", "packaging", {"written": reason is None, "reason": reason, "bytes": nbytes, "checkpoint": newest.name if newest else None,
                                           "predicted_s": round(seconds, 3), "time_left_s": None if time_left == float("inf") else round(time_left, 3)})
    return members if reason is None else None


def publish(ctx: "RunContext") -> None:
    """Upload the latest committed checkpoint as a Kaggle Model when configured; journal why not otherwise."""
    handle = ctx.config.publish.model_handle
    reason, latest = None, None
    if not handle:
        reason = "publish.model_handle is not set"
    elif ctx.config.profile == "kaggle-submit":
        reason = "never under kaggle-submit"
    elif (latest := ckpt.latest_committed(ctx.output / "checkpoints")) is None:  # hashes every kept checkpoint: only when uploading
        reason = "no committed checkpoint"
    else:
        try:
            import kagglehub
        except ImportError:
            reason = "kagglehub is not importable"
    if reason is not None:
        ctx.event("PUBLISH_SKIPPED", "packaging", {"reason": reason, "model_handle": handle})
        return
    try:
        kagglehub.model_upload(handle, str(latest), version_notes=ctx.config.publish.version_notes)
    except Exception as exc:  # an upload failure must never cost the submission
        ctx.event("PUBLISH_SKIPPED", "packaging", {"reason": f"upload failed: {type(exc).__name__}: {exc}", "model_handle": handle})
        return
    ctx.event("PUBLISH_OK", "packaging", {"model_handle": handle, "checkpoint": str(latest)})
