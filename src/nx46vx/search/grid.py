"""The candidate grid ``meta_neurons × l1 × l2``, meta-neuron-major."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Candidate:
    """One sparse logistic meta-neuron with its penalty strengths."""

    index: int
    meta_neuron: int
    l1: float
    l2: float


def make_grid(meta_neurons: int, l1: Sequence[float], l2: Sequence[float]) -> list[Candidate]:
    """All candidates, index = ``meta·len(l1)·len(l2) + i1·len(l2) + i2``.

    Meta-neuron-major order keeps the candidates that share a bootstrap contiguous,
    so a batch of whole meta-neurons weights its residuals with one broadcast.
    """
    grid = []
    for meta in range(meta_neurons):
        for a in l1:
            for b in l2:
                grid.append(Candidate(len(grid), meta, float(a), float(b)))
    return grid
