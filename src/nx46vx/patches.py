"""Training patches for the student: seeded draws and augmentation, pure functions of ``(seed, step)``.

A batch is fully determined by the seed and the step — which volume, which centre,
which augmentation — so batches can be prepared ahead in background threads and a
resumed run draws exactly the batches an uninterrupted one would. Volumes come from
a callable (the runner's bounded cache); foreground coordinates are a seeded, capped
sample per volume computed once (:func:`foreground_sample`), never a rescan of the
label volume per patch.

Augmentations (each switchable by name, nnU-Net's probabilities): ``flip`` (each
axis), ``rot90`` (a random axis pair: labels of a surface do not depend on its
orientation), ``affine`` (±15° about one axis, scale 0.85–1.25), ``intensity``
(brightness, contrast, gamma), ``noise``, ``blur``, ``lowres`` (down- then
up-sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from .config import AUGMENTATIONS
from . import streams


@dataclass(frozen=True)
class TrainVolume:
    """One decoded training volume: ``image`` float32 (z, y, x) normalised, ``label`` uint8 (z, y, x),
    ``foreground`` int32 (n, 3) sampled label-1 coordinates, ``target`` float32 (z, y, x) teachers' mean or None,
    ``prior`` float32 (z, y, x) the probability fed as the network's second input channel, or None."""

    image: np.ndarray
    label: np.ndarray
    foreground: np.ndarray
    target: np.ndarray | None = None
    prior: np.ndarray | None = None


def foreground_sample(label: np.ndarray, *, cap: int, seed: int) -> np.ndarray:
    """Up to ``cap`` label-1 coordinates, int32 (n, 3), drawn without replacement by a generator seeded with ``seed``."""
    flat = np.flatnonzero(label.ravel() == 1)
    if flat.size > cap:
        flat = np.sort(streams.generator(seed, streams.FOREGROUND).choice(flat, size=cap, replace=False))
    return np.stack(np.unravel_index(flat, label.shape), axis=1).astype(np.int32)


def _centre(vol: TrainVolume, rng: np.random.Generator, positive: bool) -> tuple[int, int, int]:
    """A label-1 voxel (positive) or a labelled voxel (a few random tries, then any voxel)."""
    if positive and len(vol.foreground):
        return tuple(int(c) for c in vol.foreground[int(rng.integers(len(vol.foreground)))])
    for _ in range(16):
        centre = tuple(int(rng.integers(s)) for s in vol.label.shape)
        if vol.label[centre] != 2:
            return centre
    return centre


def crop(array: np.ndarray, centre: Sequence[int], patch: int, fill: float | None) -> np.ndarray:
    """The ``patch``³ box around ``centre``, padded past the edges (``fill`` constant, or edge values when None)."""
    starts = [int(c) - patch // 2 for c in centre]
    src = tuple(slice(max(0, a), min(s, a + patch)) for a, s in zip(starts, array.shape))
    pad = [(max(0, -a), max(0, a + patch - s)) for a, s in zip(starts, array.shape)]
    box = array[src]
    if any(p for pair in pad for p in pair):
        box = np.pad(box, pad, mode="edge") if fill is None else np.pad(box, pad, mode="constant", constant_values=fill)
    return box


def augment(
    image: np.ndarray, label: np.ndarray, target: np.ndarray, rng: np.random.Generator, ops: Sequence[str], *, maps: Sequence[np.ndarray] = ()
) -> tuple[np.ndarray, ...]:
    """Apply the switched-on augmentations to one patch (image float32, label uint8, target float32), all (p, p, p).

    ``maps`` (float32 (p, p, p) each, e.g. the prior) move with the image's geometry
    like ``target`` and are returned after it; intensity ops touch the image alone.
    Every op draws from ``rng`` whether or not it applies, so switching one op off
    does not change the draws of the others.
    """
    draws = rng.random(len(AUGMENTATIONS))
    params = rng.random(8)
    on = {name: name in ops and draws[i] < p for i, (name, p) in enumerate(AUGMENTATIONS.items())}
    soft = [target, *maps]  # interpolated linearly; the label by nearest neighbour
    if on["flip"]:
        axes = tuple(a for a in range(3) if params[a] < 0.5)
        if axes:
            image, label, *soft = (np.flip(x, axes) for x in (image, label, *soft))
    if on["rot90"]:
        plane = [(0, 1), (0, 2), (1, 2)][int(params[3] * 3) % 3]
        k = 1 + int(params[4] * 3) % 3
        image, label, *soft = (np.rot90(x, k, plane) for x in (image, label, *soft))
    if on["affine"]:
        image, label, *soft = _affine(image, label, soft, angle=np.deg2rad(30 * (params[5] - 0.5)), scale=0.85 + 0.4 * params[6], axis=int(params[7] * 3) % 3)
    image = np.ascontiguousarray(image, dtype=np.float32)
    extra = rng.random(6)
    if on["intensity"]:
        mean = float(image.mean())
        image = (image - mean) * (0.75 + 0.5 * extra[0]) + mean + 0.1 * (extra[1] - 0.5)
        low, high = float(image.min()), float(image.max())
        if high > low:
            image = low + (high - low) * ((image - low) / (high - low)) ** (0.7 + 0.8 * extra[2])
    if on["noise"]:
        image = image + rng.normal(0.0, 0.1 * extra[3], image.shape).astype(np.float32)
    if on["blur"]:
        image = ndimage.gaussian_filter(image, 0.5 + 0.5 * extra[4])
    if on["lowres"]:
        factor = 0.5 + 0.5 * extra[5]
        small = ndimage.zoom(image, factor, order=0)
        image = ndimage.zoom(small, [a / b for a, b in zip(image.shape, small.shape)], order=1)[: image.shape[0], : image.shape[1], : image.shape[2]]
    return (np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label), *(np.ascontiguousarray(x, dtype=np.float32) for x in soft))


