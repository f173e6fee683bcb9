"""Use a trained student outside a run: ``nx46vx.predict(volume or path, model=OUTPUT_OR_CHECKPOINT)``.

The checkpoint holds the student's best weights and its settings (JSON + safetensors,
nothing executed), the run's segment settings (its manifest's signature) and the
segmentation phase's post-processing parameters when the student was the chosen
segmenter; otherwise the run's plain parameters cut the map. On a test volume of a
finished run whose chosen segmenter was the student, the mask is the run's, bit for bit
(on the run's device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import DistillConfig, FeatureConfig, SegmentConfig
from .distill import saved_intensity
from .errors import CheckpointError
from .features import resolve_device
from .segment import STUDENT, PostParams, plain_params, postprocess, probability, sliding_window
from .student import build_network
from .volumes import read_volume


@dataclass(frozen=True)
class Prediction:
    """``probability`` float32 (z, y, x) in [0, 1] and ``mask`` uint8 (z, y, x) in {0, 1}."""

    probability: np.ndarray
    mask: np.ndarray


def _checkpoint(model: str | os.PathLike[str]) -> Path:
    """The newest committed checkpoint of an output folder (or ``model`` itself when it is one)."""
    path = Path(model)
    if (path / ckpt.MANIFEST).is_file():
        return path
    latest = ckpt.latest_committed(path / "checkpoints")
    if latest is None:
        raise CheckpointError("no committed checkpoint", path=path, expected="an output folder with checkpoints/ckpt-*, or a checkpoint folder", found="none")
    return latest


def _from_dict(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name: f for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})


def predict(
    volume: np.ndarray | str | os.PathLike[str],
    *,
    model: str | os.PathLike[str],
    device: str = "auto",
    flip_tta: bool | None = None,
    overlap: float | None = None,
    window_batch: int | None = None,
) -> Prediction:
    """Probability map and mask of one volume by the student of a run.

    Parameters
    ----------
    volume : ndarray uint8 (z, y, x), or path of a TIFF
    model : path
        A run's output folder (its newest committed checkpoint) or a checkpoint folder.
    device : str
        ``auto``, ``cpu``, ``cuda``, …
    flip_tta : bool, optional
        Average over the 8 axis flips (default: the run's ``segment.flip_tta``).
    overlap : float, optional
        Sliding-window overlap (default: the run's ``segment.overlap``).
    window_batch : int, optional
        Windows per forward pass (default: the run's ``segment.window_batch``).

    Raises
    ------
    CheckpointError
        No committed checkpoint, or one without a trained student.
    """
    folder = _checkpoint(model)
    ckpt.check_integrity(folder)
    saved = ckpt.load_payload(folder, "distillation")
    if not saved or not saved.get("network"):
        raise CheckpointError("checkpoint holds no trained student", path=folder, expected="a distillation payload with a student", found="none")
    config: DistillConfig = _from_dict(DistillConfig, saved["network"])
    student = saved["student"]
    weights = student["best"]["weights"] if student.get("best") else student["student"]
    network = build_network(config.arch, width=config.width, depth=config.depth, blocks=config.blocks, prior=config.teacher_input)
    network.load_state_dict(weights)
    target = resolve_device(device)
    network = network.to(target).eval()
    image = read_volume(volume) if not isinstance(volume, np.ndarray) else volume
    prior = None
    if config.teacher_input:  # the search ensemble the student corrects, saved beside it
        ensemble = saved.get("prior")
        if not ensemble:
            raise CheckpointError("checkpoint's student takes the ensemble's map as input but holds no ensemble", path=folder, expected="a distillation payload with 'prior'", found="none")
        prior = probability(image, ensemble["thetas"], np.asarray(ensemble["mean"]), np.asarray(ensemble["std"]), _from_dict(FeatureConfig, ensemble["features"]), device=target)
    seg = _run_segment_config(folder)
    with torch.inference_mode():
        prob = sliding_window(image, network, patch=config.patch, overlap=seg.overlap if overlap is None else overlap, flip_tta=seg.flip_tta if flip_tta is None else flip_tta,
                              device=target, batch=seg.window_batch if window_batch is None else window_batch, prior=prior,
                              intensity=saved_intensity(student))
    segmentation = ckpt.load_payload(folder, "segmentation") or {}
    choice = segmentation.get("choice") or {}
    params = PostParams(**choice["params"]) if choice.get("chosen") == STUDENT and choice.get("params") else plain_params(seg)
    mask, _ = postprocess(prob, params, seg)
    return Prediction(prob, mask.astype(np.uint8))


def _run_segment_config(folder: Path) -> SegmentConfig:
    """The segment settings of the run that wrote checkpoint ``folder`` (its manifest's segmentation signature)."""
    signature = ckpt.read_manifest(folder).get("config_signature", {}).get("segmentation")
    if not isinstance(signature, dict):
        raise CheckpointError("checkpoint manifest holds no segment settings", path=folder / ckpt.MANIFEST, expected="config_signature.segmentation", found="none")
    return _from_dict(SegmentConfig, signature)
