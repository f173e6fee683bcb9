"""The runner: phases in order under one governor, with a journal and per-phase checkpoints.

``run()`` = discovery (with the baseline submission) → features → search →
distillation → segmentation → packaging. The phases share :class:`RunContext`
(services) and :class:`RunState` (their only hand-off); each checkpoints its own
state and is kept on resume while its signature holds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .. import _faults
from ..config import RunConfig, load_config
from .context import RunContext
from .kernels import BEFORE_KERNELS, KernelCompilation
from .phases import DiscoveryPhase, DistillationPhase, FeaturesPhase, PackagingPhase, Phase, RunResult, SearchPhase, SegmentationPhase, model_digest
from .state import RunState

__all__ = ["RunContext", "RunResult", "RunState", "default_output", "model_digest", "phases", "run"]


def default_output() -> Path:
    """``/kaggle/working`` on Kaggle, ``./nx46vx-output`` elsewhere."""
    kaggle = Path("/kaggle/working")
    return kaggle if kaggle.is_dir() else Path("nx46vx-output")


def phases() -> list[Phase]:
    """The phases of a run, in order."""
    return [DiscoveryPhase(), FeaturesPhase(), SearchPhase(), DistillationPhase(), SegmentationPhase(), PackagingPhase()]


def run(
    input_roots: Iterable[str | os.PathLike[str]] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
    resume: str = "auto",
    config: RunConfig | None = None,
    clock: Callable[[], float] | None = None,
) -> RunResult:
    """Run the whole pipeline and return where everything is.

    Parameters
    ----------
    input_roots : paths, optional
        Folders to search for the competition data and for previous runs'
        checkpoints and caches (default: every folder under ``/kaggle/input``).
    output : path, optional
        Output folder (default ``/kaggle/working`` on Kaggle, ``./nx46vx-output`` elsewhere).
    profile, config_file, overrides
        See :func:`nx46vx.config.load_config`; ignored when ``config`` is given.
    resume : ``auto`` | ``never`` | path
        ``auto`` resumes the newest usable checkpoint found in the output folder or
        any input root; a path names a checkpoint, run folder or ``results.zip``.
    clock : callable, optional
        The governor's monotonic clock (default ``time.monotonic``; tests pass a
        :class:`~nx46vx.governor.VirtualClock`).

    Returns
    -------
    RunResult
    """
    config = config or load_config(profile, config_file=config_file, overrides=overrides)
    ctx = RunContext(
        config,
        output=Path(output) if output is not None else default_output(),
        input_roots=[Path(p) for p in input_roots] if input_roots is not None else None,
        resume=resume,
        phases=phases(),
        clock=clock or _faults.virtual_clock() or time.monotonic,
    )
    state = RunState()
    with ctx.session(state):
        kernels = ctx.kernels = KernelCompilation.start()
        try:
            for phase in ctx.phases:
                if phase.name not in BEFORE_KERNELS:
                    ctx.kernels_ready(phase.name)
                phase.run(ctx, state)
        finally:
            kernels.stop()
    return ctx.phases[-1].result
