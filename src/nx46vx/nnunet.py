"""nnU-Net v2 trained-model folders in and out: loaded without running code from the input, predicted as nnU-Net
predicts, and written (:func:`write_folder`) so that nnU-Net predicts with a student of this package.

A folder as nnU-Net writes it (``<results>/DatasetXXX/<trainer>__<plans>__<configuration>/``):
``plans.json``, ``dataset.json`` and ``fold_<k>/checkpoint_final.pth`` (or ``checkpoint_best.pth``)
for one or more folds, whose predictions are averaged.

Nothing in the folder runs: the checkpoint is read by ``torch.load(weights_only=True)`` with
only the plain types an nnU-Net checkpoint holds allowed (:data:`SAFE_GLOBALS`: numpy scalars
and dtypes, beside what torch allows itself); anything else is refused with
:class:`~nx46vx.errors.ModelFolderError`, never loaded another way. The network is built from
the plans by name from :data:`ARCHITECTURES` and :data:`OPERATIONS` (the classes of
``dynamic-network-architectures`` and torch that nnU-Net's plans name), never by importing a
name the plans give.

Prediction follows ``nnUNetPredictor.predict_single_npy_array`` on a CPU: the plans' axis
transpose, cropping to the nonzero region, the configuration's intensity normalisation, a
sliding window at the plans' patch size with step ``tile_step`` (nnU-Net's 0.5), Gaussian
weights (σ = patch / 8, peak 10) accumulated in float16 as nnU-Net does, mirroring over the
checkpoint's allowed axes when asked, softmax over the segmentation heads; outside the crop
the probability is 0. Only volumes at the plans' spacing are supported (the competition's
voxels are isotropic: spacing 1), so nothing is resampled.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes, gaussian_filter
from torch import nn

from .atomic import fsync_dir, write_atomic, write_json_atomic
from .errors import DependencyError, ModelFolderError
from .segment import INTENSITY_SCHEMES, PERCENTILE, Intensity
from .volumes import file_sha256

#: The checkpoint names nnU-Net writes, in the order one is taken per fold.
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
#: Intensity normalisations understood (nnU-Net's default schemes a CT model uses).
NORMALISATIONS = tuple(s for s in INTENSITY_SCHEMES if s != PERCENTILE.scheme)


#: The network library and version this package builds its U-Nets with (installed without its declared timm, README).
NETWORK_LIBRARY = "dynamic-network-architectures==0.4.4"
_UNETS = "dynamic_network_architectures.architectures.unet"
#: What a plans file's ``network_class_name`` starts with for the U-Nets this package builds.
ARCHITECTURE_PREFIX = f"{_UNETS}."
#: The network classes a plans file may name (nnU-Net v2's own, from dynamic-network-architectures).
ARCHITECTURES = tuple(f"{ARCHITECTURE_PREFIX}{name}" for name in ("PlainConvUNet", "ResidualEncoderUNet"))


def _architectures() -> dict[str, type[nn.Module]]:
    """:data:`ARCHITECTURES` by name → class; raises :class:`DependencyError` without dynamic-network-architectures."""
    import importlib

    try:
        module = importlib.import_module(_UNETS)
    except ModuleNotFoundError:
        raise DependencyError("nnU-Net's network library is not installed", expected="dynamic-network-architectures", found="no module dynamic_network_architectures",
                              hint=f'python3 -m pip install --no-deps "{NETWORK_LIBRARY}" (its U-Nets need torch and numpy only)') from None
    return {name: getattr(module, name.rpartition(".")[2]) for name in ARCHITECTURES}


#: The torch classes a plans file's ``_kw_requires_import`` arguments may name.
OPERATIONS: dict[str, type[nn.Module]] = {
    f"{module}.{cls.__name__}": cls
    for cls, modules in (
        (nn.Conv3d, ("torch.nn", "torch.nn.modules.conv")),
        (nn.InstanceNorm3d, ("torch.nn", "torch.nn.modules.instancenorm")),
        (nn.BatchNorm3d, ("torch.nn", "torch.nn.modules.batchnorm")),
        (nn.Dropout3d, ("torch.nn", "torch.nn.modules.dropout")),
        (nn.LeakyReLU, ("torch.nn", "torch.nn.modules.activation")),
        (nn.ReLU, ("torch.nn", "torch.nn.modules.activation")),
        (nn.GELU, ("torch.nn", "torch.nn.modules.activation")),
    )
    for module in modules
}


def _numpy_scalar_reconstructor() -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved it
    return core.multiarray.scalar


#: What an nnU-Net checkpoint holds beyond torch's own allow-list: numpy scalars (its training log) and their dtypes.
SAFE_GLOBALS = [_numpy_scalar_reconstructor(), np.dtype, *(type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_))]


@dataclass
class NnUNetModel:
    """A loaded nnU-Net model: its network (eval mode), one state dict per fold and what prediction needs from the plans.

    ``intensity``: the foreground intensity properties of channel 0 (``CTNormalization``);
    ``mirror_axes``: the spatial axes the checkpoint allows mirroring over; ``sha256``: a
    digest of the plans, dataset and checkpoint files (what the teacher's cache is keyed by);
    ``architecture``: the plans' network description; ``fold_names``: the folds loaded (``0``, ``all``, …).
    """

    network: nn.Module
    folds: list[dict[str, torch.Tensor]]
    patch: tuple[int, int, int]
    transpose_forward: tuple[int, int, int]
    transpose_backward: tuple[int, int, int]
    normalization: str
    use_mask_for_norm: bool
    intensity: dict[str, float]
    mirror_axes: tuple[int, ...]
    heads: int
    surface_head: int
    sha256: str
    architecture: dict[str, Any]
    folder: Path
    fold_names: tuple[str, ...]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFolderError("nnU-Net model folder lacks a file", path=path, expected=path.name, found="nothing") from None
    except (OSError, ValueError) as exc:
        raise ModelFolderError("nnU-Net model file is not JSON", path=path, expected="JSON", found=str(exc)) from None
    if not isinstance(data, dict):
        raise ModelFolderError("nnU-Net model file is not a JSON object", path=path, expected="an object", found=type(data).__name__)
    return data


def load_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint read with ``weights_only=True`` and :data:`SAFE_GLOBALS`; any other object is refused, unloaded."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError names the global it refused: the message says which
        named = re.search(r"GLOBAL (\S+)", str(exc))
        refused = f"the global {named.group(1)}" if named else f"{type(exc).__name__}: {str(exc)[-300:]}"
        raise ModelFolderError("nnU-Net checkpoint refused: it holds more than weights and plain data", path=path,
                               expected="tensors, plain data and numpy scalars (weights_only)", found=refused,
                               hint="nothing from it was run; use a checkpoint written by nnU-Net itself") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise ModelFolderError("not an nnU-Net checkpoint", path=path, expected="a dict with network_weights", found=type(checkpoint).__name__)
    return checkpoint


def _fold_checkpoints(folder: Path, fold: str | None = None) -> list[Path]:
    """The checkpoint of every trained fold (name order), or of ``fold`` only."""
    paths = []
    for directory in sorted(p for p in folder.glob("fold_*") if p.is_dir() and (fold is None or p.name == f"fold_{fold}")):
        found = next((directory / name for name in CHECKPOINT_NAMES if (directory / name).is_file()), None)
        if found is not None:
            paths.append(found)
    if not paths:
        which = "fold_<k>" if fold is None else f"fold_{fold}"
        raise ModelFolderError(f"nnU-Net model folder has no trained {which}", path=folder, expected=f"{which}/{' or '.join(CHECKPOINT_NAMES)}", found="none")
    return paths


def network_from_architecture(description: dict[str, Any], *, input_channels: int, heads: int, deep_supervision: bool = False, path: Path | None = None) -> nn.Module:
    """The network a plans ``architecture`` entry describes, from :data:`ARCHITECTURES` and :data:`OPERATIONS` only.

    ``description`` holds ``network_class_name``, ``arch_kwargs`` and
    ``_kw_requires_import`` (the arguments naming torch classes); ``path`` is the
    plans file it came from, named by a refusal (:class:`ModelFolderError`).
    """
    try:
        name, kwargs, imports = description["network_class_name"], dict(description["arch_kwargs"]), list(description["_kw_requires_import"])
    except (KeyError, TypeError) as exc:
        raise ModelFolderError("plans lack the configuration's architecture", path=path, expected="network_class_name, arch_kwargs, _kw_requires_import", found=f"missing {exc}") from None
    classes = _architectures()
    if name not in classes:
        raise ModelFolderError("plans name a network this package does not build", path=path, expected=" or ".join(ARCHITECTURES), found=name)
    for key in imports:
        if kwargs.get(key) is not None:
            if kwargs[key] not in OPERATIONS:
                raise ModelFolderError(f"plans name an operation outside the allowed ones for {key}", path=path, expected=sorted(OPERATIONS), found=kwargs[key])
            kwargs[key] = OPERATIONS[kwargs[key]]
    try:
        return classes[name](input_channels=input_channels, num_classes=heads, deep_supervision=deep_supervision, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelFolderError("plans' network arguments do not build a network", path=path, expected=f"the arguments of {name}", found=str(exc)[:300]) from None


def plans_architecture(plans: dict[str, Any], configuration: str, *, path: Path) -> dict[str, Any]:
    """The ``architecture`` entry of ``configuration`` in a plans file; raises :class:`ModelFolderError`."""
    try:
        description = plans["configurations"][configuration]["architecture"]
    except (KeyError, TypeError) as exc:
        raise ModelFolderError("plans lack the configuration's architecture", path=path, expected=f"configurations.{configuration}.architecture", found=f"missing {exc}") from None
    if not isinstance(description, dict):
        raise ModelFolderError("plans' architecture is not an object", path=path, expected="an object", found=type(description).__name__)
    return description


def load_model(folder: str | Path, *, fold: str | None = None) -> NnUNetModel:
    """Load an nnU-Net v2 model folder (every trained fold, or ``fold`` only: ``0``, ``all``, …) for :func:`probability`;
    raises :class:`ModelFolderError`."""
    folder = Path(folder)
    plans, dataset = _read_json(folder / "plans.json"), _read_json(folder / "dataset.json")
    paths = _fold_checkpoints(folder, fold)
    checkpoints = [load_checkpoint(p) for p in paths]
    first = checkpoints[0]
    configuration = str(first.get("init_args", {}).get("configuration", "3d_fullres"))
    config = plans.get("configurations", {}).get(configuration)
    if not isinstance(config, dict):
        raise ModelFolderError("plans lack the checkpoint's configuration", path=folder / "plans.json", expected=configuration, found=sorted(plans.get("configurations", {})))
    labels = dataset.get("labels", {})
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise ModelFolderError("region-based nnU-Net models are not supported", path=folder / "dataset.json", expected="one value per label", found=labels)
    values = sorted(int(v) for k, v in labels.items() if k != "ignore")  # nnU-Net's ignore label is no segmentation head
    if 1 not in values:
        raise ModelFolderError("the model has no label 1 (the surface)", path=folder / "dataset.json", expected="labels with value 1", found=labels)
    channels = len(dataset.get("channel_names", dataset.get("modality", {"0": ""})))
    if channels != 1:
        raise ModelFolderError("the model needs more than one input channel", path=folder / "dataset.json", expected="1 channel (CT)", found=channels)
    spacing = [float(s) for s in config.get("spacing", [1.0, 1.0, 1.0])]
    if any(abs(s - 1.0) > 1e-6 for s in spacing):
        raise ModelFolderError("the model's spacing would need resampling", path=folder / "plans.json", expected="spacing [1, 1, 1]", found=spacing)
    schemes = config.get("normalization_schemes", ["ZScoreNormalization"])
    if schemes[0] not in NORMALISATIONS:
        raise ModelFolderError("unknown intensity normalisation", path=folder / "plans.json", expected=" or ".join(NORMALISATIONS), found=schemes[0])
    architecture = plans_architecture(plans, configuration, path=folder / "plans.json")
    network = network_from_architecture(architecture, input_channels=1, heads=len(values), path=folder / "plans.json").eval()
    folds = [c["network_weights"] for c in checkpoints]
    for path, weights in zip(paths, folds):
        try:
            network.load_state_dict(weights)
        except RuntimeError as exc:
            raise ModelFolderError("checkpoint weights do not fit the plans' network", path=path, expected="the plans' architecture", found=str(exc)[:300]) from None
    digest = hashlib.sha256()
    for path in [folder / "plans.json", folder / "dataset.json", *paths]:
        digest.update(bytes.fromhex(file_sha256(path)))
    return NnUNetModel(
        network=network, folds=folds, patch=tuple(int(p) for p in config["patch_size"]),
        transpose_forward=tuple(plans.get("transpose_forward", (0, 1, 2))), transpose_backward=tuple(plans.get("transpose_backward", (0, 1, 2))),
        normalization=schemes[0], use_mask_for_norm=bool(config.get("use_mask_for_norm", [False])[0]),
        intensity={k: float(v) for k, v in plans.get("foreground_intensity_properties_per_channel", {}).get("0", {}).items()},
        mirror_axes=tuple(int(a) for a in (first.get("inference_allowed_mirroring_axes") or ())), heads=len(values), surface_head=values.index(1),
        sha256=digest.hexdigest(), architecture=architecture, folder=folder, fold_names=tuple(p.parent.name.removeprefix("fold_") for p in paths),
    )


def load_initial(path: str | Path) -> NnUNetModel:
    """The model a student starts from: ``<model folder>`` (its first trained fold) or ``<model folder>/fold_<k>``."""
    path = Path(path)
    if path.name.startswith("fold_") and (path.parent / "plans.json").is_file():
        return load_model(path.parent, fold=path.name.removeprefix("fold_"))
    if not (path / "plans.json").is_file():
        return load_model(path)  # its error names what is missing
    return load_model(path, fold=_fold_checkpoints(path)[0].parent.name.removeprefix("fold_"))


def network_differences(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """The arguments two plans ``architecture`` entries differ in (``network_class_name`` included; operations
    compared by the class they name); empty when they build the same network."""

    def resolved(description: dict[str, Any]) -> dict[str, Any]:
        kwargs = {k: OPERATIONS.get(v, v) if isinstance(v, str) else v for k, v in dict(description.get("arch_kwargs", {})).items()}
        return {"network_class_name": description.get("network_class_name"), **json.loads(json.dumps(kwargs, default=lambda c: f"{c.__module__}.{c.__name__}"))}

    a, b = resolved(first), resolved(second)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ----------------------------------------------------------------------------- prediction, as nnUNetPredictor does it


def input_intensity(model: NnUNetModel) -> Intensity:
    """The model's intensity normalisation as an :class:`~nx46vx.segment.Intensity` (what a student started from it is fed)."""
    if model.normalization == "CTNormalization":
        props = model.intensity
        return Intensity(model.normalization, mean=float(props["mean"]), std=float(props["std"]), lower=float(props["percentile_00_5"]), upper=float(props["percentile_99_5"]))
    return Intensity(model.normalization)


def _normalised(data: np.ndarray, inside: np.ndarray, model: NnUNetModel) -> np.ndarray:
    """Channel 0 of ``data`` (float32, cropped) normalised by the model's scheme; ``inside``: the nonzero mask (``use_mask_for_norm``)."""
    image = data[0]
    if model.normalization == "ZScoreNormalization" and model.use_mask_for_norm:
        image[inside] = (image[inside] - image[inside].mean()) / max(image[inside].std(), 1e-8)
    else:
        intensity = input_intensity(model)
        data[0] = intensity.apply(image, intensity.bounds(image))
    return data


def _nonzero_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of ``mask`` (the whole volume when it is empty), half open."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, mask.shape[axis]))
    return tuple(box)


def _steps(size: int, patch: int, tile_step: float) -> list[int]:
    """Window starts along one axis, nnU-Net's ``compute_steps_for_sliding_window``."""
    n = int(np.ceil((size - patch) / (patch * tile_step))) + 1
    step = (size - patch) / (n - 1) if n > 1 else 0.0
    return [int(np.round(step * i)) for i in range(n)]


def gaussian_weights(patch: Sequence[int], *, device: torch.device) -> torch.Tensor:
    """nnU-Net's window weights: a Gaussian of σ = patch / 8 peaking at 10, in float16, no zero."""
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    weights = gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    weights /= np.max(weights) / 10
    out = torch.from_numpy(weights).to(device=device, dtype=torch.float16)
    out[out == 0] = torch.min(out[out != 0])
    return out


def _mirrored(network: nn.Module, x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """The network's logits averaged over every flip combination of ``axes`` (spatial axes 0..2)."""
    prediction = network(x)
    combinations = [c for i in range(len(axes)) for c in itertools.combinations([a + 2 for a in axes], i + 1)]
    for flip in combinations:
        prediction += torch.flip(network(torch.flip(x, flip)), flip)
    return prediction / (len(combinations) + 1) if combinations else prediction


@torch.inference_mode()
def _logits(model: NnUNetModel, data: torch.Tensor, *, tile_step: float, mirror: bool, device: torch.device) -> torch.Tensor:
    """Sliding-window logits of every fold (their mean), float16 (heads, z, y, x), over the padded ``data`` (1, z, y, x)."""
    starts = [_steps(s, p, tile_step) for s, p in zip(data.shape[1:], model.patch)]
    weights = gaussian_weights(model.patch, device=torch.device("cpu"))
    network = model.network.to(device)
    # nnUNetPredictor runs the network in float16 autocast on a GPU, in float32 on a CPU
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    total = None
    for state in model.folds:
        network.load_state_dict(state)
        logits = torch.zeros((model.heads, *data.shape[1:]), dtype=torch.half)
        counts = torch.zeros(data.shape[1:], dtype=torch.half)
        for corner in itertools.product(*starts):
            box = tuple(slice(c, c + p) for c, p in zip(corner, model.patch))
            window = data[(slice(None), *box)][None].contiguous().to(device)
            with autocast:
                prediction = _mirrored(network, window, model.mirror_axes if mirror else ())[0].to("cpu")
            prediction *= weights
            logits[(slice(None), *box)] += prediction
            counts[box] += weights
        torch.div(logits, counts, out=logits)
        total = logits if total is None else total + logits
    return total / len(model.folds) if len(model.folds) > 1 else total


def probability(model: NnUNetModel, volume: np.ndarray, *, mirror: bool = False, tile_step: float = 0.5,
                device: torch.device | None = None) -> np.ndarray:
    """The model's probability of label 1 (the surface), float32 of ``volume``'s shape (z, y, x).

    ``mirror``: average over the flips of the checkpoint's allowed axes (nnU-Net's
    mirroring); ``tile_step``: window step as a fraction of the patch.
    """
    device = device or torch.device("cpu")
    data = volume.astype(np.float32)[None].transpose([0, *[a + 1 for a in model.transpose_forward]])
    nonzero = binary_fill_holes(data[0] != 0)
    box = _nonzero_box(nonzero)
    cropped = np.ascontiguousarray(data[(slice(None), *box)])
    cropped = _normalised(cropped, nonzero[box], model)
    shape = cropped.shape[1:]
    pads = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for s, p in zip(shape, model.patch)]
    padded = torch.nn.functional.pad(torch.from_numpy(cropped), [v for pair in reversed(pads) for v in pair], "constant", 0.0)
    logits = _logits(model, padded, tile_step=tile_step, mirror=mirror, device=device)
    logits = logits[(slice(None), *(slice(lo, lo + s) for (lo, _), s in zip(pads, shape)))]
    surface = torch.softmax(logits.float(), 0)[model.surface_head].numpy()
    out = np.zeros(data.shape[1:], np.float32)
    out[box] = surface
    return np.ascontiguousarray(out.transpose(model.transpose_backward))


# ----------------------------------------------------------------------------- a model out: an nnU-Net folder

#: The labels of an exported model: the competition's (nnU-Net's ignore label is the unannotated 2).
EXPORT_LABELS = {"background": 0, "surface": 1, "ignore": 2}
#: The configuration and trainer an exported folder names (nnUNetPredictor builds the network through the trainer's class).
EXPORT_CONFIGURATION, EXPORT_TRAINER, EXPORT_PLANS = "3d_fullres", "nnUNetTrainer", "nnUNetPlans"


def intensity_properties(intensity: Intensity) -> dict[str, float]:
    """Channel 0's ``foreground_intensity_properties`` that ``intensity`` needs (CT's dataset statistics; none for a per-volume scheme)."""
    if intensity.scheme != "CTNormalization":
        return {}
    return {"mean": float(intensity.mean), "std": float(intensity.std), "percentile_00_5": float(intensity.lower), "percentile_99_5": float(intensity.upper)}


def model_of(architecture: dict[str, Any], weights: dict[str, torch.Tensor], *, patch: Sequence[int], intensity: Intensity,
             mirror_axes: Sequence[int] = (0, 1, 2), folder: Path) -> NnUNetModel:
    """A two-class model (background, surface) of one fold ``all`` held in memory: what :func:`probability` predicts with
    and :func:`write_folder` writes. ``weights``: nnU-Net ``network_weights`` (2 output channels per head); ``folder``: where it came from."""
    network = network_from_architecture(architecture, input_channels=1, heads=2).eval()
    network.load_state_dict(weights)
    digest = hashlib.sha256()
    for key, value in weights.items():
        digest.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return NnUNetModel(
        network=network, folds=[weights], patch=tuple(int(p) for p in patch), transpose_forward=(0, 1, 2), transpose_backward=(0, 1, 2),
        normalization=intensity.scheme, use_mask_for_norm=False, intensity=intensity_properties(intensity), mirror_axes=tuple(int(a) for a in mirror_axes),
        heads=2, surface_head=1, sha256=digest.hexdigest(), architecture=architecture, folder=folder, fold_names=("all",),
    )


def _folder_files(model: NnUNetModel, *, batch: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``plans.json``, ``dataset.json`` and the ``checkpoint_final.pth`` contents of ``model`` in nnU-Net v2's layout."""
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    patch = list(model.patch)
    configuration = {
        "data_identifier": f"{EXPORT_PLANS}_{EXPORT_CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor", "batch_size": batch, "patch_size": patch,
        "median_image_size_in_voxels": patch, "spacing": [1.0, 1.0, 1.0], "normalization_schemes": [model.normalization], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": dict(resampling, is_seg=True, order=1), "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": dict(resampling, order=1), "architecture": model.architecture, "batch_dice": False,
    }
    plans = {
        "dataset_name": "Dataset001_VesuviusSurface", "plans_name": EXPORT_PLANS, "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": patch, "image_reader_writer": "Tiff3DIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {EXPORT_CONFIGURATION: configuration}, "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(model.intensity)},
    }
    dataset = {"channel_names": {"0": "CT"}, "labels": EXPORT_LABELS, "numTraining": 0, "file_ending": ".tif"}
    checkpoint = {
        "network_weights": {k: v.detach().cpu().contiguous() for k, v in model.folds[0].items()},
        "init_args": {"plans": plans, "configuration": EXPORT_CONFIGURATION, "fold": "all", "dataset_json": dataset},
        "trainer_name": EXPORT_TRAINER, "inference_allowed_mirroring_axes": tuple(model.mirror_axes),
    }
    return plans, dataset, checkpoint


def write_folder(folder: str | Path, model: NnUNetModel, *, batch: int = 2) -> Path:
    """Write ``model`` (:func:`model_of`) as an nnU-Net v2 trained-model folder: ``plans.json``, ``dataset.json``,
    ``fold_all/checkpoint_final.pth``, which ``nnUNetv2_predict_from_modelfolder -m FOLDER -f all`` predicts with.

    The folder is written whole under a temporary name and renamed into place (an earlier
    export there is replaced only then; any other non-empty folder is refused). Raises
    :class:`ModelFolderError` for that, and for a model normalised by a scheme nnU-Net
    does not have (this package's ``percentile``).
    """
    folder = Path(folder)
    if model.normalization not in NORMALISATIONS:
        raise ModelFolderError("nnU-Net has no scheme for the model's intensity normalisation", path=model.folder,
                               expected=" or ".join(NORMALISATIONS), found=model.normalization,
                               hint='train the student with distill.normalization = "ZScoreNormalization" (or start it from an nnU-Net model)')
    if folder.exists() and any(folder.iterdir()) and not ((folder / "plans.json").is_file() and (folder / "dataset.json").is_file()):
        raise ModelFolderError("refusing to replace a folder that is not an nnU-Net model folder", path=folder,
                               expected="a new or empty folder, or an earlier export (plans.json, dataset.json)", found=sorted(p.name for p in folder.iterdir())[:5])
    plans, dataset, checkpoint = _folder_files(model, batch=batch)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_json_atomic(partial / "plans.json", plans)
        write_json_atomic(partial / "dataset.json", dataset)
        (partial / "fold_all").mkdir()
        write_atomic(partial / "fold_all" / "checkpoint_final.pth", lambda f: torch.save(checkpoint, f))
        fsync_dir(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    previous = folder.with_name(f".{folder.name}.replaced") if folder.exists() else None
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
    partial.rename(folder)
    fsync_dir(folder.parent)
    if previous is not None:
        shutil.rmtree(previous)
    return folder
