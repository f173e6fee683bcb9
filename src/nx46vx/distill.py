"""Phase 5: teacher → student distillation.

Teachers (``distill.teachers``; every one listed is required):

* ``ensemble`` — the mean probability of the top-k search candidates;
* ``torchscript:<path>`` — a TorchScript module mapping a (1, 1, p, p, p) normalised
  patch to logits, run over sliding windows;
* ``tiff:<dir>`` — ``<dir>/<id>.tif`` per volume: uint8 probabilities (0–255), a
  {0, 1} mask, or float probabilities (e.g. another notebook's predictions);
* ``python:<module>:<callable>`` — ``callable(volume uint8 (z, y, x)) -> probability
  array of the same shape``.

The student (:mod:`nx46vx.student`: a residual-encoder U-Net, or the plain one where
it is cheaper) is trained on augmented patches (:mod:`nx46vx.patches`) with Dice +
BCE on the labels (label 2 masked), deep supervision, an optional skeleton-recall
term and the tempered teacher term ``T²·BCE(σ(z_s/T), σ(logit(p_t)/T))`` with its own
weight schedule; AdamW, linear warm-up then cosine over the steps the budget granted
(mixed precision by ``distill.precision``: float16 on a GPU, bfloat16 on a CPU that computes it natively); the weights kept on validation (:func:`keep_if_best`) segment. With
``distill.teacher_input`` the student is a :class:`~nx46vx.student.PriorResidual`
fed (image, ensemble probability) (:func:`network_input`). Everything here is
pure and step-wise: :func:`init_state`, :func:`train_step`, :func:`keep_if_best`,
:func:`state_dict` / :func:`load_state_dict`; the runner journals and checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .config import TEACHER_SPECS, DistillConfig
from .errors import DistillationNotExecuted, ModelFolderError
from .segment import ENSEMBLE, PERCENTILE, Intensity, compute_dtype, mixed_precision, normalised, sliding_window
from .student import architecture, build_network, check_start, deep_supervision_weights, downsample_label, label_losses, start_from, teacher_loss
from .volumes import file_sha256
from . import nnunet, streams

#: the largest gradient norm a student step applies (nnU-Net v2's clip)
GRAD_CLIP_NORM = 12.0

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
    window_batch: int = 0,
    flip_tta: bool = False,
) -> Teacher:
    """Load one teacher from its spec; raises DistillationNotExecuted when it cannot be loaded
    (:class:`~nx46vx.errors.ModelFolderError` for an nnU-Net folder it refuses).

    A network teacher (``torchscript:``) predicts by :func:`~nx46vx.segment.sliding_window` at ``patch``,
    ``window_batch`` windows per pass. An ``nnunet:`` folder predicts as nnU-Net does
    (:func:`nx46vx.nnunet.probability`), at its plans' patch, mirrored over its allowed axes with ``flip_tta``.
    """
    kind, _, rest = spec.partition(":")
    try:
        if kind == ENSEMBLE:
            if ensemble is None:
                raise DistillationNotExecuted("ensemble teacher needs a trained search", expected="search candidates", found="none")
            return Teacher(spec, ensemble_digest, lambda _id, vol: ensemble(vol))
        if kind == "torchscript":
            path = _resolve(rest, roots)
            module = torch.jit.load(str(path), map_location=device).eval()
            return Teacher(spec, file_sha256(path), lambda _id, vol: sliding_window(vol, module, patch=patch, device=device, batch=window_batch))
        if kind == "nnunet":
            model = nnunet.load_model(_resolve(rest, roots))
            digest = hashlib.sha256(f"{model.sha256}:mirror={flip_tta}".encode()).hexdigest()  # mirroring changes the maps
            return Teacher(spec, digest, lambda _id, vol: nnunet.probability(model, vol, mirror=flip_tta, device=device))
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
    except (DistillationNotExecuted, ModelFolderError):
        raise
    except Exception as exc:  # any failure to load a required teacher stops distillation, clearly
        raise DistillationNotExecuted(f"teacher {spec!r} failed to load", path=rest or None, expected="a loadable teacher", found=f"{type(exc).__name__}: {exc}") from None
    raise DistillationNotExecuted("unknown teacher kind", expected=TEACHER_SPECS, found=spec)


def check_teacher(spec: str, *, roots: Sequence[Path]) -> str:
    """Check a teacher spec before any training, without running anything from it; returns the nnU-Net model's or TorchScript file's digest, else "".

    An ``nnunet:`` folder is loaded as :func:`load_teacher` loads it (plans, dataset,
    every fold's weights fitted to the plans' network); a ``torchscript:`` file and a
    ``tiff:`` folder must exist (the folder with TIFFs in it); a ``python:`` module
    must be importable (found, not imported). Raises what :func:`load_teacher` raises.
    """
    kind, _, rest = spec.partition(":")
    if kind == "nnunet":
        return nnunet.load_model(_resolve(rest, roots)).sha256
    path = _resolve(rest, roots) if kind in ("torchscript", "tiff") else None
    if kind == "torchscript" and not path.is_file():
        raise DistillationNotExecuted(f"teacher {spec!r}: no TorchScript file", path=path, expected="a file", found="nothing")
    if kind == "torchscript":
        return file_sha256(path)
    if kind == "tiff" and not (path.is_dir() and any(path.glob("*.tif"))):
        raise DistillationNotExecuted(f"teacher {spec!r}: no TIFF maps", path=path, expected="a folder of <id>.tif", found="a folder without .tif files" if path.is_dir() else "nothing")
    if kind == "python":
        module_name = rest.partition(":")[0]
        try:
            found = importlib.util.find_spec(module_name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise DistillationNotExecuted(f"teacher {spec!r}: no such module", expected=f"an importable module {module_name!r}", found="none")
    if kind not in (ENSEMBLE, "tiff", "python"):
        raise DistillationNotExecuted("unknown teacher kind", expected=TEACHER_SPECS, found=spec)
    return ""


def soft_target(probs: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Mean of the teachers that cover a volume (None when none does)."""
    present = [p for p in probs if p is not None]
    if len(present) == 1:  # the one teacher's own map: no second copy of a whole volume
        return np.asarray(present[0], dtype=np.float32)
    return None if not present else np.mean(present, axis=0).astype(np.float32)


