"""Seeded sampling of labelled voxels: class-balanced epoch samples, bootstraps, the validation sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import DataLayoutError
from ..features import Pool
from .. import streams


@dataclass(frozen=True)
class Sample:
    """Voxels drawn from pools: ``features`` (n, C) float32, ``labels`` (n,) float32, ``weights`` (n,) float64."""

    features: np.ndarray
    labels: np.ndarray
    weights: np.ndarray


def _stack(pools: Sequence[Pool]) -> tuple[np.ndarray, np.ndarray]:
    features = np.concatenate([p.features for p in pools]) if pools else np.zeros((0, 0), np.float32)
    labels = np.concatenate([p.labels for p in pools]) if pools else np.zeros(0, np.uint8)
    return features, labels


def balanced_sample(pools: Sequence[Pool], per_class: int, rng: np.random.Generator) -> Sample:
    """``per_class`` voxels of each class across all pools (without replacement while the pool allows).

    Raises
    ------
    DataLayoutError
        When a class has no voxel at all (e.g. no surface labelled in any training volume).
    """
    features, labels = _stack(pools)
    picks = []
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        if idx.size == 0:
            raise DataLayoutError(
                "training volumes hold no labelled voxel of a class",
                path="train_labels/",
                expected=f"voxels with label {cls}",
                found="none",
            )
        picks.append(rng.choice(idx, size=per_class, replace=idx.size < per_class))
    order = np.concatenate(picks)
    rng.shuffle(order)
    return Sample(features[order], labels[order].astype(np.float32), np.ones(order.size))


def bootstrap_weights(n: int, meta_neurons: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """Bootstrap weights, shape (n, len(meta_neurons)), float32, each column summing to 1.

    Column ``j`` is the multiplicity of each sample in a resample of size ``n`` drawn
    by the generator seeded with ``(seed, 1, epoch, meta_neurons[j])`` (stream 1), divided by ``n``:
    every meta-neuron sees its own bootstrap, reproducibly.
    """
    out = np.empty((n, len(meta_neurons)), dtype=np.float32)
    for j, meta in enumerate(meta_neurons):
        rng = streams.generator(seed, streams.BOOTSTRAP, epoch, meta)
        out[:, j] = np.bincount(rng.integers(0, n, size=n), minlength=n) / n
    return out


def validation_sample(pools: Sequence[Pool], per_class: int, rng: np.random.Generator) -> Sample:
    """Up to ``per_class`` voxels of each class, weighted back to each volume's true class counts.

    Pools are capped per volume, so a small volume holds a larger share of the pooled
    voxels than of the labelled ones. The weight of a sampled voxel of class c from
    volume v is ``(labelled voxels of class c in v) / (sampled voxels of class c from v)``:
    weighted counts estimate voxel-level confusion matrices over the whole validation
    volumes, each volume counted by its labelled voxels.
    """
    features, labels = _stack(pools)
    volume_of = np.concatenate([np.full(p.labels.size, v) for v, p in enumerate(pools)]) if pools else np.zeros(0, np.int64)
    counts = np.asarray([p.class_counts for p in pools], dtype=np.float64).reshape(-1, 2)  # (volumes, classes)
    picks, weights = [], []
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        take = min(idx.size, per_class)
        chosen = np.sort(rng.choice(idx, size=take, replace=False)) if take else idx
        picked = np.bincount(volume_of[chosen], minlength=len(pools))
        picks.append(chosen)
        weights.append(counts[volume_of[chosen], cls] / np.maximum(picked[volume_of[chosen]], 1))
    order = np.concatenate(picks)
    return Sample(features[order], labels[order].astype(np.float32), np.concatenate(weights))