def _affine(image: np.ndarray, label: np.ndarray, soft: Sequence[np.ndarray], *, angle: float, scale: float, axis: int) -> tuple[np.ndarray, ...]:
    """Rotate by ``angle`` about ``axis`` and scale by ``scale`` around the patch centre (labels nearest, 2 outside; ``soft`` maps linear)."""
    c, s = np.cos(angle), np.sin(angle)
    plane = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[np.ix_(plane, plane)] = [[c, -s], [s, c]]
    matrix /= scale
    centre = (np.asarray(image.shape) - 1) / 2
    offset = centre - matrix @ centre
    warp = lambda x, order, cval: ndimage.affine_transform(x, matrix, offset=offset, order=order, mode="constant" if cval is not None else "nearest", cval=cval or 0.0)  # noqa: E731
    return (warp(image, 1, None), warp(label, 0, 2), *(warp(x, 1, None) for x in soft))


def make_batch(
    volumes: Callable[[int], TrainVolume],
    n_volumes: int,
    step: int,
    *,
    seed: int,
    batch: int,
    patch: int,
    positive_fraction: float,
    augmentations: Sequence[str],
    skeleton: bool = False,
    prior: bool = False,
) -> dict[str, torch.Tensor]:
    """The patches of one step, drawn by the generator seeded with ``(seed, 6, step)``.

    Returns
    -------
    dict of tensors
        ``image`` (B, 1, p, p, p) float32, ``label`` (B, 1, p, p, p) uint8 (2 = ignore,
        also past the volume's edges), ``target`` (B, 1, p, p, p) float32,
        ``covered`` (B,) bool (the volume has a teacher target) and, with
        ``skeleton``, ``skeleton`` (B, 1, p, p, p) float32: the 3-D skeleton of the
        surface labels (``skimage.morphology.skeletonize``), for the skeleton-recall term;
        with ``prior``, ``prior`` (B, 1, p, p, p) float32 (every volume must have one).
    """
    rng = streams.generator(seed, streams.STUDENT_BATCH, step)
    images, labels, targets, priors, covered = [], [], [], [], []
    for _ in range(batch):
        index = int(rng.integers(n_volumes))
        vol = volumes(index)
        if prior and vol.prior is None:
            raise ValueError(f"training volume {index} has no prior map, and the batch needs one")
        centre = _centre(vol, rng, bool(rng.random() < positive_fraction))
        image, label = crop(vol.image, centre, patch, None), crop(vol.label, centre, patch, 2)
        target = crop(vol.target, centre, patch, None) if vol.target is not None else np.zeros((patch,) * 3, np.float32)
        maps = [crop(vol.prior, centre, patch, None)] if prior else []
        image, label, target, *maps = augment(image, label, target, rng, augmentations, maps=maps)
        images.append(image)
        labels.append(label)
        targets.append(target)
        priors.extend(maps)
        covered.append(vol.target is not None)
    out = {
        "image": torch.from_numpy(np.stack(images))[:, None],
        "label": torch.from_numpy(np.stack(labels))[:, None],
        "target": torch.from_numpy(np.stack(targets))[:, None],
        "covered": torch.tensor(covered),
    }
    if prior:
        out["prior"] = torch.from_numpy(np.stack(priors))[:, None]
    if skeleton:
        from skimage.morphology import skeletonize

        out["skeleton"] = torch.from_numpy(np.stack([skeletonize(lab == 1).astype(np.float32) for lab in labels]))[:, None]
    return out
