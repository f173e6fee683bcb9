"""The student's cost model (steps, validations, inference) and its budgeted learning-rate schedule (laid out after the
warm-up, revised once, extended when the reserve shrinks, refitted when a deadline stop was premature, each decision
journaled and stored).

Pure arithmetic on measured seconds, apart from :func:`lay_out_schedule`, which asks
the caller to measure one validation and one checkpoint and journals the decision,
:func:`revise_schedule`, :func:`extend_schedule` and :func:`refit_schedule`, which journal theirs, and
:func:`seconds_per_window`, which times the student's network.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .. import distill
from ..segment import compute_dtype, sliding_window, window_count, window_stride, windows_per_pass

if TYPE_CHECKING:
    from ..governor import Governor
    from .context import RunContext
    from .state import RunState

#: The most of the student's training time its in-training validations may take (they are spaced to fit).
VALIDATION_SHARE = 0.15
#: The share of the distillation time left after the warm-up that the schedule leaves unplanned (step-time noise).
SCHEDULE_SPARE = 0.03
#: The least an extension adds, as a share of the schedule: a few steps are not worth raising the learning rate again.
EXTEND_MIN_SHARE = 0.02


@dataclasses.dataclass
class StepCosts:
    """Measured seconds of a session's steps and of what follows them, for the schedule and the deadline check.

    A validation or a checkpoint costs far more than a step (a GPU student's
    checkpoint is ~1 GB): the check before a step adds a checkpoint (the pre-timeout
    flush writes one in any case), a validation (the weights trained last are
    scored before any stop) and the closing work to the step itself, instead of their average.
    """

    started: float
    steps: int = 0
    extra: float = 0.0  # validation and checkpoint seconds since ``started``
    validation: float = 0.0
    checkpoint: float = 0.0
    closing: float = 0.0  # what runs after the last step besides its validation and checkpoint: the agreement probe
    durations: list[float] = dataclasses.field(default_factory=list)  # each step's seconds, its batch included
    laid_out: int | None = None  # the steps of this session timed before it laid the schedule out (None: no revision due)
    budgeted: bool = False  # this session laid the schedule out on its budget (a restored or fixed schedule is kept)

    def step_s(self, now: float) -> float:
        return (now - self.started - self.extra) / self.steps if self.steps else 0.0

    def typical_step_s(self, now: float) -> float:
        """The median step (the first steps are slower while the prefetch queue fills): what the schedule plans with."""
        return float(np.median(self.durations)) if self.durations else self.step_s(now)


def steps_that_fit(seconds: float, *, done: int, step_s: float, every: Sequence[tuple[int, float, int]]) -> int:
    """The most steps after step ``done`` that fit in ``seconds``, with the work every ``n`` steps counted from step ``origin``
    (``(n, its seconds, origin)``, ``origin`` ≤ ``done``) that they pass.

    The work after the last step is the caller's (it runs however the steps fall).
    """

    def cost(n: int) -> float:
        return n * step_s + sum(work * ((done + n - 1 - origin) // k - (done - origin) // k) for k, work, origin in every if k > 0)

    n = max(0, int(seconds / step_s))  # an upper bound: the periodic work only adds
    while n > 0 and cost(n) > seconds:
        n -= 1
    return n


def lay_out_schedule(ctx: "RunContext", phase: str, student: distill.DistillState, cfg: Any, costs: StepCosts, *,
                     measure: Callable[[], None]) -> None:
    """Lay the learning-rate schedule out over the steps the budget grants: journaled, stored, revised once.

    After the warm-up, the measured seconds per step and per checkpoint
    (``measure()`` writes one now, adding its seconds to ``costs``) and the seconds
    per validation (``costs.validation``: priced before the first step, or measured
    since) give the steps that fit the phase's time left (:func:`_plan`). The first
    steps can be slower than the rest while the prefetch queue and the volume cache
    fill, so ``distill.warmup_steps`` steps later :func:`revise_schedule` lays it out
    again once on their median.
    """
    governor = ctx.governor
    if cfg.steps > 0 or governor.remaining() == float("inf"):
        student.schedule_steps = cfg.steps or cfg.max_steps
        ctx.event("DISTILLATION_SCHEDULE", phase, {"schedule_steps": student.schedule_steps, "reason": "distill.steps" if cfg.steps else "distill.max_steps (no budget)"})
        return
    if student.step < cfg.warmup_steps or costs.steps < 2:
        return
    step_s = costs.typical_step_s(governor.clock())
    measure()
    _plan(ctx, phase, student, cfg, costs, step_s=step_s, reason="budget")
    costs.laid_out, costs.budgeted = len(costs.durations), True


def revise_schedule(ctx: "RunContext", phase: str, student: distill.DistillState, cfg: Any, costs: StepCosts) -> bool:
    """Lay the schedule out again on the median of the steps since :func:`lay_out_schedule`, once, when ``distill.warmup_steps``
    of them are timed; True when it did (the caller stores the decision: a checkpoint).

    A demo run laid its schedule out on 0.52 s per warm-up step, then stepped at 0.41 s and
    ended its training 21 s before the deadline; a schedule planned too long stops early with
    its learning rate still high. A resumed session keeps the schedule it restored.
    """
    if costs.laid_out is None or len(costs.durations) - costs.laid_out < cfg.warmup_steps:
        return False
    step_s = float(np.median(costs.durations[costs.laid_out:]))
    costs.laid_out = None
    _plan(ctx, phase, student, cfg, costs, step_s=step_s, reason="revised")
    return True


def extend_schedule(ctx: "RunContext", phase: str, student: distill.DistillState, cfg: Any, costs: StepCosts) -> bool:
    """After a validation, lay the schedule out again over the phase's time left when it fits at least
    :data:`EXTEND_MIN_SHARE` more steps than planned; True when it did (the caller stores the decision: a checkpoint).

    The reserve shrinks as the student's validations measure its inference and the metric
    (a price taken during a hiccup, or per voxel of a volume smaller than a window, is
    replaced): a schedule planned on the larger reserve would end with the training deadline
    still far off. Never shorter (an overrunning schedule is stopped by the deadline, its last
    weights validated), not while the revision is due, and only a schedule this session laid out on its budget.
    """
    if student.schedule_steps is None or student.step >= student.schedule_steps:
        return False
    return _lay_out_from_here(ctx, phase, student, cfg, costs, reason="extended", beyond=student.schedule_steps,
                              least=max(1.0, EXTEND_MIN_SHARE * student.schedule_steps))


def refit_schedule(ctx: "RunContext", phase: str, student: distill.DistillState, cfg: Any, costs: StepCosts) -> bool:
    """After the deadline stopped the steps and the stop's validation re-measured the reserve, lay the schedule out again
    from this step over the phase's time left when at least :data:`EXTEND_MIN_SHARE` of it (two steps at least) fits;
    True when it did (the caller stores the decision and goes on training).

    A validation in a slow spell prices the student's inference high: the reserve it grows
    moves the deadline in, and the steps stop with the learning rate still high (a demo run
    stopped at step 167 of 242 and ended 20 s early, after the stop's own validation had
    re-measured the reserve smaller). The schedule may come out shorter than planned: its
    learning rate then anneals to the new end. Only a schedule this session laid out on its
    budget, not while the revision is due.
    """
    if student.schedule_steps is None:
        return False
    return _lay_out_from_here(ctx, phase, student, cfg, costs, reason="refitted", beyond=student.step,
                              least=max(2.0, EXTEND_MIN_SHARE * student.schedule_steps))


def _lay_out_from_here(ctx: "RunContext", phase: str, student: distill.DistillState, cfg: Any, costs: StepCosts, *, reason: str,
                       beyond: int, least: float) -> bool:
    """Lay a schedule this session laid out on its budget out again from this step (the student was validated at it: the
    validations are spread anew from it) when it then ends at least ``least`` steps after step ``beyond``, never while the
    revision is due; True when it did."""
    if not costs.budgeted or costs.laid_out is not None or not costs.durations:
        return False
    step_s = float(np.median(costs.durations))
    steps, every, left = _fit(ctx, phase, student, cfg, costs, step_s=step_s, origin=student.step)
    if steps - beyond < least:
        return False
    _set(ctx, phase, student, costs, steps=steps, every=every, origin=student.step, step_s=step_s, left=left, reason=reason)
    return True


def _plan(ctx: "RunContext", phase: str, student: distill.DistillState, cfg: Any, costs: StepCosts, *, step_s: float, reason: str) -> None:
    """Set ``student.schedule_steps`` and ``student.val_every`` to the steps that fit the phase's time left at ``step_s`` seconds a step,
    and journal them (``DISTILLATION_SCHEDULE``).

    :data:`SCHEDULE_SPARE` of the time is left unplanned (a schedule that overruns stops
    early, its last weights validated, so the spare only absorbs noise). Validations take at
    most :data:`VALIDATION_SHARE` of the training time (never closer than
    ``distill.val_every``: on a CPU one validation can cost as much as dozens of steps) and
    are spread evenly, the last at the schedule's end, so none is spent on weights a few
    steps from the final ones.
    """
    steps, every, left = _fit(ctx, phase, student, cfg, costs, step_s=step_s, origin=student.val_from)
    _set(ctx, phase, student, costs, steps=steps, every=every, origin=student.val_from, step_s=step_s, left=left, reason=reason)


def _fit(ctx: "RunContext", phase: str, student: distill.DistillState, cfg: Any, costs: StepCosts, *, step_s: float,
         origin: int) -> tuple[int, int, float]:
    """The schedule's length and the spacing of validations counted from step ``origin`` that fit the phase's time left at
    ``step_s`` seconds a step (see :func:`_plan`), and that time left."""
    step_s = max(step_s, 1e-9)
    validation_s, checkpoint_s = costs.validation, costs.checkpoint
    left = ctx.governor.phase_time_left(phase)
    # the validation and checkpoint after the last step run whatever the spacing: their time is set aside
    seconds = (1.0 - SCHEDULE_SPARE) * left - validation_s - checkpoint_s - costs.closing
    fit = lambda every: steps_that_fit(seconds, done=student.step, step_s=step_s, every=((every, validation_s, origin), (cfg.checkpoint_every, checkpoint_s, 0)))  # noqa: E731
    every = max(cfg.val_every, math.ceil(validation_s / (VALIDATION_SHARE * step_s)))
    span = student.step + max(1, fit(every)) - origin
    every = max(every, math.ceil(span / max(1, span // every)))  # as many validations, evenly spaced up to the end
    return student.step + max(1, fit(every)), every, left


def _set(ctx: "RunContext", phase: str, student: distill.DistillState, costs: StepCosts, *, steps: int, every: int, origin: int,
         step_s: float, left: float, reason: str) -> None:
    """Store the schedule on the student and journal it (``DISTILLATION_SCHEDULE``)."""
    student.val_every, student.val_from, student.schedule_steps = every, origin, steps
    ctx.event("DISTILLATION_SCHEDULE", phase, {"schedule_steps": steps, "reason": reason, "seconds_per_step": round(step_s, 6),
                                               "seconds_per_validation": round(costs.validation, 6), "seconds_per_checkpoint": round(costs.checkpoint, 6),
                                               "val_every": every, "val_from": origin, "time_left_s": round(left, 3)})


def seconds_per_window(ctx: "RunContext", student: distill.DistillState, cfg: Any, *, warm_up: bool = True) -> float:
    """Seconds :func:`~nx46vx.segment.sliding_window` takes per window of the student's network, timed now on one batch of windows.

    Before a step is trained, this prices the student's validations and its test
    inference: a row of one pass's overlapping windows (:func:`~nx46vx.segment.windows_per_pass`)
    is normalised, run and blended as the test volumes' are (the cost per window depends
    on the windows per pass). Eval mode without gradients: the weights and every random stream
    are left as they were. ``warm_up``: run the row once untimed first (the first call
    pays one-off allocations; a network already timed this way need not).
    """
    seg, patch = ctx.config.segment, distill.window(cfg)
    windows = windows_per_pass(seg.window_batch, ctx.distill_device)
    row = np.zeros((patch, patch, patch + (windows - 1) * window_stride(patch, seg.overlap)), np.uint8)
    prior = np.zeros(row.shape, np.float32) if cfg.teacher_input else None
    network = student.network.eval()
    run = lambda: sliding_window(row, network, patch=patch, overlap=seg.overlap, device=ctx.distill_device, batch=windows, prior=prior,  # noqa: E731
                                intensity=student.intensity, dtype=compute_dtype(cfg.precision, ctx.distill_device))
    if warm_up:
        run()
    t0 = ctx.governor.clock()
    run()
    return (ctx.governor.clock() - t0) / window_count(row.shape, patch=patch, overlap=seg.overlap, flip_tta=False)


@dataclasses.dataclass(frozen=True)
class InferencePrice:
    """The student's inference, priced before it trains: seconds per window, its windows over the test volumes (flips
    included), seconds per test voxel (its prior apart), seconds of one validation."""

    window_s: float
    test_windows: int
    test_s_per_voxel: float
    validation_s: float


def price_inference(ctx: "RunContext", state: "RunState", student: distill.DistillState, cfg: Any, val_shapes: Sequence[Sequence[int]]) -> InferencePrice:
    """Time the student's network on one window (:func:`seconds_per_window`) and price its test volumes and one validation on ``val_shapes``.

    A validation runs without flips and scores every volume at the metric's measured seconds per voxel.
    """
    seg = ctx.config.segment
    window_s = seconds_per_window(ctx, student, cfg)
    tests = [state.shapes[t.id] for t in state.discovery.test if t.id in state.shapes and t.id not in state.rejected_tests]
    test_windows = sum(window_count(shape, patch=distill.window(cfg), overlap=seg.overlap, flip_tta=seg.flip_tta) for shape in tests)
    scoring_s = ctx.governor.score_s_per_voxel * sum(int(np.prod(shape)) for shape in val_shapes)
    validation_s = inference_seconds(val_shapes, window_s, patch=distill.window(cfg), overlap=seg.overlap, flip_tta=False) + scoring_s
    return InferencePrice(window_s, test_windows, window_s * test_windows / max(1, state.test_voxels), validation_s)


def inference_seconds(shapes: Sequence[Sequence[int]], window_s: float, *, patch: int, overlap: float, flip_tta: bool) -> float:
    """Predicted seconds of the student's sliding window over volumes of ``shapes``, ``window_s`` per window (:func:`seconds_per_window`)."""
    return window_s * sum(window_count(shape, patch=patch, overlap=overlap, flip_tta=flip_tta) for shape in shapes)


