"""Phase 6: turn test volumes into {0, 1} surface masks.

Every learned segmenter yields a probability map, which :func:`postprocess` cuts:

1. 3-D hysteresis (``skimage.filters.apply_hysteresis_threshold``): voxels above
   ``low`` connected to a voxel above ``high``;
2. when hysteresis keeps less than ``min_ratio`` of the volume, a
   percentile-calibrated fallback keeps the top ``fallback_percent`` % instead
   (both ratios are reported);
3. topological clean-up: remove 26-connected components under ``min_component``
   voxels, fill enclosed holes, optional binary closing.

The thresholds and clean-up parameters are chosen on validation volumes by the
competition metric (:func:`tune_postprocess`). Probability sources:

* ``probability`` — the mean of ``σ(φ·θ_k)`` over one or more search candidates
  (the best candidate, or the top-k ensemble), computed chunk by chunk from the
  feature bank;
* :func:`sliding_window` — any 3-D network (the student, a TorchScript teacher)
  over overlapping windows blended with Gaussian weights, optional flip TTA.

``intensity_baseline`` needs no training: smoothed intensity, Otsu threshold,
small components removed.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold, threshold_otsu

from .config import FeatureConfig, SegmentConfig
from .features import iter_feature_chunks, normalise
from .metric import score_volume
from .search.engine import design_rows
from .telemetry import free_memory

BASELINE = "intensity_baseline"
SEARCH_MODEL = "search_model"
ENSEMBLE = "ensemble"
STUDENT = "student"
_CONN26 = np.ones((3, 3, 3), dtype=bool)


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 26-connected components smaller than ``min_voxels``; uint8 {0, 1}, shape as ``mask``."""
    if min_voxels <= 1 or not mask.any():
        return mask.astype(np.uint8)
    labels, _ = ndimage.label(mask, structure=_CONN26)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels].astype(np.uint8)


def intensity_baseline(volume: np.ndarray, config: SegmentConfig) -> np.ndarray:
    """Smoothed-intensity Otsu mask, shape (z, y, x) uint8 {0, 1}."""
    smooth = ndimage.gaussian_filter(volume.astype(np.float32), config.baseline_sigma)
    if float(smooth.max()) == float(smooth.min()):
        return np.zeros(volume.shape, np.uint8)
    return remove_small_components(smooth > threshold_otsu(smooth), config.min_component_voxels)


def normalised(volume: np.ndarray) -> np.ndarray:
    """uint8 volume → float32 in ~[0, 1] by its 1st/99.5th percentiles (the network input)."""
    low, high = normalise(volume)
    return ((volume.astype(np.float32) - low) / (high - low)).astype(np.float32)


# ----------------------------------------------------------------------------- probability sources


def probability(
    volume: np.ndarray, thetas: np.ndarray | torch.Tensor, mean: np.ndarray, std: np.ndarray, features: FeatureConfig, *, device: torch.device | None = None
) -> np.ndarray:
    """Mean of ``σ(φ·θ_k)`` over candidates ``thetas`` (k, P) (or one (P,)), float32 (z, y, x)."""
    out = np.empty(volume.shape, dtype=np.float32)
    thetas = torch.as_tensor(np.asarray(thetas), dtype=torch.float32)
    thetas = thetas[None] if thetas.ndim == 1 else thetas
    mean_t = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
    std_t = torch.as_tensor(np.asarray(std), dtype=torch.float32)
    for z0, z1, feats in iter_feature_chunks(volume, features, device=device):
        dev = feats.device
        rows = design_rows(feats.reshape(feats.shape[0], -1).T, mean_t.to(dev), std_t.to(dev))
        probs = torch.sigmoid(rows @ thetas.to(dev).T).mean(dim=1)
        out[z0:z1] = probs.reshape(feats.shape[1:]).cpu().numpy()
    return out


