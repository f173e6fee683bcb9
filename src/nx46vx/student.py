"""The student networks and their loss: nnU-Net v2's own U-Nets (``dynamic-network-architectures``) and the losses.

:func:`architecture` — the student's settings as an nnU-Net plans ``architecture``
entry (``ResidualEncoderUNet`` as nnU-Net's ResEnc presets configure it, or
``PlainConvUNet``): the same description builds the network here, is compared
with an nnU-Net folder's plans, and is written into an exported folder.
:class:`UNet` — that network with one output (the surface logit) and its
deep-supervision heads; ``forward`` returns the full-resolution logits (what
sliding-window inference needs), :meth:`UNet.forward_all` the coarser heads too.

:func:`label_losses` — Dice + BCE on the labels with label 2 masked out of
both, per patch and then averaged (so a batch split across data-parallel workers
gives the same gradient), and an optional skeleton-recall term for thin surfaces;
:func:`teacher_loss` — the tempered teacher term, weighted on its own.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelFolderError
from .nnunet import ARCHITECTURE_PREFIX, NnUNetModel, network_differences, network_from_architecture

_EPS = 1e-4
#: The widest stage (nnU-Net caps 3-D feature maps at 320).
MAX_FEATURES = 320
#: Extra deep-supervision heads the loss uses (the next-coarser decoder levels).
DEEP_SUPERVISION = 2


def architecture(arch: str, *, width: int, depth: int, blocks: Sequence[int]) -> dict[str, Any]:
    """The student's network as an nnU-Net v2 plans ``architecture`` entry (JSON-plain).

    Parameters
    ----------
    arch : {"resenc", "plain"}
        ``resenc``: ``ResidualEncoderUNet`` (residual blocks in the encoder, one
        convolution per decoder stage, nnU-Net's ResEnc presets); ``plain``:
        ``PlainConvUNet`` (two convolutions per stage on both sides).
    width : int
        Channels of the first stage; stage ``i`` has ``min(width·2^i, 320)``.
    depth : int
        Downsamplings (stages − 1); a patch must be a multiple of ``2**depth``.
    blocks : sequence of int
        Residual blocks per encoder stage (``depth + 1`` entries; a shorter one repeats its last); ``resenc`` only.
    """
    stages = depth + 1
    common = {
        "n_stages": stages,
        "features_per_stage": [min(width * 2**i, MAX_FEATURES) for i in range(stages)],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * stages,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * depth,
    }
    if arch == "plain":
        name, specific = "PlainConvUNet", {"n_conv_per_stage": [2] * stages, "n_conv_per_stage_decoder": [2] * depth}
    else:
        name, specific = "ResidualEncoderUNet", {"n_blocks_per_stage": [int(blocks[min(i, len(blocks) - 1)]) for i in range(stages)], "n_conv_per_stage_decoder": [1] * depth}
    kwargs = {**common, **specific, "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
              "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    return {"network_class_name": f"{ARCHITECTURE_PREFIX}{name}", "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


class UNet(nn.Module):
    """An nnU-Net v2 U-Net (:func:`architecture`) with one output channel; (B, C, p, p, p) → logits (B, 1, p, p, p).

    ``unet`` is the ``dynamic-network-architectures`` network itself (its state dict
    is an nnU-Net checkpoint's ``network_weights`` with a ``unet.`` prefix),
    initialised as nnU-Net initialises it; ``deep_supervision`` extra heads at the
    next-coarser decoder levels enter the loss. nnU-Net builds a head at every
    decoder level; those the loss does not use are frozen (they keep their initial
    or loaded weights), so every trained parameter gets a gradient (data-parallel
    training requires it).
    """

    def __init__(self, description: dict[str, Any], *, in_channels: int = 1, deep_supervision: int = DEEP_SUPERVISION) -> None:
        super().__init__()
        self.unet = network_from_architecture(description, input_channels=in_channels, heads=1, deep_supervision=deep_supervision > 0)
        self.unet.apply(self.unet.initialize)
        heads = self.unet.decoder.seg_layers
        self.deep_supervision = min(deep_supervision, len(heads) - 1)
        for head in heads[: len(heads) - 1 - self.deep_supervision]:
            head.requires_grad_(False)

    @property
    def heads(self) -> nn.ModuleList:
        """The 1×1 output convolutions, coarsest decoder level first."""
        return self.unet.decoder.seg_layers

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits at full resolution, then at each deep-supervision level (half, quarter, …)."""
        outputs = self.unet(x)
        return list(outputs[: 1 + self.deep_supervision]) if self.deep_supervision else [outputs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


def settings_of(description: dict[str, Any]) -> dict[str, Any] | None:
    """The ``distill`` settings (arch, width, depth, blocks) whose :func:`architecture` is ``description``, or None when none is."""
    kwargs = description.get("arch_kwargs", {})
    name = str(description.get("network_class_name", "")).removeprefix(ARCHITECTURE_PREFIX)
    arch = {"ResidualEncoderUNet": "resenc", "PlainConvUNet": "plain"}.get(name)
    try:
        settings = {"arch": arch, "width": int(kwargs["features_per_stage"][0]), "depth": int(kwargs["n_stages"]) - 1}
        if arch == "resenc":
            settings["blocks"] = [int(b) for b in kwargs["n_blocks_per_stage"]]
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return settings if arch is not None and not network_differences(architecture(**{"blocks": [1], **settings}), description) else None


def check_start(description: dict[str, Any], model: NnUNetModel) -> None:
    """Refuse ``model`` as the start of a student built from ``description``: raises
    :class:`~nx46vx.errors.ModelFolderError` when the plans' network differs from the student's
    settings (the message names the arguments, the hint the settings that match), the model
    has other than two heads, or it normalises within a mask."""
    plans = model.folder / "plans.json"
    differ = network_differences(description, model.architecture)
    if differ:
        matching = settings_of(model.architecture)
        hint = ("set " + ", ".join(f"distill.{k} = {v}" for k, v in matching.items())) if matching else "the plans' network is not one distill.arch, width, depth and blocks describe"
        ours, theirs = ({"network_class_name": d.get("network_class_name"), **d.get("arch_kwargs", {})} for d in (description, model.architecture))
        raise ModelFolderError("the plans' network does not match the student's settings", path=plans,
                               expected={k: ours.get(k) for k in differ}, found={k: theirs.get(k) for k in differ}, hint=hint)
    if model.heads != 2:
        raise ModelFolderError("a student starts only from a two-class model", path=model.folder / "dataset.json", expected="background and surface heads", found=f"{model.heads} heads")
    if model.use_mask_for_norm:  # the student normalises whole windows; nnU-Net's masked z-score leaves the outside at 0
        raise ModelFolderError("a student starts only from a model normalised over the whole volume", path=plans, expected="use_mask_for_norm false", found="true")


def start_from(network: UNet, description: dict[str, Any], model: NnUNetModel) -> None:
    """Load ``model``'s first fold into the student ``network`` built from ``description`` (:func:`check_start` first).

    The student's one logit is the surface head's minus the background head's (a softmax
    over two classes is the sigmoid of that difference), so the student starts as the
    model's own map.
    """
    check_start(description, model)
    other = 1 - model.surface_head
    weights = {}
    for key, value in model.folds[0].items():
        if key.startswith("decoder.seg_layers."):
            value = value[model.surface_head : model.surface_head + 1] - value[other : other + 1]
        weights[f"unet.{key}"] = value
    network.load_state_dict(weights)


def nnunet_weights(network: UNet) -> dict[str, torch.Tensor]:
    """The student's weights as an nnU-Net two-class checkpoint's ``network_weights`` (the inverse of :func:`start_from`):
    every head gets a background channel of zeros before the surface channel, so nnU-Net's softmax is the student's sigmoid."""
    weights = {}
    for key, value in network.state_dict().items():
        key = key.removeprefix("unet.")
        value = value.detach().cpu()
        if key.startswith("decoder.seg_layers."):
            value = torch.cat((torch.zeros_like(value), value))
        weights[key] = value.clone()
    return weights


def prior_logit(prior: torch.Tensor) -> torch.Tensor:
    """``logit(p)`` of a probability map, clamped away from 0 and 1 (the base a :class:`PriorResidual` corrects)."""
    p = prior.clamp(_EPS, 1 - _EPS)
    return torch.log(p) - torch.log1p(-p)


class PriorResidual(nn.Module):
    """A U-Net fed (image, prior probability) that learns a correction to the prior's logit (nnU-Net cascade style).

    ``forward_all(x)`` with ``x`` (B, 2, p, p, p) — channel 0 the normalised image,
    channel 1 a probability map of the same voxels (the search ensemble's) — returns
    ``net(x) + logit(prior)`` at every output resolution (the prior average-pooled to
    the coarser deep-supervision heads). The heads start at zero, so an untrained
    student predicts exactly the prior and training only ever has to improve on it.
    """

    def __init__(self, network: UNet) -> None:
        super().__init__()
        self.net = network
        for head in network.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.net.forward_all(x)
        prior = x[:, 1:2].float()
        return [out + prior_logit(prior if out.shape[-1] == prior.shape[-1] else F.avg_pool3d(prior, prior.shape[-1] // out.shape[-1])) for out in outputs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


def build_network(arch: str, *, width: int, depth: int, blocks: Sequence[int], prior: bool = False) -> nn.Module:
    """The student :class:`UNet` for these settings (:func:`architecture`); with ``prior`` wrapped in :class:`PriorResidual` (2 input channels).

    The ResEnc student learns with :data:`DEEP_SUPERVISION` extra heads, the plain one
    with none: at equal seconds on a CPU the plain U-Net scored higher without them
    (``bench/bench_networks.py``, the note of issue #27).
    """
    supervised = DEEP_SUPERVISION if arch == "resenc" else 0
    network = UNet(architecture(arch, width=width, depth=depth, blocks=blocks), in_channels=2 if prior else 1, deep_supervision=supervised)
    return PriorResidual(network) if prior else network


# ----------------------------------------------------------------------------- loss


def _per_patch_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over each patch's voxels, then over patches: (B, 1, …) → scalar."""
    dims = tuple(range(1, values.ndim))
    return ((values * weights).sum(dims) / weights.sum(dims).clamp_min(1.0)).mean()


def label_losses(logits: torch.Tensor, label: torch.Tensor, skeleton: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``dice``, ``bce`` (and ``skeleton`` recall when given) of one output against labels, label 2 masked out of all.

    Parameters
    ----------
    logits : Tensor (B, 1, z, y, x)
    label : Tensor uint8 (B, 1, z, y, x), values {0, 1, 2}
    skeleton : Tensor float (B, 1, z, y, x), optional
        The labels' skeleton (thin-surface recall: the probability on it should be high).
    """
    known = (label != 2).float()
    target = (label == 1).float()
    bce = _per_patch_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), known)
    prob = torch.sigmoid(logits) * known
    dims = tuple(range(1, logits.ndim))
    dice = (2 * (prob * target).sum(dims) + 1.0) / (prob.sum(dims) + (target * known).sum(dims) + 1.0)
    out = {"dice": 1.0 - dice.mean(), "bce": bce}
    if skeleton is not None:
        skel = skeleton * known
        recall = ((prob * skel).sum(dims) + 1.0) / (skel.sum(dims) + 1.0)
        out["skeleton"] = 1.0 - recall.mean()
    return out


def teacher_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    covered: torch.Tensor,
    temperature: float,
    *,
    patches_total: torch.Tensor | None = None,
    covered_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tempered BCE to the teachers' soft target ``T²·BCE(σ(z/T), σ(logit(p)/T))``, averaged over the covered patches (0 when none).

    ``patches_total`` and ``covered_total`` (scalar tensors) are the patch and covered
    counts of the whole batch when this one is a data-parallel worker's share of it:
    the mean is then over the whole batch's covered patches, so the workers' average
    equals the loss of the whole batch (a share with more covered patches weighs more).
    """
    soft = torch.sigmoid(torch.logit(target.clamp(_EPS, 1 - _EPS)) / temperature)
    per_voxel = F.binary_cross_entropy_with_logits(logits / temperature, soft, reduction="none") * temperature**2
    weights = covered.float()[:, None, None, None, None].expand_as(logits)
    patches = weights.shape[0] if patches_total is None else patches_total
    count = weights[:, 0, 0, 0, 0].sum() if covered_total is None else covered_total.float()
    return _per_patch_mean(per_voxel, weights) * patches / count.clamp_min(1.0)


def downsample_label(label: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour labels for a deep-supervision head ``factor`` times coarser."""
    return label[..., ::factor, ::factor, ::factor] if factor > 1 else label


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights 1, ½, ¼, … normalised to sum to 1."""
    raw = [0.5**i for i in range(n)]
    return [w / sum(raw) for w in raw]
