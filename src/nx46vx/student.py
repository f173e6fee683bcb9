"""The student networks and their loss: a residual-encoder 3-D U-Net (nnU-Net ResEnc style) and the small plain U-Net.

:class:`ResEncUNet` — stages of residual blocks (conv-IN-LeakyReLU-conv-IN + skip)
in the encoder, strided-convolution downsampling, transposed-convolution
upsampling, one conv block per decoder stage, deep-supervision heads at the upper
decoder levels. ``forward`` returns the full-resolution logits (what sliding-window
inference needs); :meth:`ResEncUNet.forward_all` also returns the coarser heads.

:func:`label_losses` — Dice + BCE on the labels with label 2 masked out of
both, per patch and then averaged (so a batch split across data-parallel workers
gives the same gradient), and an optional skeleton-recall term for thin surfaces;
:func:`teacher_loss` — the tempered teacher term, weighted on its own.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-4


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels, affine=True), nn.LeakyReLU(0.01, inplace=True)]


class ResidualBlock(nn.Module):
    """``conv3-IN-LReLU-conv3-IN`` plus a (strided 1×1 when shapes differ) skip, then LReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False), *_norm_act(c_out),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False), nn.InstanceNorm3d(c_out, affine=True),
        )
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False), nn.InstanceNorm3d(c_out, affine=True))
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), *_norm_act(c_out), nn.Conv3d(c_out, c_out, 3, padding=1, bias=False), *_norm_act(c_out))


class ResEncUNet(nn.Module):
    """Residual-encoder 3-D U-Net; (B, 1, p, p, p) → logits (B, 1, p, p, p).

    Parameters
    ----------
    width : int
        Channels of the first stage; stage ``i`` has ``min(width·2^i, 320)``.
    depth : int
        Downsamplings (stages − 1); the patch must be a multiple of ``2**depth``.
    blocks : sequence of int
        Residual blocks per encoder stage (``depth + 1`` entries; a shorter one repeats its last).
    deep_supervision : int
        Extra heads at the next-coarser decoder levels (0 = none).
    in_channels : int
        Input channels (2 with a prior, see :class:`PriorResidual`).
    """

    def __init__(self, width: int = 16, depth: int = 3, blocks: Sequence[int] = (1, 2, 2, 2), *, deep_supervision: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        chans = [min(width * 2**i, 320) for i in range(depth + 1)]
        per_stage = [blocks[min(i, len(blocks) - 1)] for i in range(depth + 1)]
        self.stem = nn.Sequential(nn.Conv3d(in_channels, chans[0], 3, padding=1, bias=False), *_norm_act(chans[0]))
        self.encoder = nn.ModuleList()
        for i, n in enumerate(per_stage):
            first = ResidualBlock(chans[max(0, i - 1)], chans[i], stride=1 if i == 0 else 2)
            self.encoder.append(nn.Sequential(first, *[ResidualBlock(chans[i], chans[i]) for _ in range(n - 1)]))
        self.up = nn.ModuleList([nn.ConvTranspose3d(chans[i], chans[i - 1], 2, stride=2) for i in range(depth, 0, -1)])
        self.decoder = nn.ModuleList([_conv_block(2 * chans[i - 1], chans[i - 1]) for i in range(depth, 0, -1)])
        self.heads = nn.ModuleList([nn.Conv3d(chans[i - 1], 1, 1) for i in range(depth, 0, -1)])
        self.deep_supervision = min(deep_supervision, depth - 1)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits at full resolution, then at each deep-supervision level (half, quarter, …)."""
        skips = []
        x = self.stem(x)
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        outputs = []
        for level, (up, block, head, skip) in enumerate(zip(self.up, self.decoder, self.heads, reversed(skips[:-1]))):
            x = block(torch.cat((up(x), skip), dim=1))
            if len(self.up) - 1 - level <= self.deep_supervision:
                outputs.append(head(x))
        return outputs[::-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


class PlainUNet(nn.Module):
    """Plain 3-D U-Net (two conv-IN-LeakyReLU per stage, max-pooling): cheaper where there is no GPU; (B, 1, p, p, p) → logits."""

    def __init__(self, width: int = 16, depth: int = 3, *, in_channels: int = 1) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_conv_block(in_channels, chans[0])] + [_conv_block(chans[i - 1], chans[i]) for i in range(1, depth + 1)])
        self.up = nn.ModuleList([nn.ConvTranspose3d(chans[i], chans[i - 1], 2, stride=2) for i in range(depth, 0, -1)])
        self.merge = nn.ModuleList([_conv_block(2 * chans[i - 1], chans[i - 1]) for i in range(depth, 0, -1)])
        self.head = nn.Conv3d(chans[0], 1, 1)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The full-resolution logits only (no deep supervision)."""
        return [self.forward(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat((up(x), skip), dim=1))
        return self.head(x)


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

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.net = network
        heads = [network.head] if isinstance(network, PlainUNet) else list(network.heads)
        for head in heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.net.forward_all(x)
        prior = x[:, 1:2].float()
        return [out + prior_logit(prior if out.shape[-1] == prior.shape[-1] else F.avg_pool3d(prior, prior.shape[-1] // out.shape[-1])) for out in outputs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


def build_network(arch: str, *, width: int, depth: int, blocks: Sequence[int], prior: bool = False) -> nn.Module:
    """``resenc`` → :class:`ResEncUNet`, ``plain`` → :class:`PlainUNet`; with ``prior`` wrapped in :class:`PriorResidual` (2 input channels)."""
    channels = 2 if prior else 1
    network = PlainUNet(width, depth, in_channels=channels) if arch == "plain" else ResEncUNet(width, depth, blocks, in_channels=channels)
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