def _window_weights(patch: int) -> torch.Tensor:
    """Separable Gaussian blending weights (σ = patch/4), shape (p, p, p)."""
    t = torch.arange(patch, dtype=torch.float32) - (patch - 1) / 2
    g = torch.exp(-0.5 * (t / (patch / 4)) ** 2)
    return (g[:, None, None] * g[None, :, None] * g[None, None, :]).clamp_min(1e-3)


def _starts(size: int, patch: int, stride: int) -> list[int]:
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch, stride)) + [size - patch]
    return sorted(set(starts))


def sliding_window(
    volume: np.ndarray,
    network: Callable[[torch.Tensor], torch.Tensor],
    *,
    patch: int,
    overlap: float = 0.5,
    flip_tta: bool = False,
    device: torch.device | None = None,
    batch: int = 0,
) -> np.ndarray:
    """Probability map of a 3-D network over overlapping windows, float32 (z, y, x).

    ``network`` maps a (1, 1, p, p, p) float tensor (the :func:`normalised`
    volume) to logits of the same spatial shape. Windows are blended with
    Gaussian weights; a volume smaller than ``patch`` along an axis is
    edge-padded. With ``flip_tta`` the logits are averaged over the 8 axis flips.
    On a GPU the network runs in fp16 (autocast); logits are accumulated in float32.
    Windows go through the network ``batch`` at a time; 0 sizes the batch from
    the free memory of ``device`` (a tenth of it, at ~64 float32 activations per
    window voxel), between 1 and 16.
    """
    device = device or torch.device("cpu")
    image = torch.from_numpy(normalised(volume))
    pads = [max(0, patch - s) for s in image.shape]
    if any(pads):
        image = torch.nn.functional.pad(image[None, None], (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")[0, 0]
    shape = image.shape
    acc = torch.zeros(shape, dtype=torch.float32)
    norm = torch.zeros(shape, dtype=torch.float32)
    weights = _window_weights(patch)
    stride = max(1, int(round(patch * (1 - overlap))))
    flips: Sequence[tuple[int, ...]] = [f for r in range(4) for f in itertools.combinations((2, 3, 4), r)] if flip_tta else [()]
    positions = list(itertools.product(*(_starts(s, patch, stride) for s in shape)))
    if batch <= 0:
        batch = int(np.clip(0.1 * free_memory(device) // (64 * 4 * patch**3), 1, 16))
    # fp16 on a GPU (half the memory and several times the tensor-core throughput); float32 on a CPU
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for first in range(0, len(positions), batch):
            chunk = positions[first : first + batch]
            windows = torch.stack([image[z : z + patch, y : y + patch, x : x + patch] for z, y, x in chunk])[:, None].to(device)
            logits = torch.zeros_like(windows)
            for axes in flips:
                out = network(windows.flip(axes) if axes else windows).float()
                logits += out.flip(axes) if axes else out
            probs = torch.sigmoid(logits / len(flips))[:, 0].cpu()
            for (z, y, x), window_prob in zip(chunk, probs):
                acc[z : z + patch, y : y + patch, x : x + patch] += window_prob * weights
                norm[z : z + patch, y : y + patch, x : x + patch] += weights
    prob = (acc / norm).numpy()
    return np.ascontiguousarray(prob[: volume.shape[0], : volume.shape[1], : volume.shape[2]])


# ----------------------------------------------------------------------------- post-processing


@dataclass(frozen=True)
class PostParams:
    """How a probability map becomes a mask (chosen on validation)."""

    high: float = 0.7
    low: float = 0.5
    min_component: int = 64
    fill_holes: bool = True
    closing: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def postprocess(prob: np.ndarray, params: PostParams, config: SegmentConfig) -> tuple[np.ndarray, dict[str, float]]:
    """Probability map (z, y, x) → uint8 {0, 1} mask, with the ratios that decided it."""
    mask = apply_hysteresis_threshold(prob, params.low, params.high)
    hysteresis_ratio = float(mask.mean())
    fallback = hysteresis_ratio < config.min_ratio
    if fallback:
        cut = float(np.percentile(prob, 100.0 - config.fallback_percent))
        mask = prob >= cut
    if params.closing > 0:
        mask = ndimage.binary_closing(mask, structure=ndimage.generate_binary_structure(3, 1), iterations=params.closing)
    if params.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    mask = remove_small_components(mask, params.min_component)
    return mask, {"hysteresis_ratio": hysteresis_ratio, "fallback": fallback, "final_ratio": float(mask.mean())}


def postprocess_grid(config: SegmentConfig) -> Iterable[PostParams]:
    """The parameter combinations tried on validation volumes, the plain 0.5 threshold first (what remains when time allows no other).

    Three upper thresholds, each as a single threshold and as hysteresis; hole
    filling off and on (it can glue touching sheets); then a larger minimum
    component and a closing on the plain threshold. A step of the clean-up is thus
    kept only where it scores better on validation.
    """
    base = config.min_component_voxels
    for high in (0.5, 0.7, 0.9):
        for low in sorted({high, round(high - 0.3, 2)}, reverse=True):
            for fill_holes in (False, True):
                yield PostParams(high=high, low=low, min_component=base, fill_holes=fill_holes)
    yield PostParams(high=0.5, low=0.5, min_component=4 * base, fill_holes=False)
    yield PostParams(high=0.5, low=0.5, min_component=base, fill_holes=False, closing=1)


def plain_params(config: SegmentConfig) -> PostParams:
    """The grid's first point, the plain 0.5 threshold: what a source gets when nothing was tuned."""
    return next(iter(postprocess_grid(config)))


def tune_postprocess(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], config: SegmentConfig, *, keep_going: Callable[[int], bool] = lambda _i: True
) -> tuple[PostParams, float, int]:
    """Best :class:`PostParams` over (probability, label) validation pairs, its mean competition score, and the grid points tried.

    ``keep_going(i)`` is asked before grid point ``i > 0``: the caller cuts the grid
    to the time it grants (the first point is always scored).
    """
    best, best_score, tried = PostParams(), -math.inf, 0
    for i, params in enumerate(postprocess_grid(config)):
        if i > 0 and not keep_going(i):
            break
        score = float(np.mean([score_volume(postprocess(prob, params, config)[0], label).score for prob, label in pairs]))
        tried += 1
        if score > best_score + 1e-12:
            best, best_score = params, score
    return best, best_score, tried


#: Ties (and missing validation) favour the more trained model.
PREFERENCE = (STUDENT, ENSEMBLE, SEARCH_MODEL, BASELINE)


@dataclass(frozen=True)
class SegmenterChoice:
    """Which segmenter goes on the test volumes, and why."""

    chosen: str
    predicted_test_seconds: dict[str, float]
    excluded_for_time: list[str]


def choose_segmenter(
    names: Sequence[str],
    scores: Mapping[str, float],
    seconds_per_voxel: Mapping[str, float],
    *,
    test_voxels: int,
    safety: float,
    time_left: float,
) -> SegmenterChoice:
    """The best-scoring segmenter whose predicted cost on the test volumes fits the time left.

    Parameters
    ----------
    names : sequence of str
        Candidate segmenters (names of :data:`PREFERENCE`).
    scores : mapping name → float
        Validation score (absent: never validated, ranks last).
    seconds_per_voxel : mapping name → float
        Measured cost on the validation volumes (absent: free).
    test_voxels : int
        Voxels to segment.
    safety : float
        Factor on the predicted cost.
    time_left : float
        Seconds available (``inf`` when unlimited).

    When nothing fits, the baseline (or else the cheapest) is chosen: a submission
    must exist before the deadline.
    """
    predicted = {k: v * test_voxels * safety for k, v in seconds_per_voxel.items()}
    feasible = [k for k in names if predicted.get(k, 0.0) <= time_left]
    if not feasible:
        feasible = [BASELINE if BASELINE in names else min(names, key=lambda k: predicted.get(k, 0.0))]
    chosen = max(feasible, key=lambda k: (scores.get(k, -1.0), -PREFERENCE.index(k)))
    return SegmenterChoice(chosen, predicted, sorted(set(names) - set(feasible)))
