"""The time governor: one budget split into phases, deadlines, and graceful stop on signals.

Follows PyTorch Lightning's ``Timer``: ``time.monotonic()``, elapsed time restored
from the checkpoint, and a stop *signalled* (``should_stop()`` turns True) rather
than raised, so training ends at an iteration boundary with a checkpoint.

The session budget ``total_s`` (0 = unlimited) covers this notebook session. The
training deadline is ``total_s − margin − reserve`` (the margin is ``margin_s``, at most a twentieth of ``total_s``), where the reserve for
segmentation + packaging is the measured (or configured) cost per test volume ×
number of test volumes × ``reserve_safety``. Inside that window each training phase
has a share (``budget.features_share``, ``budget.search_share``; distillation gets the
rest): a phase's deadline is the cumulative share of the window, and a phase before
distillation also stops once it has used its own share since it was entered, so the
time it leaves unused goes to the student, not to the search (a bounded teacher).

Tests (and dry runs) drive the governor with a :class:`VirtualClock`: time advances
by a fixed tick per reading plus injected costs at named points
(:meth:`Governor.account`), so every time-driven decision is reproducible.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any, Callable

from .config import BudgetConfig

log = logging.getLogger("nx46vx")


TRAINING_PHASES = ("features", "search", "distillation")
MARGIN_SHARE_CAP = 0.05  # the margin is at most this share of budget.total_s


class VirtualClock:
    """A deterministic clock: ``tick`` seconds per reading, plus ``costs[point]`` per :meth:`charge`.

    Parameters
    ----------
    tick : float
        Seconds each call advances.
    costs : mapping point → seconds, optional
        Seconds charged when the runner accounts for a unit of work at ``point``
        (``features_volume``, ``distill_step``, ``distill_validation``, ``tune_params``,
        ``segment_volume``, ``baseline_volume``, ``teacher_volume``: a training volume's teacher
        maps computed, ``validation_volume``: one source's map of a validation volume).
    """

    def __init__(self, tick: float = 0.0, costs: dict[str, float] | None = None) -> None:
        self.tick = tick
        self.costs = dict(costs or {})
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def charge(self, point: str) -> None:
        self.now += self.costs.get(point, 0.0)


class MeasuredCost:
    """A cost the reserve is sized by: the configured guess until measured, then the dearest source's latest measurement.

    A source's new measurement replaces its last one, so a machine hiccup while one was timed
    (or a validation timed beside the batch threads) does not inflate the reserve for the rest
    of the run; across sources the dearest counts, since any of them may segment.

    Parameters
    ----------
    guess : float
        The configured value, until a first measurement.
    """

    def __init__(self, guess: float) -> None:
        self.guess = guess
        self.latest: dict[str, float] = {}

    def measured(self, value: float, *, source: str = "") -> None:
        """Record ``source``'s latest measurement (a non-positive value is none)."""
        if value > 0:
            self.latest[source] = value

    @property
    def value(self) -> float:
        return max(self.latest.values()) if self.latest else self.guess


class Governor:
    """Session clock, phase clocks and the stop flag.

    Parameters
    ----------
    budget : BudgetConfig
    n_test : int
        Test volumes to segment after training.
    clock : callable
        Monotonic clock (tests may inject one).
    """

    def __init__(self, budget: BudgetConfig, *, n_test: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.n_test = n_test
        self.clock = clock
        self.started = clock()
        self.volume_cost = MeasuredCost(budget.reserve_per_volume_s)  # seconds per test volume, per segmenter
        self.n_val = 0  # validation volumes the segmenter choice runs every source on
        self.tuning_voxels = 0  # voxels the post-processing tuning scores: validation voxels × grid points
        self.score_cost = MeasuredCost(budget.score_s_per_mvoxel / 1e6)  # the metric's seconds per voxel
        self.repair_voxels = 0  # voxels the tunnel repair runs on: validation voxels × repairing grid points + the test voxels
        self.repair_cost = MeasuredCost(budget.repair_s_per_mvoxel / 1e6)  # the tunnel repair's seconds per voxel
        self.test_voxels = 0  # voxels of the test volumes
        self.cleanup_cost = MeasuredCost(0.0)  # a mask's clean-up (threshold, small components) per voxel: every test mask pays it
        self.checkpoint_cost = MeasuredCost(0.0)  # one checkpoint's seconds: one is written after every test volume
        self.phase_elapsed: dict[str, float] = {}
        self.previous_elapsed: dict[str, float] = {}
        self._phase: str | None = None
        self._phase_start = 0.0
        self._entered: dict[str, float] = {}  # session seconds at which each phase was first entered
        self.stop_reason: str | None = None
        self._old_handlers: dict[int, Any] = {}

    # -------------------------------------------------------------- clocks

    def elapsed(self) -> float:
        """Seconds since this session started."""
        return self.clock() - self.started

    def remaining(self) -> float:
        """Seconds left in the session budget (infinite when unlimited)."""
        if self.budget.total_s <= 0:
            return float("inf")
        return self.budget.total_s - self.elapsed()

    def reserve(self) -> float:
        """Seconds kept for segmentation + packaging (at most half the budget, so training gets a share).

        (Per volume cost × (test volumes + validation volumes: the post-processing is tuned
        on them, on the student's maps from its last validation and the cheaper sources'
        maps) + the metric's cost per voxel × the voxels one source's tuning scores + the
        tunnel repair's cost per voxel × the voxels it runs on + what the test volumes cost past their inference,
        :meth:`finishing_seconds`) × ``reserve_safety``.
        """
        volumes = self.per_volume_s * (max(1, self.n_test) + self.n_val) + self.finishing_seconds(self.test_voxels, self.n_test)
        tuning = self.score_s_per_voxel * self.tuning_voxels + self.repair_s_per_voxel * self.repair_voxels
        reserve = (volumes + tuning) * self.budget.reserve_safety
        return min(reserve, 0.5 * self.budget.total_s) if self.budget.total_s > 0 else reserve

    def account(self, point: str) -> None:
        """A unit of work at ``point`` finished: a :class:`VirtualClock` charges its injected cost; a real clock needs nothing."""
        charge = getattr(self.clock, "charge", None)
        if charge is not None:
            charge(point)

    def share(self, phase: str) -> float:
        """The fraction of the training window ``phase`` may use (distillation: what the others leave)."""
        b = self.budget
        shares = {"features": b.features_share, "search": b.search_share}
        shares["distillation"] = max(0.0, 1.0 - shares["features"] - shares["search"])
        return shares.get(phase, 0.0)

    def phase_deadline(self, phase: str) -> float:
        """Session seconds at which a training phase must stop.

        The cumulative share of the training window; for a phase before the last, once
        entered, also its own share counted from its entry (what it leaves passes to
        distillation, whatever the phases before it left).
        """
        window = self.training_deadline()
        if window == float("inf") or phase not in TRAINING_PHASES:
            return window
        window = max(0.0, window)
        upto = TRAINING_PHASES[: TRAINING_PHASES.index(phase) + 1]
        cumulative = window * sum(self.share(p) for p in upto)
        if phase == TRAINING_PHASES[-1] or phase not in self._entered:
            return cumulative
        return min(cumulative, self._entered[phase] + window * self.share(phase))

    def phase_time_left(self, phase: str) -> float:
        """Seconds left before ``phase``'s deadline (infinite when unlimited)."""
        return self.phase_deadline(phase) - self.elapsed()

    def phase_should_stop(self, phase: str) -> bool:
        """True once a signal arrived, the training deadline passed, or ``phase`` used its share."""
        if self.should_stop():
            return True
        return self.elapsed() >= self.phase_deadline(phase)

    @property
    def per_volume_s(self) -> float:
        """Seconds segmenting one test volume may take: the dearest segmenter's latest measurement, else the configured guess."""
        return self.volume_cost.value

    @property
    def score_s_per_voxel(self) -> float:
        """The competition metric's seconds per voxel (with a grid point's clean-up): the latest measurement, else the guess."""
        return self.score_cost.value

    @property
    def repair_s_per_voxel(self) -> float:
        """The tunnel repair's seconds per voxel: the latest measurement, else the configured guess."""
        return self.repair_cost.value

    def finishing_seconds(self, voxels: int, volumes: int) -> float:
        """What ``volumes`` test volumes of ``voxels`` voxels in all cost past their inference and tunnel repair: each mask's
        clean-up and the checkpoint written after it, as last measured (nothing before a measurement). A demo run that left
        them out of its price (~0.55 s a volume against ~0.6 s priced) gave its last test volume the baseline's mask."""
        return self.cleanup_cost.value * voxels + self.checkpoint_cost.value * volumes

    def measured_cleanup_cost(self, seconds_per_voxel: float) -> None:
        """The latest measured clean-up of a mask (the plain grid point's), per voxel."""
        self.cleanup_cost.measured(seconds_per_voxel)

    def measured_checkpoint_cost(self, seconds: float) -> None:
        """The latest checkpoint's seconds."""
        self.checkpoint_cost.measured(seconds)

    def measured_volume_cost(self, seconds_per_voxel: float, test_voxels: int, *, source: str) -> None:
        """Size the reserve from segmenter ``source``'s measured feature/inference cost (:class:`MeasuredCost`: its latest
        measurement replaces its last one; the dearest segmenter sets what segmentation may need)."""
        if test_voxels > 0 and seconds_per_voxel > 0:
            self.volume_cost.measured(max(seconds_per_voxel * test_voxels / max(1, self.n_test), 0.05), source=source)

    def measured_score_cost(self, seconds_per_voxel: float) -> None:
        """Size the tuning part of the reserve from the competition metric's latest measured cost (the student's
        validations come last, on the kind of masks most of the tuning's grid points score)."""
        self.score_cost.measured(seconds_per_voxel)

    def measured_repair_cost(self, seconds_per_voxel: float) -> None:
        """Size the tunnel repair's part of the reserve from its latest measured cost."""
        self.repair_cost.measured(seconds_per_voxel)

    def training_deadline(self) -> float:
        """Session seconds after which training must stop (infinite when unlimited)."""
        if self.budget.total_s <= 0:
            return float("inf")
        return self.budget.total_s - self.margin() - self.reserve()

    def margin(self) -> float:
        """Pre-timeout margin: ``margin_s``, but at most a twentieth of a small budget (the segmentation reserve is
        measured and kept apart; a quarter left a 600 s run idle for its last three minutes, a tenth for its last one)."""
        return min(self.budget.margin_s, MARGIN_SHARE_CAP * self.budget.total_s)

    def should_stop(self) -> bool:
        """True once a signal arrived or the training deadline passed (sets :attr:`stop_reason`)."""
        if self.stop_reason is None and self.elapsed() >= self.training_deadline():
            self.stop_reason = "deadline"
        return self.stop_reason is not None

    def state(self) -> dict[str, Any]:
        """Figures for ``TIME_BUDGET_STATE``."""
        inf = float("inf")
        return {
            "elapsed_s": round(self.elapsed(), 3),
            "total_s": self.budget.total_s,
            "remaining_s": None if self.remaining() == inf else round(self.remaining(), 3),
            "training_deadline_s": None if self.training_deadline() == inf else round(self.training_deadline(), 3),
            "reserve_s": round(self.reserve(), 3),
            "score_s_per_mvoxel": round(self.score_s_per_voxel * 1e6, 4),
            "repair_s_per_mvoxel": round(self.repair_s_per_voxel * 1e6, 4),
            "cleanup_s_per_mvoxel": round(self.cleanup_cost.value * 1e6, 6),
            "checkpoint_s": round(self.checkpoint_cost.value, 6),
            "phase": self._phase,
            "stop_reason": self.stop_reason,
        }

    # -------------------------------------------------------------- phases

    def enter(self, phase: str) -> None:
        """Start timing ``phase`` (closing the previous one)."""
        self.leave()
        self._phase, self._phase_start = phase, self.clock()
        self._entered.setdefault(phase, self._phase_start - self.started)

    def leave(self) -> None:
        if self._phase is not None:
            self.phase_elapsed[self._phase] = self.phase_elapsed.get(self._phase, 0.0) + self.clock() - self._phase_start
            self._phase = None

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase in this session, the open phase included."""
        out = dict(self.phase_elapsed)
        if self._phase is not None:
            out[self._phase] = out.get(self._phase, 0.0) + self.clock() - self._phase_start
        return out

    def cumulative_seconds(self) -> dict[str, float]:
        """Seconds per phase over this run and the runs it resumed."""
        out = dict(self.previous_elapsed)
        for phase, sec in self.phase_seconds().items():
            out[phase] = out.get(phase, 0.0) + sec
        return out

    def restore(self, cumulative: dict[str, float]) -> None:
        """Restore the elapsed time of the runs this one resumes."""
        self.previous_elapsed = {k: float(v) for k, v in cumulative.items()}

    # -------------------------------------------------------------- signals

    def _handle(self, signum: int, _frame: Any) -> None:
        self.stop_reason = "signal"
        log.warning("received signal %d: stopping at the next iteration boundary", signum)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a graceful stop (main thread only; elsewhere a no-op)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                return

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
