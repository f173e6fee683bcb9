"""Phase 5: teacher → student distillation.

Teachers (``distill.teachers``; every one listed is required):

* ``ensemble`` — the mean probability of the top-k search candidates;
* ``torchscript:<path>`` — a TorchScript module mapping a (1, 1, p, p, p) normalised
  patch to logits, run over sliding windows;
* ``tiff:<dir>`` — ``<dir>/<id>.tif`` per volume: uint8 probabilities (0–255), a
  {0, 1} mask, or float probabilities (e.g. another notebook's predictions);
* ``python:<module>:<callable>`` — ``callable(volume uint8 (z, y, x)) -> probability
  array of the same shape``.

The student is a small 3-D U-Net trained on seeded, label-2-aware, positive-rich
patches with ``λ·BCE(student, label≠2) + (1−λ)·BCE(σ(z_s/T), σ(logit(p_t)/T))``,
AdamW and a cosine schedule (mixed precision on GPU). Everything here is pure and
step-wise: :func:`init_state`, :func:`sample_batch`, :func:`train_step`,
:func:`state_dict` / :func:`load_state_dict`; the runner journals and checkpoints.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DistillConfig
from .errors import DistillationNotExecuted
from .segment import normalised, sliding_window
from .volumes import file_sha256

_EPS = 1e-4


# ----------------------------------------------------------------------------- the student


def _block(c_in: int, c_out: int) -> nn.Sequential:
    groups = math.gcd(4, c_out)
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
        nn.Conv3d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
    )


class Student(nn.Module):
    """Small 3-D U-Net: ``depth`` poolings, ``width·2^i`` channels at level i; (B, 1, p, p, p) → logits (B, 1, p, p, p)."""

    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(1, chans[0])] + [_block(chans[i - 1], chans[i]) for i in range(1, depth + 1)])
        self.up = nn.ModuleList([nn.ConvTranspose3d(chans[i], chans[i - 1], 2, stride=2) for i in range(depth, 0, -1)])
        self.merge = nn.ModuleList([_block(2 * chans[i - 1], chans[i - 1]) for i in range(depth, 0, -1)])
        self.head = nn.Conv3d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat((up(x), skip), dim=1))
        return self.head(x)


# ----------------------------------------------------------------------------- teachers


@dataclass
class Teacher:
    """A loaded teacher: ``predict(volume_id, volume) -> probability (z, y, x) or None`` (None = no output for that volume)."""

    spec: str
    sha256: str
    predict: Callable[[str, np.ndarray], np.ndarray | None]


def _resolve(path_text: str, roots: Sequence[Path]) -> Path:
    path = Path(path_text)
    if path.exists() or path.is_absolute():
        return path
    for root in roots:
        if (root / path).exists():
            return root / path
    return path


def _tiff_probability(path: Path) -> np.ndarray:
    from .volumes import read_any

    data = read_any(path)
    if data.dtype == np.uint8:
        return (data > 0).astype(np.float32) if data.max() <= 1 else data.astype(np.float32) / 255.0
    return np.clip(data.astype(np.float32), 0.0, 1.0)


def load_teacher(
    spec: str,
    *,
    roots: Sequence[Path],
    ensemble: Callable[[np.ndarray], np.ndarray] | None,
    ensemble_digest: str,
    patch: int,
    device: torch.device,
) -> Teacher:
    """Load one teacher from its spec; raises DistillationNotExecuted when it cannot be loaded."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "ensemble":
            if ensemble is None:
                raise DistillationNotExecuted("ensemble teacher needs a trained search", expected="search candidates", found="none")
            return Teacher(spec, ensemble_digest, lambda _id, vol: ensemble(vol))
        if kind == "torchscript":
            path = _resolve(rest, roots)
            module = torch.jit.load(str(path), map_location=device).eval()
            return Teacher(spec, file_sha256(path), lambda _id, vol: sliding_window(vol, module, patch=patch, device=device))
        if kind == "tiff":
            folder = _resolve(rest, roots)
            if not folder.is_dir():
                raise FileNotFoundError(f"no folder {folder}")
            files = sorted(folder.glob("*.tif"))
            digest = hashlib.sha256(b"".join(bytes.fromhex(file_sha256(f)) for f in files)).hexdigest()

            def from_tiff(vol_id: str, vol: np.ndarray) -> np.ndarray | None:
                path = folder / f"{vol_id}.tif"
                if not path.is_file():
                    return None
                prob = _tiff_probability(path)
                if prob.shape != vol.shape:
                    raise DistillationNotExecuted("teacher TIFF shape differs from its volume", path=path, expected=vol.shape, found=prob.shape)
                return prob

            return Teacher(spec, digest, from_tiff)
        if kind == "python":
            module_name, _, attr = rest.partition(":")
            fn = getattr(importlib.import_module(module_name), attr)
            source = getattr(importlib.import_module(module_name), "__file__", None)
            digest = file_sha256(source) if source and os.path.isfile(source) else hashlib.sha256(rest.encode()).hexdigest()
            return Teacher(spec, digest, lambda _id, vol: np.clip(np.asarray(fn(vol), dtype=np.float32), 0.0, 1.0))
    except DistillationNotExecuted:
        raise
    except Exception as exc:  # any failure to load a required teacher stops distillation, clearly
        raise DistillationNotExecuted(f"teacher {spec!r} failed to load", path=rest or None, expected="a loadable teacher", found=f"{type(exc).__name__}: {exc}") from None
    raise DistillationNotExecuted("unknown teacher kind", expected="ensemble, torchscript:<path>, tiff:<dir> or python:<module>:<callable>", found=spec)