# ----------------------------------------------------------------------------- training state and steps


@dataclass
class DistillState:
    """The student and everything its training needs to continue exactly.

    ``schedule_steps`` is the length the learning-rate schedule is laid out over
    and ``val_every`` the steps between validations, counted from step ``val_from``
    (decided from the budget and stored; ``val_every`` None = ``distill.val_every``); ``best`` the
    weights kept on validation with their score and step, and the best score so far (``top``; what segmentation uses: :func:`keep_if_best`);
    ``intensity`` how its input is normalised (an nnU-Net model's for a student started from one).
    """

    network: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    step: int = 0
    schedule_steps: int | None = None
    best: dict[str, Any] | None = None
    val_every: int | None = None
    val_from: int = 0
    intensity: Intensity = PERCENTILE


#: ``arch = "auto"`` on a CPU: the plain U-Net's largest patch and fewest patches a step. At equal seconds on 2 cores it
#: learns more from four 32³ patches than from two 48³ (a step costs ~0.6 as much): on the reference bench's data (fixed
#: steps that take the demo's training time, 4 seeds) 0.825 against 0.815 on the test volumes, every validation higher.
CPU_PATCH, CPU_BATCH = 32, 4


def resolve(config: DistillConfig, device: torch.device, *, train_volumes: int | None = None) -> DistillConfig:
    """Concrete student settings for ``device``: ``arch="auto"`` is the ResEnc U-Net on a GPU and the cheaper plain U-Net on a CPU
    (patch at most :data:`CPU_PATCH`, at least :data:`CPU_BATCH` patches a step, predicting in windows of three times its
    patch unless ``inference_patch`` is set);
    ``teacher_input`` holds only with the ``ensemble`` teacher (the prior it feeds) and, given the number of
    ``train_volumes``, only when the ensemble's maps (``teacher_volumes`` of them) cover every one of them:
    the student trains on all training volumes, never on the subset that has a map."""
    if config.teacher_input and prior_off_reason(config, train_volumes):
        config = replace(config, teacher_input=False)
    if config.arch != "auto":
        return config
    if device.type == "cuda":
        return replace(config, arch="resenc")
    # on a CPU the student predicts in windows larger than its training patch: fewer, less overlapping windows, no lower score (window())
    patch = min(config.patch, CPU_PATCH)
    return replace(config, arch="plain", width=min(config.width, 16), depth=min(config.depth, 3), patch=patch, batch=max(config.batch, CPU_BATCH),
                   inference_patch=config.inference_patch or 3 * patch)


