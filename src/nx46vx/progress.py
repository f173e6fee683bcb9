"""Where the run stands: global progress from phase weights and the training cursor.

``global_progress = Σ W_i·P_i / Σ W_i`` over the phases, where ``P_i`` ∈ [0, 1] is
the fraction of phase ``i`` done and ``W_i`` its weight. Weights start from the
profile's defaults and are calibrated from the measured phase durations of the run
this one resumes (kept in its checkpoint). Training progress comes from the
``(epoch, candidate, iter)`` cursor and the epoch cap, so it moves with every
iteration: ``(epoch + done_in_epoch) / max_epochs``, and 1 when the search ends.
Distillation's fraction is its steps over ``distill.steps``. Pure bookkeeping: no clock, no
files; the runner decides when to report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

PHASES = ("discovery", "features", "search", "distillation", "segmentation", "packaging")
DEFAULT_WEIGHTS: dict[str, float] = {
    "discovery": 0.02,
    "features": 0.13,
    "search": 0.45,
    "distillation": 0.25,
    "segmentation": 0.12,
    "packaging": 0.03,
}


def train_progress(epoch: int, epoch_fraction: float, max_epochs: int, *, done: bool) -> float:
    """Fraction of training done, from the cursor (1 once the search has ended)."""
    if done:
        return 1.0
    return min(1.0, (epoch + max(0.0, min(1.0, epoch_fraction))) / max(1, max_epochs))


def calibrate(measured_seconds: Mapping[str, float], defaults: Mapping[str, float] = DEFAULT_WEIGHTS) -> dict[str, float]:
    """Weights proportional to measured phase durations; phases never measured keep their default share."""
    measured = {p: float(s) for p, s in measured_seconds.items() if p in defaults and s > 0}
    if not measured:
        return dict(defaults)
    unmeasured_share = sum(w for p, w in defaults.items() if p not in measured)
    total = sum(measured.values())
    weights = {p: (1.0 - unmeasured_share) * measured[p] / total if p in measured else w for p, w in defaults.items()}
    return weights


@dataclass
class Progress:
    """Per-phase fractions and weights; :meth:`global_progress` combines them."""

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    fractions: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})

    def set(self, phase: str, fraction: float) -> None:
        """Record how much of ``phase`` is done (clipped to [0, 1])."""
        self.fractions[phase] = max(0.0, min(1.0, float(fraction)))

    def global_progress(self) -> float:
        """Weighted fraction of the whole run done, in [0, 1]."""
        total = sum(self.weights.values())
        if total <= 0:
            return 0.0
        return sum(self.weights[p] * self.fractions.get(p, 0.0) for p in self.weights) / total

    def remaining_estimate(self, elapsed_s: float) -> float | None:
        """Seconds left at the average pace so far (None before any progress)."""
        done = self.global_progress()
        if done <= 0:
            return None
        return elapsed_s * (1.0 - done) / done