#: The most of the distillation time left (after one validation) that the teachers' maps may take: the rest trains the student.
MAPS_SHARE = 0.5


class MapsBudget:
    """The time the teachers' maps get before the student trains: :data:`MAPS_SHARE` of the phase's time left after ``reserved_s``.

    Its two ``fits(seconds_per_voxel, voxels_left)`` tests (see
    :data:`~nx46vx.runner.training_data.Fits`): :meth:`whole` for maps that are only of
    use complete (the extrapolated rest must fit), :meth:`partial` for a subset that
    may stop anywhere (a volume starts while time is left).
    """

    def __init__(self, governor: "Governor", phase: str, *, reserved_s: float) -> None:
        self.governor, self.phase = governor, phase
        left = governor.phase_time_left(phase)
        self.deadline = governor.elapsed() + MAPS_SHARE * (left - reserved_s) if left != float("inf") else left

    def partial(self, seconds_per_voxel: float, voxels_left: int) -> bool:
        return not self.governor.phase_should_stop(self.phase) and self.governor.elapsed() < self.deadline

    def whole(self, seconds_per_voxel: float, voxels_left: int) -> bool:
        return self.partial(seconds_per_voxel, voxels_left) and self.governor.elapsed() + seconds_per_voxel * voxels_left <= self.deadline
