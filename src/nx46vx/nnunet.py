"""nnU-Net v2 trained-model folders as teachers: loaded without running code from the input, predicted as nnU-Net predicts.

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

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes, gaussian_filter
from torch import nn

from .errors import ModelFolderError
from .volumes import file_sha256

#: The checkpoint names nnU-Net writes, in the order one is taken per fold.
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
#: Intensity normalisations understood (nnU-Net's default schemes a CT model uses).
NORMALISATIONS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization")


_UNETS = "dynamic_network_architectures.architectures.unet"
#: The network classes a plans file may name (nnU-Net v2's own, from dynamic-network-architectures).
ARCHITECTURES = tuple(f"{_UNETS}.{name}" for name in ("PlainConvUNet", "ResidualEncoderUNet"))


def _architectures() -> dict[str, type[nn.Module]]:
    """:data:`ARCHITECTURES` by name → class (imported on first use: the library is needed only for nnU-Net folders)."""
    import importlib

    module = importlib.import_module(_UNETS)
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
    digest of the plans, dataset and checkpoint files (what the teacher's cache is keyed by).
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


def _fold_checkpoints(folder: Path) -> list[Path]:
    paths = []
    for fold in sorted(p for p in folder.glob("fold_*") if p.is_dir()):
        found = next((fold / name for name in CHECKPOINT_NAMES if (fold / name).is_file()), None)
        if found is not None:
            paths.append(found)
    if not paths:
        raise ModelFolderError("nnU-Net model folder has no trained fold", path=folder, expected=f"fold_<k>/{' or '.join(CHECKPOINT_NAMES)}", found="none")
    return paths


def build_network(plans: dict[str, Any], configuration: str, *, input_channels: int, heads: int, path: Path) -> nn.Module:
    """The network the plans describe for ``configuration``, from :data:`ARCHITECTURES` and :data:`OPERATIONS` only."""
    try:
        arch = plans["configurations"][configuration]["architecture"]
        name, kwargs, imports = arch["network_class_name"], dict(arch["arch_kwargs"]), list(arch["_kw_requires_import"])
    except (KeyError, TypeError) as exc:
        raise ModelFolderError("plans lack the configuration's architecture", path=path, expected=f"configurations.{configuration}.architecture", found=f"missing {exc}") from None
    classes = _architectures()
    if name not in classes:
        raise ModelFolderError("plans name a network this package does not build", path=path, expected=" or ".join(ARCHITECTURES), found=name)
    for key in imports:
        if kwargs.get(key) is not None:
            if kwargs[key] not in OPERATIONS:
                raise ModelFolderError(f"plans name an operation outside the allowed ones for {key}", path=path, expected=sorted(OPERATIONS), found=kwargs[key])
            kwargs[key] = OPERATIONS[kwargs[key]]
    return classes[name](input_channels=input_channels, num_classes=heads, deep_supervision=False, **kwargs).eval()


def load_model(folder: str | Path) -> NnUNetModel:
    """Load an nnU-Net v2 model folder (every trained fold) for :func:`probability`; raises :class:`ModelFolderError`."""
    folder = Path(folder)
    plans, dataset = _read_json(folder / "plans.json"), _read_json(folder / "dataset.json")
    paths = _fold_checkpoints(folder)
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
    network = build_network(plans, configuration, input_channels=1, heads=len(values), path=folder / "plans.json")
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
        sha256=digest.hexdigest(),
    )


# ----------------------------------------------------------------------------- prediction, as nnUNetPredictor does it


def _normalised(data: np.ndarray, inside: np.ndarray, model: NnUNetModel) -> np.ndarray:
    """Channel 0 of ``data`` (float32, cropped) normalised by the model's scheme; ``inside``: the nonzero mask (``use_mask_for_norm``)."""
    image, eps = data[0], 1e-8
    if model.normalization == "ZScoreNormalization":
        if model.use_mask_for_norm:
            image[inside] = (image[inside] - image[inside].mean()) / max(image[inside].std(), eps)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
    elif model.normalization == "CTNormalization":
        props = model.intensity
        np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
        image -= props["mean"]
        image /= max(props["std"], eps)
    elif model.normalization == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
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
    total = None
    for state in model.folds:
        network.load_state_dict(state)
        logits = torch.zeros((model.heads, *data.shape[1:]), dtype=torch.half)
        counts = torch.zeros(data.shape[1:], dtype=torch.half)
        for corner in itertools.product(*starts):
            box = tuple(slice(c, c + p) for c, p in zip(corner, model.patch))
            window = data[(slice(None), *box)][None].contiguous().to(device)
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