def soft_target(probs: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Mean of the teachers that cover a volume (None when none does)."""
    present = [p for p in probs if p is not None]
    return None if not present else np.mean(present, axis=0).astype(np.float32)


# ----------------------------------------------------------------------------- training state and steps


@dataclass
class DistillVolume:
    """One training volume for distillation: normalised image, labels and teacher soft target (or None)."""

    id: str
    image: np.ndarray
    label: np.ndarray
    target: np.ndarray | None


@dataclass
class DistillState:
    student: Student
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Any
    step: int = 0


def init_state(config: DistillConfig, *, seed: int, device: torch.device) -> DistillState:
    """A seeded student, AdamW and a cosine schedule over ``config.steps``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + 5)
        student = Student(config.width, config.depth).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.steps))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    return DistillState(student, optimizer, scheduler, scaler)


def sample_batch(volumes: Sequence[DistillVolume], step: int, config: DistillConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """The patches of one step, drawn by the generator seeded with ``(seed, 6, step)``.

    Each patch is centred on a surface voxel with probability
    ``positive_fraction`` (positive-rich), else on a random labelled voxel (label
    2 never chosen as a centre); patches are edge-padded where they leave the volume.

    Returns
    -------
    dict of tensors
        ``image`` (B, 1, p, p, p) float32, ``label`` (B, 1, p, p, p) uint8,
        ``target`` (B, 1, p, p, p) float32 and ``covered`` (B,) bool.
    """
    rng = np.random.default_rng([seed, 6, step])
    p = config.patch
    images, labels, targets, covered = [], [], [], []
    for _ in range(config.batch):
        vol = volumes[int(rng.integers(len(volumes)))]
        want = 1 if rng.random() < config.positive_fraction else None
        candidates = np.flatnonzero(vol.label.ravel() == 1) if want == 1 else np.flatnonzero(vol.label.ravel() != 2)
        if candidates.size == 0:
            candidates = np.arange(vol.label.size)
        centre = np.unravel_index(int(candidates[rng.integers(candidates.size)]), vol.label.shape)
        starts = [int(np.clip(c - p // 2, 0, max(0, s - p))) for c, s in zip(centre, vol.label.shape)]
        box = tuple(slice(a, a + p) for a in starts)
        pad = [(0, max(0, p - s)) for s in vol.label.shape]
        images.append(np.pad(vol.image[box], pad, mode="edge"))
        labels.append(np.pad(vol.label[box], pad, mode="constant", constant_values=2))
        targets.append(np.pad(vol.target[box], pad, mode="edge") if vol.target is not None else np.zeros((p, p, p), np.float32))
        covered.append(vol.target is not None)
    return {
        "image": torch.from_numpy(np.stack(images))[:, None],
        "label": torch.from_numpy(np.stack(labels))[:, None],
        "target": torch.from_numpy(np.stack(targets))[:, None],
        "covered": torch.tensor(covered),
    }


def losses(logits: torch.Tensor, batch: dict[str, torch.Tensor], config: DistillConfig) -> dict[str, torch.Tensor]:
    """``label`` term (BCE where label ≠ 2), ``teacher`` term (tempered BCE to the soft target) and ``total``."""
    label = batch["label"]
    known = (label != 2).float()
    label_bce = F.binary_cross_entropy_with_logits(logits, (label == 1).float(), reduction="none")
    label_term = (label_bce * known).sum() / known.sum().clamp_min(1.0)
    temp = config.temperature
    covered = batch["covered"].float()[:, None, None, None, None].expand_as(logits)
    target = batch["target"].clamp(_EPS, 1 - _EPS)
    soft = torch.sigmoid(torch.logit(target) / temp)
    teacher_bce = F.binary_cross_entropy_with_logits(logits / temp, soft, reduction="none") * temp * temp
    teacher_term = (teacher_bce * covered).sum() / covered.sum().clamp_min(1.0)
    lam = config.label_weight
    teacher_weight = (1 - lam) if bool(batch["covered"].any()) else 0.0
    return {"total": lam * label_term + teacher_weight * teacher_term, "label": label_term, "teacher": teacher_term}


def train_step(state: DistillState, batch: dict[str, torch.Tensor], config: DistillConfig) -> dict[str, float]:
    """One optimiser step; returns the loss terms, the learning rate used and the gradient norm."""
    device = next(state.student.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    state.student.train()
    state.optimizer.zero_grad(set_to_none=True)
    lr = state.optimizer.param_groups[0]["lr"]
    if state.scaler is not None:
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            logits = state.student(batch["image"])
        terms = losses(logits.float(), batch, config)
        state.scaler.scale(terms["total"]).backward()
        state.scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(state.student.parameters(), 10.0)
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        terms = losses(state.student(batch["image"]), batch, config)
        terms["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(state.student.parameters(), 10.0)
        state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    return {k: float(terms[k].detach()) for k in ("total", "label", "teacher")} | {"lr": float(lr), "grad_norm": float(grad_norm)}


def student_network(state: DistillState) -> Callable[[torch.Tensor], torch.Tensor]:
    """The student in eval mode as a window → logits function for :func:`nx46vx.segment.sliding_window`."""
    state.student.eval()
    return state.student


def state_dict(state: DistillState) -> dict[str, Any]:
    return {
        "student": {k: v.detach().cpu().clone() for k, v in state.student.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "step": state.step,
    }


def load_state_dict(state: DistillState, saved: dict[str, Any]) -> None:
    state.student.load_state_dict(saved["student"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.scaler is not None and saved["scaler"] is not None:
        state.scaler.load_state_dict(saved["scaler"])
    state.step = int(saved["step"])


def student_digest(state: DistillState) -> bytes:
    """Bytes of every student parameter (for the run's model digest)."""
    return b"".join(v.detach().cpu().numpy().tobytes() for v in state.student.state_dict().values())


def agreement(state: DistillState, probe: dict[str, torch.Tensor]) -> float | None:
    """Fraction of voxels of the covered probe patches where student and teacher agree at probability 0.5."""
    covered = probe["covered"]
    if not bool(covered.any()):
        return None
    device = next(state.student.parameters()).device
    state.student.eval()
    with torch.no_grad():
        student = torch.sigmoid(state.student(probe["image"][covered].to(device)).float()).cpu()
    return float(((student >= 0.5) == (probe["target"][covered] >= 0.5)).float().mean())


__all__ = [
    "DistillState",
    "DistillVolume",
    "Student",
    "Teacher",
    "agreement",
    "init_state",
    "load_state_dict",
    "load_teacher",
    "losses",
    "normalised",
    "sample_batch",
    "soft_target",
    "state_dict",
    "student_digest",
    "student_network",
    "train_step",
]
