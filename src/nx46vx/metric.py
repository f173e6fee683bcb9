"""The competition metric: ``0.30·TopoScore + 0.35·SurfaceDice@2 + 0.35·VOI_score`` per volume.

Before scoring, every voxel whose truth is 2 (unlabeled) is set to 0 in both
prediction and truth, so predictions there never change the score.

* **SurfaceDice@τ** (τ = 2 voxels) follows DeepMind's ``surface-distance``
  (``compute_surface_distances`` + ``compute_surface_dice_at_tolerance``): surface
  elements are found from the 2×2×2 neighbour code of each voxel corner and weighted
  by their marching-cubes area; distances are Euclidean distance transforms to the
  other mask's surface. Both empty → 1, exactly one empty → 0.
* **VOI_score** = 1 / (1 + 0.3·(split + merge)), where split and merge are the
  conditional entropies (in bits, as
  ``skimage.metrics.variation_of_information``) between the 26-connected components of
  prediction and truth, over the voxels in the union of both foregrounds.
* **TopoScore** by Betti matching (:mod:`nx46vx.betti`, Betti-Matching-3D's pairs
  exactly): both masks are inverted (foreground 0, background 1, sublevel filtration,
  so foreground components are H0) and cut into 2×2×2 tiles (per axis the first tile
  has ``n - n // 2`` voxels, the second ``n // 2``; an empty tile counts nothing). Per
  dimension k, m_k = matched pairs, p_k = m_k + the prediction's unmatched finite pairs,
  g_k = m_k + the truth's, summed over tiles. F1_k = 2·m_k/(p_k + g_k) when g_k > 0,
  else 0.5/(p_k + g_k + 0.5); dimensions with p_k = g_k = 0 are inactive; weights
  0.34/0.33/0.33 are renormalised over the active ones; none active → 1.

This is the competition's ``compute_leaderboard_score``; ``tests/test_metric_reference.py``
checks it against the compiled Betti-Matching-3D module.

Tuning scores many predictions against one truth: :class:`Truth` holds the terms that
depend on the truth alone (its surface elements and the distances to them, its
components), computed once; every function takes it in place of
the truth array, with the same result.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.measure import euler_number

from .betti import matching_counts
from .volumes import UNLABELED

TOLERANCE = 2.0
VOI_ALPHA = 0.3
WEIGHTS = {"topo_score": 0.30, "surface_dice": 0.35, "voi_score": 0.35}
TOPO_WEIGHTS = (0.34, 0.33, 0.33)

# Surface area of the marching-cubes surfels of each 2×2×2 neighbour code at unit
# spacing, as tabulated by DeepMind's surface-distance (Apache-2.0): the 13 distinct
# areas, and for each code 0..255 the index (base 13) of its area.
_AREAS = (
    0.0, 0.21650635094610965, 0.4330127018922193, 0.649519052838329, 0.7071067811865476,
    0.8660254037844386, 0.9236131321326573, 1.0, 1.149519052838329, 1.2990381056766578,
    1.3660254037844386, 1.4142135623730951, 1.573132184970986,
)
_CODE_AREA_INDEX = (
    "011414281248488714282839266c6ca81248266c23896ac848876ca86ac8b664"
    "1226486c236a89c8486c87a86ab6c864236a6ab635a3a36289c8c864a3626221"
    "1226263a468c8c98263a3a536ba6a632468c6ba68a78c6848c98a632c6846221"
    "466b8ca68ac678848ca69832c66284218ac6c662938282417884842182414110"
)
SURFEL_AREA = np.array([_AREAS[int(c, 13)] for c in _CODE_AREA_INDEX], dtype=np.float64)
_NEIGHBOUR_KERNEL = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)
_FULL_CODE = 255


@dataclass(frozen=True)
class VolumeScore:
    """Scores of one volume, each in [0, 1], and the Betti matching's counts behind ``topo_score``.

    ``topo_counts[k]`` is ``(m_k, p_k, g_k)`` for dimension k: matched pairs, and the
    finite pairs of the prediction and of the truth.
    """

    surface_dice: float
    voi_score: float
    topo_score: float
    score: float
    topo_counts: tuple[tuple[int, int, int], ...] = ((0, 0, 0),) * 3

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out["topo_counts"] = {f"dim{k}": {"matched": m, "pred": p, "truth": g} for k, (m, p, g) in enumerate(self.topo_counts)}
        return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)


def _padded(mask: np.ndarray) -> np.ndarray:
    """``mask`` with one zero voxel after each axis, so the surfels on its far faces are found."""
    return np.pad(mask, [(0, 1)] * mask.ndim)


def _corner_codes(mask: np.ndarray) -> np.ndarray:
    """The 2×2×2 neighbour code (uint8) at each voxel corner of a zero-padded mask."""
    return ndimage.correlate(mask.astype(np.uint8), _NEIGHBOUR_KERNEL, mode="constant", cval=0)


def _is_border(code: np.ndarray) -> np.ndarray:
    return (code != 0) & (code != _FULL_CODE)


def surface_dice(pred: np.ndarray, truth: "np.ndarray | Truth", *, tolerance: float = TOLERANCE) -> float:
    """Surface Dice at ``tolerance`` voxels of two boolean masks of shape (z, y, x) (the truth may be a :class:`Truth`)."""
    pred, truth = pred.astype(bool), _truth(truth)
    if not pred.any() and truth.distance is None:
        return 1.0
    if not pred.any() or truth.distance is None:
        return 0.0
    # the surfels of a mask and the distances to them, on the bounding box of both masks (plus the zero voxel after it)
    box = _bounding_box(pred | truth.mask)
    box = tuple(slice(s.start, s.stop + 1) for s in box)
    border_t, dist_to_t = truth.border[box], truth.distance[box]
    code_p = _corner_codes(_padded(pred)[box])
    border_p = _is_border(code_p)
    dist_to_p = ndimage.distance_transform_edt(~border_p)
    areas_t, areas_p = SURFEL_AREA[truth.code[box][border_t]], SURFEL_AREA[code_p[border_p]]
    overlap = areas_t[dist_to_p[border_t] <= tolerance].sum() + areas_p[dist_to_t[border_p] <= tolerance].sum()
    return float(overlap / (areas_t.sum() + areas_p.sum()))


#: 26-connectivity: the metric's components (VOI), and the clean-up's.
CONN26 = np.ones((3, 3, 3), dtype=bool)
#: 6-connectivity: the foreground's in the TopoScore's cubical complex (V-construction).
CONN6 = ndimage.generate_binary_structure(3, 1)


def variation_of_information(pred: np.ndarray, truth: "np.ndarray | Truth") -> tuple[float, float]:
    """(split, merge) conditional entropies (bits, as scikit-image) of 26-connected components over the union of foregrounds.

    ``split`` = H(pred components | truth components), ``merge`` = H(truth | pred).
    """
    truth = _truth(truth)
    union = pred | truth.mask
    n = int(union.sum())
    if n == 0:
        return 0.0, 0.0
    lab_p = ndimage.label(pred, structure=CONN26)[0][union]
    lab_t = truth.components[union]
    pairs = lab_t.astype(np.int64) * (int(lab_p.max()) + 1) + lab_p
    _, joint = np.unique(pairs, return_counts=True)
    _, count_t = np.unique(lab_t, return_counts=True)
    _, count_p = np.unique(lab_p, return_counts=True)

    def entropy(counts: np.ndarray) -> float:
        prob = counts / n
        return float(-(prob * np.log2(prob)).sum())

    h_joint = entropy(joint)
    return h_joint - entropy(count_t), h_joint - entropy(count_p)


def voi_score(pred: np.ndarray, truth: "np.ndarray | Truth", *, alpha: float = VOI_ALPHA) -> float:
    """1 / (1 + alpha·(split + merge))."""
    split, merge = variation_of_information(pred, truth)
    return 1.0 / (1.0 + alpha * (split + merge))


def betti_numbers(mask: np.ndarray) -> tuple[int, int, int]:
    """(b0, b1, b2) of a boolean 3-D mask, foreground 6-connected (background 26-connected).

    A check on clean-up steps (tunnels plugged, cavities filled); the score matches features by
    position instead (:func:`topo_counts`).
    """
    if not mask.any():
        return 0, 0, 0
    b0 = int(ndimage.label(mask, structure=CONN6)[1])
    padded = np.pad(~mask, 1, constant_values=True)
    b2 = int(ndimage.label(padded, structure=CONN26)[1]) - 1  # minus the outside
    chi = int(euler_number(mask, connectivity=1))
    return b0, b0 + b2 - chi, b2


def tiles(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The 2×2×2 tiles of the TopoScore (per axis ``n - n // 2`` then ``n // 2`` voxels), empty ones left out."""
    halves = [(slice(0, s - s // 2), slice(s - s // 2, s)) for s in shape]
    boxes = [(a, b, c) for a in halves[0] for b in halves[1] for c in halves[2]]
    return [t for t in boxes if all(sl.stop > sl.start for sl in t)]


def topo_counts(pred: np.ndarray, truth: "np.ndarray | Truth") -> np.ndarray:
    """Betti matching counts of two boolean masks, shape (z, y, x), summed over the tiles.

    Returns
    -------
    ndarray of int64, shape (3, 3)
        Row k: ``(m_k, p_k, g_k)``.
    """
    pred, truth_mask = np.asarray(pred, dtype=bool), _truth(truth).mask
    boxes = tiles(pred.shape)
    # inverted: the foreground is the sublevel set at 0; the kernels release the GIL, so tiles run side by side
    with ThreadPoolExecutor(max_workers=max(1, min(len(boxes), usable_cpus()))) as pool:
        parts = list(pool.map(lambda tile: matching_counts(~pred[tile], ~truth_mask[tile]), boxes))
    return np.sum(parts, axis=0, dtype=np.int64) if parts else np.zeros((3, 3), np.int64)


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def topo_score_from_counts(counts: np.ndarray) -> float:
    """TopoScore from per-dimension ``(m, p, g)`` counts, shape (3, 3)."""
    total = weight_sum = 0.0
    for k, (m, p, g) in enumerate(counts.tolist()):
        if p + g == 0:
            continue
        f1 = 2.0 * m / (p + g) if g > 0 else 0.5 / (p + g + 0.5)
        total += TOPO_WEIGHTS[k] * f1
        weight_sum += TOPO_WEIGHTS[k]
    return 1.0 if weight_sum == 0 else total / weight_sum


def topo_score(pred: np.ndarray, truth: "np.ndarray | Truth") -> float:
    """TopoScore by Betti matching over the 2×2×2 tiles (see the module doc)."""
    return topo_score_from_counts(topo_counts(pred, truth))


class Truth:
    """A truth volume, shape (z, y, x), with its prediction-independent terms computed once.

    Parameters
    ----------
    labels : ndarray, shape (z, y, x)
        Labels 0/1/2 (2 is ignored), or a boolean mask (nothing ignored).
    """

    def __init__(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels)
        self.shape = labels.shape
        self.mask = labels == 1 if labels.dtype != bool else labels
        self.ignore = labels == UNLABELED if labels.dtype != bool else None
        self.components = ndimage.label(self.mask, structure=CONN26)[0]
        self.code = _corner_codes(_padded(self.mask))  # uint8: the areas are looked up where needed (a 320³ truth holds ~330 MB)
        self.border = _is_border(self.code)
        # float32 is exact here: every distance is the root of an integer, and the tolerance compares with 2
        self.distance = ndimage.distance_transform_edt(~self.border).astype(np.float32) if self.border.any() else None


def _truth(truth: "np.ndarray | Truth") -> Truth:
    return truth if isinstance(truth, Truth) else Truth(np.asarray(truth, dtype=bool))


def _prepare(pred: np.ndarray, truth: "np.ndarray | Truth") -> tuple[np.ndarray, Truth]:
    """Boolean pred with every truth==2 voxel set to 0, and the truth."""
    truth = truth if isinstance(truth, Truth) else Truth(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    return ((pred > 0) & ~truth.ignore if truth.ignore is not None else pred > 0), truth


def score_volume(pred: np.ndarray, truth: "np.ndarray | Truth") -> VolumeScore:
    """Competition score of one volume.

    Parameters
    ----------
    pred : ndarray, shape (z, y, x)
        Prediction; nonzero = surface.
    truth : ndarray, shape (z, y, x), or Truth
        Labels 0/1/2; 2 is ignored in both (a :class:`Truth` of them when one truth scores many predictions).
    """
    p, t = _prepare(pred, truth)
    counts = topo_counts(p, t)
    parts = {
        "surface_dice": float(np.clip(surface_dice(p, t), 0, 1)),
        "voi_score": float(np.clip(voi_score(p, t), 0, 1)),
        "topo_score": float(np.clip(topo_score_from_counts(counts), 0, 1)),
    }
    total = sum(WEIGHTS[k] * v for k, v in parts.items())
    return VolumeScore(score=float(total), topo_counts=tuple(tuple(int(v) for v in row) for row in counts), **parts)