def window(config: DistillConfig) -> int:
    """The edge of the windows the student predicts in (validations, test volumes, :func:`nx46vx.predict`): ``inference_patch``, else ``patch``."""
    return config.inference_patch or config.patch


def prior_off_reason(config: DistillConfig, train_volumes: int | None) -> str | None:
    """Why ``teacher_input`` does not hold for these settings and ``train_volumes`` training volumes (None: it holds)."""
    if not config.teacher_input:
        return "distill.teacher_input is false"
    if config.init:
        return "distill.init starts the student from an nnU-Net network of one input channel"
    if ENSEMBLE not in config.teachers:
        return "the prior is the ensemble teacher's map, and distill.teachers has no ensemble"
    if train_volumes is not None and train_volumes > config.teacher_volumes:
        return f"the ensemble's maps cover distill.teacher_volumes = {config.teacher_volumes} of {train_volumes} training volumes"
    return None


def network_input(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The network's input of a batch: ``image`` (B, 1, p, p, p), with the ``prior`` channel appended when the batch has one."""
    return torch.cat((batch["image"], batch["prior"]), dim=1) if "prior" in batch else batch["image"]


def init_state(config: DistillConfig, *, seed: int, device: torch.device, init: nnunet.NnUNetModel | None = None) -> DistillState:
    """A seeded student (:func:`nx46vx.student.build_network`) and AdamW (a loss scaler where it computes in float16: :func:`~nx46vx.segment.compute_dtype`).

    ``init``: the nnU-Net model ``distill.init`` names (:func:`load_init`): the student starts
    from its weights and takes its intensity normalisation (:func:`nx46vx.student.start_from`).
    """
    config = resolve(config, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(streams.student_init_seed(seed))
        network = build_network(config.arch, width=config.width, depth=config.depth, blocks=config.blocks, prior=config.teacher_input)
    intensity = student_intensity(config, init)
    if init is not None:
        start_from(network, architecture(config.arch, width=config.width, depth=config.depth, blocks=config.blocks), init)
    network = network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if compute_dtype(config.precision, device) == torch.float16 else None
    return DistillState(network, optimizer, scaler, intensity=intensity)


#: A student's normalisation without ``init``: nnU-Net's per-volume z-score (exportable; on the 6 + 3 + 3 scroll-style
#: volumes of ``bench/bench_networks.py``'s setup, 100 s, 2 seeds, it scored no lower than ``percentile``: the note of issue #27).
DEFAULT_NORMALIZATION = "ZScoreNormalization"


def student_intensity(config: DistillConfig, init: nnunet.NnUNetModel | None) -> Intensity:
    """How the student's input is normalised: ``distill.normalization``, ``auto`` being the ``init`` model's scheme
    (else nnU-Net's default, :data:`DEFAULT_NORMALIZATION`); raises :class:`ModelFolderError` when a named scheme
    differs from the init model's."""
    if init is None:
        return Intensity(DEFAULT_NORMALIZATION if config.normalization == "auto" else config.normalization)
    if config.normalization not in ("auto", init.normalization):
        raise ModelFolderError("distill.normalization differs from the start model's", path=init.folder / "plans.json",
                               expected=config.normalization, found=init.normalization, hint='set distill.normalization = "auto" (the model\'s own)')
    return nnunet.input_intensity(init)


def load_init(spec: str, *, roots: Sequence[Path]) -> nnunet.NnUNetModel | None:
    """The nnU-Net model ``distill.init`` names (``nnunet:<folder>[/fold_<k>]``, relative to an input root), None for ""."""
    if not spec:
        return None
    return nnunet.load_initial(_resolve(spec.removeprefix("nnunet:"), roots))


def check_init(config: DistillConfig, *, roots: Sequence[Path], device: torch.device) -> str:
    """Load the model ``config.init`` names and refuse it now when the student of these settings on ``device`` cannot
    start from it (:func:`student_intensity`, :func:`nx46vx.student.check_start`); returns its digest."""
    model = load_init(config.init, roots=roots)
    student_intensity(config, model)
    resolved = resolve(config, device)
    check_start(architecture(resolved.arch, width=resolved.width, depth=resolved.depth, blocks=resolved.blocks), model)
    return model.sha256


def lr_at(step: int, *, total: int | None, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to 0 at ``total`` (held at the peak while ``total`` is undecided)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None or total <= warmup:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_weight_at(step: int, config: DistillConfig, total: int | None) -> float:
    """The teacher term's weight: linear from ``teacher_weight`` to ``teacher_weight_end`` over the schedule."""
    if not total:
        return config.teacher_weight
    frac = min(1.0, step / total)
    return config.teacher_weight + (config.teacher_weight_end - config.teacher_weight) * frac


def losses(outputs: list[torch.Tensor], batch: dict[str, torch.Tensor], config: DistillConfig, *, teacher_weight: float) -> dict[str, torch.Tensor]:
    """Every loss term over the deep-supervision outputs (label 2 masked) and their weighted ``total``."""
    weights = deep_supervision_weights(len(outputs))
    terms: dict[str, torch.Tensor] = {}
    for weight, logits in zip(weights, outputs):
        factor = batch["label"].shape[-1] // logits.shape[-1]
        skeleton = downsample_label(batch["skeleton"], factor) if "skeleton" in batch else None
        for name, value in label_losses(logits, downsample_label(batch["label"], factor), skeleton).items():
            terms[name] = terms.get(name, 0.0) + weight * value
    # a data-parallel share carries the whole batch's counts (nx46vx.parallel.shard)
    covered_total = batch.get("covered_total")
    terms["teacher"] = teacher_loss(outputs[0], batch["target"], batch["covered"], config.temperature, patches_total=batch.get("patches_total"), covered_total=covered_total)
    active = teacher_weight if bool(batch["covered"].any() if covered_total is None else covered_total > 0) else 0.0
    terms["total"] = config.dice_weight * terms["dice"] + config.bce_weight * terms["bce"] + config.skeleton_weight * terms.get("skeleton", 0.0) + active * terms["teacher"]
    return terms


def train_step(
    state: DistillState, batch: dict[str, torch.Tensor], config: DistillConfig, *, forward: Callable[[torch.Tensor], list[torch.Tensor]] | None = None
) -> dict[str, float]:
    """One optimiser step at the scheduled learning rate; returns every loss term, the learning rate and the gradient norm.

    ``forward`` maps the image batch to the network's outputs (default
    ``state.network.forward_all``; a DDP-wrapped forward in data-parallel training,
    see :mod:`nx46vx.parallel`).
    """
    forward = forward or state.network.forward_all
    device = next(state.network.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    lr = lr_at(state.step, total=state.schedule_steps, warmup=config.warmup_steps, base=config.lr)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    teacher_weight = teacher_weight_at(state.step, config, state.schedule_steps)
    state.network.train()
    state.optimizer.zero_grad(set_to_none=True)
    with mixed_precision(device, compute_dtype(config.precision, device)):
        outputs = forward(network_input(batch))
    terms = losses([o.float() for o in outputs], batch, config, teacher_weight=teacher_weight)
    if state.scaler is not None:  # float16's narrow range: the loss is scaled so that small gradients survive
        state.scaler.scale(terms["total"]).backward()
        state.scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(state.network.parameters(), GRAD_CLIP_NORM)
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        terms["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(state.network.parameters(), GRAD_CLIP_NORM)
        state.optimizer.step()
    state.step += 1
    out = {k: float(v.detach()) for k, v in terms.items() if isinstance(v, torch.Tensor)}
    out["label"] = out["dice"] + out["bce"]
    return out | {"lr": float(lr), "teacher_weight": float(teacher_weight), "grad_norm": float(grad_norm)}


def validates_after(state: DistillState, step: int, *, default_every: int) -> bool:
    """Whether the student is validated after step ``step``: every ``val_every`` steps counted from ``val_from``
    (``default_every`` while the schedule has not set it), and after the schedule's last step."""
    every = state.val_every or default_every
    periodic = step > state.val_from and (step - state.val_from) % every == 0
    return periodic or (state.schedule_steps is not None and step >= state.schedule_steps)


#: How far under the best validation score so far a trained student's later weights may score and still replace the
#: kept ones. The learning rate decays to zero over the schedule, so later weights are the better ones in expectation
#: (nnU-Net predicts with its final checkpoint, not its best), and a few validation volumes of one scroll do not tell
#: such differences apart; the margin keeps a student whose later training collapsed from replacing better weights. In
#: a 600 s kaggle-train bench run the weights of step 846 scored 0.77253 on the one validation volume and the final
#: ones (step 1162) 0.77245, on the 8 test volumes 0.814 against 0.822; in two demo runs of one seed the weights of the
#: mid-schedule validation scored 0.794 / 0.777 on 3 validation volumes, the final ones 0.762 / 0.763, on the test
#: volumes (an unseen scroll) 0.734 / 0.748 against 0.756 / 0.744 (at 0.01 both kept the mid-schedule weights).
LATER_WEIGHTS_MARGIN = 0.05


def keep_if_best(state: DistillState, score: float) -> tuple[bool, bool]:
    """Keep the current weights (scoring ``score`` on validation) when they beat the best score so far, or score at most
    :data:`LATER_WEIGHTS_MARGIN` under it while trained weights are kept (the weights of step 0 — the prior of
    ``distill.teacher_input``, an nnU-Net start model — are replaced only when beaten).

    Returns ``(improved, kept)``: whether ``score`` beat the best so far, whether the weights are now the kept ones.
    """
    top = None if state.best is None else state.best.get("top", state.best["score"])
    improved = top is None or score > top
    kept = improved or (state.best["step"] > 0 and score >= top - LATER_WEIGHTS_MARGIN)
    if kept:
        state.best = {"score": float(score), "step": state.step, "top": float(score if improved else top),
                      "weights": {k: v.detach().cpu().clone() for k, v in state.network.state_dict().items()}}
    return improved, kept


def student_network(state: DistillState) -> nn.Module:
    """The student for inference (eval mode): the weights kept on validation (:func:`keep_if_best`) when there are some, else the current ones."""
    if state.best is None:
        state.network.eval()
        return state.network
    best = copy.deepcopy(state.network)
    best.load_state_dict(state.best["weights"])
    return best.eval()


def state_dict(state: DistillState) -> dict[str, Any]:
    return {
        "student": {k: v.detach().cpu().clone() for k, v in state.network.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "step": state.step,
        "schedule_steps": state.schedule_steps,
        "val_every": state.val_every,
        "val_from": state.val_from,
        "best": state.best,
        "intensity": asdict(state.intensity),
    }


def load_state_dict(state: DistillState, saved: dict[str, Any]) -> None:
    state.network.load_state_dict(saved["student"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.scaler is not None and saved["scaler"] is not None:
        state.scaler.load_state_dict(saved["scaler"])
    state.step = int(saved["step"])
    state.schedule_steps = None if saved["schedule_steps"] is None else int(saved["schedule_steps"])
    state.best = saved["best"]
    state.val_every = None if saved.get("val_every") is None else int(saved["val_every"])
    state.val_from = int(saved.get("val_from", 0))
    state.intensity = saved_intensity(saved)


def saved_intensity(saved: dict[str, Any]) -> Intensity:
    """The student's input normalisation in a :func:`state_dict` (a checkpoint from before it was stored: ours)."""
    return Intensity(**saved["intensity"]) if saved.get("intensity") else PERCENTILE


def student_digest(state: DistillState) -> bytes:
    """Bytes of the student's current and best weights (for the run's model digest)."""
    current = state.network.state_dict()
    best = state.best["weights"] if state.best else {}
    # the network's key order for both: a restored checkpoint's dicts come back in sorted key order
    return b"".join(v.detach().cpu().numpy().tobytes() for v in current.values()) + b"".join(best[k].numpy().tobytes() for k in current if k in best)


def agreement(state: DistillState, probe: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32) -> float | None:
    """Fraction of voxels of the covered probe patches where student and teacher agree at probability 0.5; the student
    computes in ``dtype`` (:func:`~nx46vx.segment.compute_dtype`, as it trains and predicts)."""
    covered = probe["covered"]
    if not bool(covered.any()):
        return None
    device = next(state.network.parameters()).device
    state.network.eval()
    with torch.no_grad(), mixed_precision(device, dtype):
        student = torch.sigmoid(state.network(network_input(probe)[covered].to(device)).float()).cpu()
    return float(((student >= 0.5) == (probe["target"][covered] >= 0.5)).float().mean())


__all__ = [
    "DistillState",
    "Teacher",
    "agreement",
    "init_state",
    "keep_if_best",
    "load_state_dict",
    "load_teacher",
    "losses",
    "lr_at",
    "network_input",
    "normalised",
    "resolve",
    "soft_target",
    "state_dict",
    "student_digest",
    "student_network",
    "train_step",
    "validates_after",
]
