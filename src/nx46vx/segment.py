"""Phase 6: turn test volumes into {0, 1} surface masks.

Two segmenters, both pure functions of a volume:

* ``intensity_baseline`` — Gaussian-smoothed intensity, Otsu threshold, then
  removal of 26-connected components under ``min_component_voxels``. Needs no
  training; used when no search model exists.
* ``search_model`` — the best search candidate's probability map
  ``σ(φ·θ)`` computed chunk by chunk from the feature bank, thresholded at the
  candidate's validation threshold, same small-component clean-up.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu

from .config import FeatureConfig, SegmentConfig
from .features import iter_feature_chunks
from .search.engine import design_rows

BASELINE = "intensity_baseline"
SEARCH_MODEL = "search_model"


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 26-connected components smaller than ``min_voxels``; uint8 {0, 1}, shape as ``mask``."""
    if min_voxels <= 1 or not mask.any():
        return mask.astype(np.uint8)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
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


def model_probability(volume: np.ndarray, model: dict[str, Any], features: FeatureConfig, *, device: torch.device | None = None) -> np.ndarray:
    """Probability map of a search model, float32 (z, y, x), computed per feature chunk.

    ``model`` holds ``theta`` (P,), ``mean`` and ``std`` (C,) as returned by
    :meth:`nx46vx.search.CandidateSearch.best_model`.
    """
    out = np.empty(volume.shape, dtype=np.float32)
    theta = torch.as_tensor(model["theta"], dtype=torch.float32)
    mean = torch.as_tensor(np.asarray(model["mean"]), dtype=torch.float32)
    std = torch.as_tensor(np.asarray(model["std"]), dtype=torch.float32)
    for z0, z1, feats in iter_feature_chunks(volume, features, device=device):
        dev = feats.device
        rows = feats.reshape(feats.shape[0], -1).T
        logits = design_rows(rows, mean.to(dev), std.to(dev)) @ theta.to(dev)
        out[z0:z1] = torch.sigmoid(logits).reshape(feats.shape[1:]).cpu().numpy()
    return out


def model_mask(
    volume: np.ndarray, model: dict[str, Any], features: FeatureConfig, config: SegmentConfig, *, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Search-model mask, uint8 {0, 1}, and its probability map, float32, both shape (z, y, x)."""
    prob = model_probability(volume, model, features, device=device)
    return remove_small_components(prob >= float(model["threshold"]), config.min_component_voxels), prob
