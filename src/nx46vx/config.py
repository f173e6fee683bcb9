"""Run configuration: frozen dataclasses, TOML profiles, file and ``section.key=value`` overrides.

Resolution order (later wins): the built-in defaults below, the profile
(``configs/<name>.toml`` shipped inside the package), a user TOML file, environment
variables ``NX46VX__SECTION__KEY=value``, then explicit overrides (``--set`` on the
command line, keyword arguments of :func:`nx46vx.run`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields, is_dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError

#: The student's augmentations, each with the probability a patch gets it.
AUGMENTATIONS = {"flip": 1.0, "rot90": 0.5, "affine": 0.2, "intensity": 0.3, "noise": 0.1, "blur": 0.2, "lowres": 0.25}
#: ``segment.method`` → the segmenter's name in the journal and reports (``auto`` picks one on validation); the
#: ensemble's name is also its teacher spec in ``distill.teachers``.
SEGMENT_METHODS = {"baseline": "intensity_baseline", "search": "search_model", "ensemble": "ensemble", "student": "student", "blend": "blend"}

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class DataConfig:
    """What to read and how to split it.

    ``val_fraction`` of the training volumes (at least ``min_val_volumes``) are held
    out for validation *by scroll* (whole scrolls; by volume only when the data names
    fewer than two scrolls, journaled); ``max_train_volumes`` caps how many training pairs
    are used (0 = all). A validation volume with fewer than ``min_val_surface_voxels``
    surface voxels is not used to validate (journaled). Every file's header and its first and last page are checked
    right after discovery: a bad training pair is skipped (``INPUT_REJECTED``); a bad
    test volume stops the run (``on_bad_test = "error"``) or gets an empty mask
    (``"empty"``, the ``kaggle-submit`` default: a scoring rerun must still submit).
    """

    include_deprecated: bool = False
    val_fraction: float = 0.2
    min_val_volumes: int = 1
    max_train_volumes: int = 0
    on_bad_test: str = "error"
    min_val_surface_voxels: int = 64


@dataclass(frozen=True)
class FeatureConfig:
    """Feature bank parameters (see :mod:`nx46vx.features`).

    ``pool_per_class`` labelled voxels of each class are drawn per volume into the
    on-disk cache; epochs sample from these pools.
    """

    smooth_sigma: float = 1.0
    entropy_window: int = 5
    proj_half_window: int = 3
    laplace_sigma: float = 1.5
    bandpass_sigmas: tuple[float, float] = (1.0, 3.0)
    hessian_sigma: float = 1.5
    chunk_z: int = 64
    pool_per_class: int = 20000
    device: str = "auto"


@dataclass(frozen=True)
class SearchConfig:
    """The candidate grid and its training schedule (see :mod:`nx46vx.search`).

    ``objective_every``: ``FIT_ITER`` reports the objective of every candidate on the
    first iteration of a batch, every ``objective_every``-th and the last (null
    otherwise). FISTA's step never needs it (the step size is 1/L), and evaluating it
    costs a fifth of an iteration on a CPU; 1 reports it on every iteration. The fits
    do not depend on it.
    """

    meta_neurons: int = 9
    l1: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    max_iter: int = 120
    max_epochs: int = 8
    patience: int = 3
    min_delta: float = 1e-4
    samples_per_class: int = 50000
    val_samples_per_class: int = 20000
    grow_on_stagnation: bool = False
    max_meta_neurons: int = 18
    block_rows: int = 8192
    batch_candidates: int = 0
    kernel: str = "auto"
    fbeta: float = 0.5
    init_scale: float = 0.01
    objective_every: int = 10
    device: str = "auto"


@dataclass(frozen=True)
class DistillConfig:
    """The student and its training (see :mod:`nx46vx.distill`, :mod:`nx46vx.student`, :mod:`nx46vx.patches`).

    ``teachers``: any of ``ensemble`` (top ``ensemble_k`` search candidates),
    ``nnunet:<model folder>`` (an nnU-Net v2 results folder, :mod:`nx46vx.nnunet`),
    ``torchscript:<path>``, ``tiff:<dir>``, ``python:<module>:<callable>``; every
    listed teacher is required; ``[]`` trains on the labels alone. ``arch``:
    ``resenc`` (residual-encoder U-Net), ``plain``, or ``auto`` (ResEnc on a GPU,
    plain width ≤ 16, patch ≤ 32 and batch ≥ 4 on a CPU:
    :data:`nx46vx.distill.CPU_PATCH`). ``steps`` = 0 trains as long as the
    budget grants (``max_steps`` when there is no budget); the learning-rate
    schedule is laid out over the granted steps after ``warmup_steps``. Loss:
    ``dice_weight·Dice + bce_weight·BCE + skeleton_weight·skeleton recall +
    w(t)·teacher``, ``w`` going linearly from ``teacher_weight`` to
    ``teacher_weight_end``. Every ``val_every`` steps the student is scored by the
    competition metric on ``val_volumes`` validation volumes and the best weights kept.
    ``processes``: data-parallel training processes (DDP, :mod:`nx46vx.parallel`);
    0 = one per visible GPU when more than one is visible, else 1 (``batch`` is the
    global batch and must divide evenly over them). ``teacher_input``: the search
    ensemble's probability is the student's second input channel and its logit the
    base the student corrects (:class:`nx46vx.student.PriorResidual`, nnU-Net
    cascade style); it needs the ``ensemble`` teacher and the ensemble's map of
    every training volume (at most ``teacher_volumes`` of them): otherwise the
    setting is off (``DISTILLATION_START`` says why) and the student learns from
    the image alone, on all training volumes. ``init``: empty (nnU-Net's random
    initialisation) or ``nnunet:<model folder>`` (its first trained fold) /
    ``nnunet:<model folder>/fold_<k>``: the student starts from that nnU-Net model's
    weights and is fed its intensity normalisation (fine-tuning); its plans' network
    must be the one ``arch``, ``width``, ``depth`` and ``blocks`` describe, and
    ``teacher_input`` is off (the model has one input channel). ``normalization``: how
    the student's input is normalised: ``auto`` (the ``init`` model's scheme, else
    nnU-Net's per-volume ``ZScoreNormalization``), one of nnU-Net's per-volume schemes
    ``ZScoreNormalization``, ``RescaleTo01Normalization``, ``NoNormalization``, or
    ``percentile`` (this package's per-volume 1st–99.5th percentile rescale, which an
    exported nnU-Net folder cannot hold: :func:`nx46vx.export_nnunet`).
    ``inference_patch``: the window the student's validations and test volumes are
    predicted in (0 = ``patch``, or three times the capped patch for ``arch = "auto"`` on a
    CPU; else a multiple of ``2**depth``): the network is fully convolutional, and on
    a CPU a window larger than the training patch overlaps less (a 96³ volume in one
    96³ window instead of 27 windows of 48³: 2.8× faster on the demo's student, and no
    lower score; measured in the README). ``precision``: what the student's convolutions
    compute in, in training and prediction: ``auto`` (float16 on a GPU, bfloat16 on a CPU
    that computes it natively — AVX-512 BF16 or AMX —, float32 on other CPUs;
    :func:`nx46vx.segment.compute_dtype`) or ``float32``. Weights, optimiser state and
    losses are float32 either way.
    """

    enabled: bool = True
    teachers: tuple[str, ...] = (SEGMENT_METHODS["ensemble"],)
    ensemble_k: int = 5
    teacher_input: bool = False
    init: str = ""
    normalization: str = "auto"
    precision: str = "auto"
    arch: str = "auto"
    width: int = 32
    depth: int = 4
    blocks: tuple[int, ...] = (1, 3, 4, 6, 6)
    patch: int = 128
    inference_patch: int = 0
    batch: int = 2
    steps: int = 0
    max_steps: int = 2000
    warmup_steps: int = 20
    lr: float = 2e-3
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    skeleton_weight: float = 0.0
    teacher_weight: float = 0.3
    teacher_weight_end: float = 0.0
    temperature: float = 2.0
    positive_fraction: float = 0.5
    augment: tuple[str, ...] = tuple(AUGMENTATIONS)
    cache_volumes: int = 16
    foreground_samples: int = 20000
    teacher_volumes: int = 8
    val_every: int = 100
    val_volumes: int = 2
    workers: int = 2
    processes: int = 0
    checkpoint_every: int = 50
    device: str = "auto"


@dataclass(frozen=True)
class SegmentConfig:
    """Segmentation of the test volumes.

    ``method``: ``auto`` (whichever of the available segmenters scores best on the
    validation volumes), ``baseline`` (smoothed-intensity Otsu), ``search``,
    ``ensemble``, ``student``, ``blend`` (the mean of the student's and the ensemble's
    probabilities). Probability maps are cut by 3-D hysteresis with
    thresholds chosen on validation; when hysteresis keeps less than
    ``min_ratio`` of the voxels, the top ``fallback_percent`` % are kept instead.
    ``repair_tunnels``: the post-processing grid tries every threshold also with the
    tunnels of each TopoScore tile repaired (:func:`nx46vx.topology.repair_tunnels`):
    films across holes of up to ``tunnel_film_voxels`` voxels added, the other tunnels
    cut. Off, it tries hole filling and plugging instead: ``plug_holes_voxels`` is the
    largest hole enclosed in an axial plane it plugs (0 = never; :func:`nx46vx.segment.plug_holes`).
    ``export_probabilities`` also writes ``probabilities/<id>.tif`` (uint8, p·255)
    beside the submission, for blending with other notebooks. ``window_batch``: the
    windows per forward pass of sliding-window inference (a setting, not derived from
    the free memory, so that the maps do not depend on the machine's state); 0 = by
    device: one on a CPU, where a batch costs more per window, four on a GPU
    (:func:`nx46vx.segment.windows_per_pass`).
    """

    method: str = "auto"
    baseline_sigma: float = 1.0
    min_component_voxels: int = 64
    overlap: float = 0.5
    flip_tta: bool = False
    min_ratio: float = 0.005
    fallback_percent: float = 5.0
    validation_volumes: int = 4
    plug_holes_voxels: int = 32
    repair_tunnels: bool = True
    tunnel_film_voxels: int = 32
    export_probabilities: bool = False
    window_batch: int = 0


@dataclass(frozen=True)
class BudgetConfig:
    """Time budget in seconds (0 = unlimited) and its split.

    The training window (``total_s − margin − reserve``) is shared: features get
    ``features_share``, the search ``search_share`` (each counted from its start),
    distillation the rest and every second they leave unused. ``feature_s_per_mvoxel`` predicts the feature cost of a volume
    until one has been measured, ``score_s_per_mvoxel`` the competition metric's (the post-processing tuning scores
    every grid point on every validation volume) until the student's first validation measures it,
    ``repair_s_per_mvoxel`` the tunnel repair's (``segment.repair_tunnels``) until it is timed beside the metric.
    """

    total_s: float = 0.0
    margin_s: float = 60.0
    reserve_per_volume_s: float = 30.0
    reserve_safety: float = 2.0
    features_share: float = 0.25
    search_share: float = 0.45
    feature_s_per_mvoxel: float = 2.0
    score_s_per_mvoxel: float = 0.5
    repair_s_per_mvoxel: float = 0.6


@dataclass(frozen=True)
class OutputConfig:
    """The output folder's size limit: caches are not written past ``quota_gb`` (Kaggle keeps 20 GB of ``/kaggle/working``)."""

    quota_gb: float = 19.0


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint cadence and retention."""

    every_iters: int = 10
    keep_last: int = 3


@dataclass(frozen=True)
class ProgressConfig:
    """``GLOBAL_PROGRESS_REALTIME`` cadence (5–15 s) besides every phase change; ``HEALTH`` every ``health_every`` reports."""

    interval_s: float = 10.0
    health_every: int = 6


@dataclass(frozen=True)
class PublishConfig:
    """Optional upload of the latest committed checkpoint as a Kaggle Model (``kagglehub.model_upload``).

    Empty ``model_handle`` (e.g. ``user/nx46vx/pyTorch/default``) = never; never under ``kaggle-submit``.
    """

    model_handle: str = ""
    version_notes: str = "nx46vx checkpoint"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; immutable, so a run's config can be hashed and compared."""

    profile: str = "default"
    seed: int = 46
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), JSON-serialisable."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def available_profiles() -> list[str]:
    """Names of the TOML profiles shipped with the package."""
    root = resources.files("nx46vx") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def _read_toml_text(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config is not valid TOML", path=origin, expected="TOML", found=str(exc)) from None


def profile_dict(name: str) -> dict[str, Any]:
    """The overrides a profile applies, as a nested dict."""
    resource = resources.files("nx46vx") / "configs" / f"{name}.toml"
    if not resource.is_file():
        raise ConfigError(
            "unknown profile",
            expected=f"one of {available_profiles()}",
            found=repr(name),
        )
    return _read_toml_text(resource.read_text(encoding="utf-8"), f"profile {name}")


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError("override must look like section.key=value", expected="section.key=value", found=text)
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def _apply(obj: Any, key: str, value: Any, origin: str) -> Any:
    head, _, rest = key.partition(".")
    names = {f.name: f for f in fields(obj)}
    if head not in names:
        raise ConfigError(
            f"unknown setting {key!r} (from {origin})",
            expected=f"one of {sorted(names)}",
            found=head,
        )
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{head!r} is not a section (from {origin})", expected="a value", found=key)
        return replace(obj, **{head: _apply(current, rest, value, origin)})
    if dataclasses.is_dataclass(current):
        if not isinstance(value, Mapping):
            raise ConfigError(f"section {head!r} needs a table (from {origin})", expected="a table", found=value)
        for sub_key, sub_value in value.items():
            current = _apply(current, str(sub_key), sub_value, origin)
        return replace(obj, **{head: current})
    return replace(obj, **{head: _coerce(current, value, key, origin)})


def _coerce(current: Any, value: Any, key: str, origin: str) -> Any:
    """Give ``value`` the type of the default it replaces, or raise a ConfigError."""
    try:
        if isinstance(current, bool):
            if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
                return value.lower() in {"true", "1", "yes"}
            if isinstance(value, bool):
                return value
            raise TypeError
        if isinstance(current, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if isinstance(current, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(current, tuple):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            if not value:
                return ()
            element = current[0] if current else value[0]
            return tuple(_coerce(element, v, key, origin) for v in value)
        if isinstance(current, str):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"setting {key!r} has the wrong type (from {origin})",
            expected=type(current).__name__,
            found=repr(value),
        ) from None
    return value


def _apply_nested(config: RunConfig, nested: Mapping[str, Any], origin: str) -> RunConfig:
    for key, value in nested.items():
        config = _apply(config, str(key), value, origin)
    return config


def load_config(
    profile: str | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig`.

    Parameters
    ----------
    profile : str, optional
        Name of a shipped profile (``demo``, ``default``, ``kaggle-train``,
        ``kaggle-submit``). Default ``default``.
    config_file : path, optional
        A TOML file with the same sections.
    overrides : mapping or list of ``section.key=value`` strings, optional
        Applied last.
    environ : mapping, optional
        Environment to read ``NX46VX__SECTION__KEY`` variables from (default
        ``os.environ``).
    """
    name = profile or "default"
    config = _apply_nested(RunConfig(), profile_dict(name), f"profile {name}")
    config = replace(config, profile=name)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError("config file not found", path=path, expected="a TOML file", found="nothing")
        config = _apply_nested(config, _read_toml_text(path.read_text(encoding="utf-8"), str(path)), str(path))
    env = os.environ if environ is None else environ
    for var, raw in sorted(env.items()):
        if var.startswith("NX46VX__"):
            key = var[len("NX46VX__"):].lower().replace("__", ".")
            _, value = parse_override(f"{key}={raw}")
            config = _apply(config, key, value, f"environment {var}")
    if overrides:
        items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else list(overrides.items())
        for key, value in items:
            config = _apply(config, key, value, "override")
    _validate(config)
    return config


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting (or of each value of a list setting); ``None`` = unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def holds_all(self, values: tuple[float, ...]) -> bool:
        return all(self.holds(v) for v in values)

    def describe(self) -> str:
        def text(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        low = None if self.low is None else f"{'>' if self.low_open else '>='} {text(self.low)}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {text(self.high)}"
        return " and ".join(part for part in (low, high) if part) or "a number"


def _r(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> Range:
    return Range(low, high, low_open, high_open)


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE, FRACTION = _r(0, low_open=True), _r(0), _r(1), _r(0, 1)
SIGMA = _r(0, 32, low_open=True)
# Every numeric setting (and every value of a numeric list) has a range here; tests/test_inputs.py checks that
# none is missing, so a new setting cannot skip validation.
RANGES: dict[str, Range] = {
    "seed": _r(0, 2**63 - 1),
    "data.val_fraction": _r(0, 1, low_open=True, high_open=True),
    "data.min_val_volumes": NON_NEGATIVE,
    "data.max_train_volumes": NON_NEGATIVE,
    "data.min_val_surface_voxels": NON_NEGATIVE,
    "features.smooth_sigma": SIGMA,
    "features.entropy_window": _r(1, 63),
    "features.proj_half_window": _r(0, 64),
    "features.laplace_sigma": SIGMA,
    "features.bandpass_sigmas": SIGMA,
    "features.hessian_sigma": SIGMA,
    "features.chunk_z": _r(8, 4096),
    "features.pool_per_class": _r(1, 10**8),
    "search.meta_neurons": _r(1, 1024),
    "search.l1": _r(0, 100),
    "search.l2": _r(0, 100),
    "search.max_iter": _r(1, 10**6),
    "search.max_epochs": _r(1, 10**5),
    "search.patience": _r(1, 10**5),
    "search.min_delta": _r(0, 1),
    "search.samples_per_class": _r(1, 10**9),
    "search.val_samples_per_class": _r(1, 10**9),
    "search.max_meta_neurons": _r(1, 1024),
    "search.objective_every": _r(1, 10**6),
    "search.block_rows": _r(1, 2**26),
    "search.batch_candidates": NON_NEGATIVE,
    "search.fbeta": _r(0, 100, low_open=True),
    "search.init_scale": _r(0, 10),
    "distill.ensemble_k": _r(1, 1000),
    "distill.width": _r(1, 1024),
    "distill.depth": _r(1, 8),
    "distill.blocks": _r(1, 64),
    "distill.patch": _r(2, 1024),
    "distill.inference_patch": _r(0, 1024),
    "distill.batch": _r(1, 4096),
    "distill.steps": NON_NEGATIVE,
    "distill.max_steps": AT_LEAST_ONE,
    "distill.warmup_steps": AT_LEAST_ONE,
    "distill.lr": _r(0, 10, low_open=True),
    "distill.weight_decay": _r(0, 10),
    "distill.dice_weight": NON_NEGATIVE,
    "distill.bce_weight": NON_NEGATIVE,
    "distill.skeleton_weight": NON_NEGATIVE,
    "distill.teacher_weight": NON_NEGATIVE,
    "distill.teacher_weight_end": NON_NEGATIVE,
    "distill.temperature": _r(0, 100, low_open=True),
    "distill.positive_fraction": FRACTION,
    "distill.cache_volumes": _r(1, 10**6),
    "distill.foreground_samples": _r(1, 10**9),
    "distill.teacher_volumes": NON_NEGATIVE,
    "distill.val_every": AT_LEAST_ONE,
    "distill.val_volumes": NON_NEGATIVE,
    "distill.workers": _r(0, 256),
    "distill.processes": _r(0, 1024),
    "distill.checkpoint_every": AT_LEAST_ONE,
    "segment.baseline_sigma": _r(0, 32),
    "segment.min_component_voxels": NON_NEGATIVE,
    "segment.overlap": _r(0, 1, high_open=True),
    "segment.min_ratio": FRACTION,
    "segment.fallback_percent": _r(0, 100, low_open=True),
    "segment.validation_volumes": NON_NEGATIVE,
    "segment.plug_holes_voxels": NON_NEGATIVE,
    "segment.tunnel_film_voxels": NON_NEGATIVE,
    "segment.window_batch": _r(0, 256),
    "budget.total_s": NON_NEGATIVE,
    "budget.margin_s": NON_NEGATIVE,
    "budget.reserve_per_volume_s": NON_NEGATIVE,
    "budget.reserve_safety": _r(1),
    "budget.features_share": FRACTION,
    "budget.search_share": FRACTION,
    "budget.feature_s_per_mvoxel": POSITIVE,
    "budget.score_s_per_mvoxel": NON_NEGATIVE,
    "budget.repair_s_per_mvoxel": NON_NEGATIVE,
    "checkpoint.every_iters": AT_LEAST_ONE,
    "checkpoint.keep_last": AT_LEAST_ONE,
    "output.quota_gb": POSITIVE,
    "progress.interval_s": _r(5, 15),
    "progress.health_every": AT_LEAST_ONE,
}

#: What ``distill.normalization`` may be (nnU-Net's CTNormalization needs dataset statistics: it comes with ``distill.init`` only).
STUDENT_NORMALIZATIONS = ("auto", "percentile", "ZScoreNormalization", "RescaleTo01Normalization", "NoNormalization")
#: What ``distill.precision`` may be (:func:`nx46vx.segment.compute_dtype`).
PRECISIONS = ("auto", "float32")
#: What a ``distill.teachers`` entry may be.
TEACHER_SPECS = "ensemble, nnunet:<model folder>, torchscript:<path>, tiff:<dir> or python:<module>:<callable>"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:<index> or mps"
# Settings whose text is checked against a fixed set of values or a pattern: key → (check, what is allowed).
CHOICES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "features.device": (lambda v: bool(_DEVICE.match(v)), DEVICE_CHOICES),
    "search.device": (lambda v: bool(_DEVICE.match(v)), DEVICE_CHOICES),
    "distill.device": (lambda v: bool(_DEVICE.match(v)), DEVICE_CHOICES),
    "search.kernel": (lambda v: v in {"auto", "native", "torch"}, "auto, native or torch"),
    "data.on_bad_test": (lambda v: v in {"error", "empty"}, "error or empty"),
    "distill.arch": (lambda v: v in {"auto", "resenc", "plain"}, "auto, resenc or plain"),
    "distill.precision": (lambda v: v in PRECISIONS, " or ".join(PRECISIONS)),
    "segment.method": (lambda v: v == "auto" or v in SEGMENT_METHODS, f"auto or one of {list(SEGMENT_METHODS)}"),
    "distill.augment": (lambda v: v in AUGMENTATIONS, f"names from {list(AUGMENTATIONS)}"),
    "distill.teachers": (
        lambda v: v == SEGMENT_METHODS["ensemble"] or (v.partition(":")[0] in {"nnunet", "torchscript", "tiff", "python"} and bool(v.partition(":")[2])),
        TEACHER_SPECS,
    ),
    "distill.normalization": (lambda v: v in STUDENT_NORMALIZATIONS, ", ".join(STUDENT_NORMALIZATIONS)),
    "distill.init": (lambda v: v == "" or (v.startswith("nnunet:") and len(v) > len("nnunet:")), 'empty or nnunet:<model folder>[/fold_<k>]'),
}
FREE_TEXT = {"profile", "publish.model_handle", "publish.version_notes"}


def settings(config: RunConfig) -> dict[str, Any]:
    """Every setting as ``{"section.key": value}`` (top-level ones by their name)."""
    out: dict[str, Any] = {}
    for item in fields(config):
        value = getattr(config, item.name)
        if is_dataclass(value):
            out.update({f"{item.name}.{sub.name}": getattr(value, sub.name) for sub in fields(value)})
        else:
            out[item.name] = value
    return out


def _check_value(key: str, value: Any) -> None:
    values = value if isinstance(value, tuple) else (value,)
    if key in RANGES:
        allowed = RANGES[key]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not numeric or not allowed.holds_all(values):
            raise ConfigError(f"invalid setting {key}", expected=allowed.describe() + (" for every value" if isinstance(value, tuple) else ""), found=value)
    elif key in CHOICES:
        check, allowed_text = CHOICES[key]
        if not all(isinstance(v, str) and check(v) for v in values):
            raise ConfigError(f"invalid setting {key}", expected=allowed_text, found=value)


def _validate(config: RunConfig) -> None:
    """Every setting against its range or choices, then the rules that relate settings to each other."""
    for key, value in settings(config).items():
        _check_value(key, value)
    checks = [
        (bool(config.search.l1), "search.l1", "one or more values", config.search.l1),
        (bool(config.search.l2), "search.l2", "one or more values", config.search.l2),
        (len(config.features.bandpass_sigmas) == 2, "features.bandpass_sigmas", "two sigmas", config.features.bandpass_sigmas),
        (config.features.entropy_window % 2 == 1, "features.entropy_window", "an odd window", config.features.entropy_window),
        (config.search.max_meta_neurons >= config.search.meta_neurons, "search.max_meta_neurons", f">= search.meta_neurons = {config.search.meta_neurons}", config.search.max_meta_neurons),
        (config.budget.search_share <= 1.0 - config.budget.features_share, "budget.search_share", "in [0, 1 - features_share]", config.budget.search_share),
        (bool(config.distill.blocks), "distill.blocks", "one or more values", config.distill.blocks),
        (
            config.distill.inference_patch % (2 ** config.distill.depth) == 0,
            "distill.inference_patch",
            f"0 or a positive multiple of 2**depth = {2 ** config.distill.depth}",
            config.distill.inference_patch,
        ),
        (
            config.distill.patch % (2 ** config.distill.depth) == 0 and config.distill.patch >= 2**config.distill.depth,
            "distill.patch",
            f"a positive multiple of 2**depth = {2 ** config.distill.depth}",
            config.distill.patch,
        ),
    ]
    for ok, key, expected, found in checks:
        if not ok:
            raise ConfigError(f"invalid setting {key}", expected=expected, found=found)
