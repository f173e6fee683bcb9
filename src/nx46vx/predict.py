"""Use a trained student outside a run: ``nx46vx.predict(volume or path, model=OUTPUT_OR_CHECKPOINT)``, or export it
as an nnU-Net v2 model folder: ``nx46vx.export_nnunet(OUTPUT_OR_CHECKPOINT, FOLDER)``.

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
from torch import nn

from . import checkpoint as ckpt
from . import nnunet
from .config import PRECISIONS, DistillConfig, FeatureConfig, SegmentConfig
from .distill import saved_intensity, window
from .errors import CheckpointError, ConfigError, ModelFolderError
from .features import resolve_device
from .segment import STUDENT, PostParams, compute_dtype, plain_params, postprocess, probability, sliding_window
from .student import architecture, build_network, nnunet_weights
from .volumes import read_volume


#: How :func:`predict` slides the student over a volume.
INFERENCES = ("nx46vx", "nnunet")


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


def _student(model: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], DistillConfig, nn.Module]:
    """The newest committed checkpoint of ``model`` (checked), its distillation payload, the student's settings and network (its best weights)."""
    folder = _checkpoint(model)
    ckpt.check_integrity(folder)
    saved = ckpt.load_payload(folder, "distillation")
    if not saved or not saved.get("network"):
        raise CheckpointError("checkpoint holds no trained student", path=folder, expected="a distillation payload with a student", found="none")
    config: DistillConfig = _from_dict(DistillConfig, saved["network"])
    if config.precision not in PRECISIONS:
        raise CheckpointError("checkpoint's student has an unknown precision", path=folder, expected=" or ".join(PRECISIONS), found=config.precision)
    student = saved["student"]
    network = build_network(config.arch, width=config.width, depth=config.depth, blocks=config.blocks, prior=config.teacher_input)
    network.load_state_dict(student["best"]["weights"] if student.get("best") else student["student"])
    return folder, saved, config, network


def _nnunet_model(folder: Path, saved: dict[str, Any], config: DistillConfig, network: nn.Module) -> nnunet.NnUNetModel:
    """The student as a two-class nnU-Net model (:func:`nx46vx.nnunet.model_of`); one fed the ensemble's map has none."""
    if config.teacher_input:
        raise ModelFolderError("the student has no nnU-Net form: it takes the search ensemble's map as a second input", path=folder,
                               expected="a student of one input channel (distill.teacher_input = false)", found="distill.teacher_input = true")
    description = architecture(config.arch, width=config.width, depth=config.depth, blocks=config.blocks)
    return nnunet.model_of(description, nnunet_weights(network), patch=(config.patch,) * 3, intensity=saved_intensity(saved["student"]), folder=folder)


def predict(
    volume: np.ndarray | str | os.PathLike[str],
    *,
    model: str | os.PathLike[str],
    device: str = "auto",
    flip_tta: bool | None = None,
    overlap: float | None = None,
    window_batch: int | None = None,
    inference: str = "nx46vx",
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
        Windows per forward pass (default: the run's ``segment.window_batch``; ``nx46vx`` inference only).
    inference : {"nx46vx", "nnunet"}
        ``nx46vx``: the run's sliding window (probabilities blended, as the segmentation
        phase); ``nnunet``: as ``nnUNetPredictor`` predicts the student's exported folder
        (:func:`export_nnunet`: logits blended in nnU-Net's Gaussian, step ``1 − overlap``,
        mirroring when ``flip_tta``).

    Raises
    ------
    CheckpointError
        No committed checkpoint, or one without a trained student.
    ModelFolderError
        ``nnunet`` inference of a student fed the ensemble's map.
    ConfigError
        An unknown ``inference``.
    """
    if inference not in INFERENCES:
        raise ConfigError("unknown predict() inference", expected=" or ".join(INFERENCES), found=inference)
    folder, saved, config, network = _student(model)
    target = resolve_device(device)
    image = read_volume(volume) if not isinstance(volume, np.ndarray) else volume
    seg = _run_segment_config(folder)
    overlap = seg.overlap if overlap is None else overlap
    flip_tta = seg.flip_tta if flip_tta is None else flip_tta
    if inference == "nnunet":
        prob = nnunet.probability(_nnunet_model(folder, saved, config, network), image, mirror=flip_tta, tile_step=1.0 - overlap, device=target)
    else:
        prob = _sliding_window(image, folder, saved, config, network.to(target).eval(), seg, device=target, overlap=overlap, flip_tta=flip_tta,
                               window_batch=seg.window_batch if window_batch is None else window_batch)
    segmentation = ckpt.load_payload(folder, "segmentation") or {}
    choice = segmentation.get("choice") or {}
    params = PostParams(**choice["params"]) if choice.get("chosen") == STUDENT and choice.get("params") else plain_params(seg)
    mask, _ = postprocess(prob, params, seg)
    return Prediction(prob, mask.astype(np.uint8))


def _sliding_window(image: np.ndarray, folder: Path, saved: dict[str, Any], config: DistillConfig, network: nn.Module, seg: SegmentConfig, *,
                    device: torch.device, overlap: float, flip_tta: bool, window_batch: int) -> np.ndarray:
    """The student's map of ``image`` as the run's segmentation phase computes it (the ensemble's map as its second input when it takes one)."""
    prior = None
    if config.teacher_input:  # the search ensemble the student corrects, saved beside it
        ensemble = saved.get("prior")
        if not ensemble:
            raise CheckpointError("checkpoint's student takes the ensemble's map as input but holds no ensemble", path=folder, expected="a distillation payload with 'prior'", found="none")
        prior = probability(image, ensemble["thetas"], np.asarray(ensemble["mean"]), np.asarray(ensemble["std"]), _from_dict(FeatureConfig, ensemble["features"]), device=device)
    with torch.inference_mode():
        return sliding_window(image, network, patch=window(config), overlap=overlap, flip_tta=flip_tta, device=device, batch=window_batch, prior=prior,
                              intensity=saved_intensity(saved["student"]), dtype=compute_dtype(config.precision, device))


def export_nnunet(model: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Write the student of a run as an nnU-Net v2 trained-model folder; returns ``folder``.

    ``folder`` gets ``plans.json``, ``dataset.json`` and ``fold_all/checkpoint_final.pth``
    (nnU-Net's keys; two classes, the surface's logit the student's), so that
    ``nnUNetv2_predict_from_modelfolder -m FOLDER -f all`` or ``nnUNetPredictor`` predicts
    with it — the map :func:`predict` gives with ``inference="nnunet"`` — and other
    notebooks can blend it with their nnU-Net models.

    Raises
    ------
    CheckpointError
        No committed checkpoint, or one without a trained student.
    ModelFolderError
        A student fed the ensemble's map, or normalised by this package's ``percentile``
        scheme (nnU-Net has none like it: train with ``distill.normalization``).
    """
    checkpoint, saved, config, network = _student(model)
    return nnunet.write_folder(folder, _nnunet_model(checkpoint, saved, config, network), batch=config.batch)


def _run_segment_config(folder: Path) -> SegmentConfig:
    """The segment settings of the run that wrote checkpoint ``folder`` (its manifest's segmentation signature)."""
    signature = ckpt.read_manifest(folder).get("config_signature", {}).get("segmentation")
    if not isinstance(signature, dict):
        raise CheckpointError("checkpoint manifest holds no segment settings", path=folder / ckpt.MANIFEST, expected="config_signature.segmentation", found="none")
    return _from_dict(SegmentConfig, signature)
