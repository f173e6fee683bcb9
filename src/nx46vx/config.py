"""Run configuration: frozen dataclasses, TOML profiles, file and ``section.key=value`` overrides.

Resolution order (later wins): the built-in defaults below, the profile
(``configs/<name>.toml`` shipped inside the package), a user TOML file, environment
variables ``NX46VX__SECTION__KEY=value``, then explicit overrides (``--set`` on the
command line, keyword arguments of :func:`nx46vx.run`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

AUGMENTATIONS = ("flip", "rot90", "affine", "intensity", "noise", "blur", "lowres")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class DataConfig:
    """What to read and how to split it.

    ``val_fraction`` of the training volumes (at least ``min_val_volumes``) are held
    out *by volume* for validation; ``max_train_volumes`` caps how many training pairs
    are used (0 = all).
    """

    include_deprecated: bool = False
    val_fraction: float = 0.2
    min_val_volumes: int = 1
    max_train_volumes: int = 0


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
    """The candidate grid and its training schedule (see :mod:`nx46vx.search`)."""

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
    device: str = "auto"


@dataclass(frozen=True)
class DistillConfig:
    """The student and its training (see :mod:`nx46vx.distill`, :mod:`nx46vx.student`, :mod:`nx46vx.patches`).

    ``teachers``: any of ``ensemble`` (top ``ensemble_k`` search candidates),
    ``torchscript:<path>``, ``tiff:<dir>``, ``python:<module>:<callable>``; every
    listed teacher is required; ``[]`` trains on the labels alone. ``arch``:
    ``resenc`` (residual-encoder U-Net), ``plain``, or ``auto`` (ResEnc on a GPU,
    plain width ≤ 16 and patch ≤ 48 on a CPU). ``steps`` = 0 trains as long as the
    budget grants (``max_steps`` when there is no budget); the learning-rate
    schedule is laid out over the granted steps after ``warmup_steps``. Loss:
    ``dice_weight·Dice + bce_weight·BCE + skeleton_weight·skeleton recall +
    w(t)·teacher``, ``w`` going linearly from ``teacher_weight`` to
    ``teacher_weight_end``. Every ``val_every`` steps the student is scored by the
    competition metric on ``val_volumes`` validation volumes and the best weights kept.
    """

    enabled: bool = True
    teachers: tuple[str, ...] = ("ensemble",)
    ensemble_k: int = 5
    arch: str = "auto"
    width: int = 32
    depth: int = 4
    blocks: tuple[int, ...] = (1, 3, 4, 6, 6)
    patch: int = 128
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
    augment: tuple[str, ...] = AUGMENTATIONS
    cache_volumes: int = 16
    foreground_samples: int = 20000
    teacher_volumes: int = 8
    val_every: int = 100
    val_volumes: int = 2
    workers: int = 2
    checkpoint_every: int = 50
    device: str = "auto"


@dataclass(frozen=True)
class SegmentConfig:
    """Segmentation of the test volumes.

    ``method``: ``auto`` (whichever of the available segmenters scores best on the
    validation volumes), ``baseline`` (smoothed-intensity Otsu), ``search``,
    ``ensemble``, ``student``. Probability maps are cut by 3-D hysteresis with
    thresholds chosen on validation; when hysteresis keeps less than
    ``min_ratio`` of the voxels, the top ``fallback_percent`` % are kept instead.
    ``export_probabilities`` also writes ``probabilities/<id>.tif`` (uint8, p·255)
    beside the submission, for blending with other notebooks.
    """

    method: str = "auto"
    baseline_sigma: float = 1.0
    min_component_voxels: int = 64
    overlap: float = 0.5
    flip_tta: bool = False
    min_ratio: float = 0.005
    fallback_percent: float = 5.0
    validation_volumes: int = 4
    export_probabilities: bool = False


@dataclass(frozen=True)
class BudgetConfig:
    """Time budget in seconds (0 = unlimited) and its split.

    The training window (``total_s − margin − reserve``) is shared: features get
    ``features_share``, the search ``search_share``, distillation the rest; unused
    time passes on. ``feature_s_per_mvoxel`` predicts the feature cost of a volume
    until one has been measured.
    """

    total_s: float = 0.0
    margin_s: float = 60.0
    reserve_per_volume_s: float = 30.0
    reserve_safety: float = 2.0
    features_share: float = 0.25
    search_share: float = 0.45
    feature_s_per_mvoxel: float = 2.0


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


def _validate(config: RunConfig) -> None:
    checks = [
        (config.search.meta_neurons >= 1, "search.meta_neurons", ">= 1", config.search.meta_neurons),
        (config.search.max_iter >= 1, "search.max_iter", ">= 1", config.search.max_iter),
        (config.search.max_epochs >= 1, "search.max_epochs", ">= 1", config.search.max_epochs),
        (bool(config.search.l1) and all(v >= 0 for v in config.search.l1), "search.l1", "one or more values >= 0", config.search.l1),
        (bool(config.search.l2) and all(v >= 0 for v in config.search.l2), "search.l2", "one or more values >= 0", config.search.l2),
        (config.search.samples_per_class >= 1, "search.samples_per_class", ">= 1", config.search.samples_per_class),
        (config.search.kernel in {"auto", "native", "torch"}, "search.kernel", "auto, native or torch", config.search.kernel),
        (0.0 < config.data.val_fraction < 1.0, "data.val_fraction", "in (0, 1)", config.data.val_fraction),
        (config.features.chunk_z >= 8, "features.chunk_z", ">= 8", config.features.chunk_z),
        (len(config.features.bandpass_sigmas) == 2, "features.bandpass_sigmas", "two sigmas", config.features.bandpass_sigmas),
        (0.0 <= config.budget.features_share <= 1.0, "budget.features_share", "in [0, 1]", config.budget.features_share),
        (0.0 <= config.budget.search_share <= 1.0 - config.budget.features_share, "budget.search_share", "in [0, 1 - features_share]", config.budget.search_share),
        (config.budget.feature_s_per_mvoxel > 0, "budget.feature_s_per_mvoxel", "> 0", config.budget.feature_s_per_mvoxel),
        (config.output.quota_gb > 0, "output.quota_gb", "> 0", config.output.quota_gb),
        (config.budget.total_s >= 0, "budget.total_s", ">= 0 (0 = unlimited)", config.budget.total_s),
        (config.checkpoint.every_iters >= 1, "checkpoint.every_iters", ">= 1", config.checkpoint.every_iters),
        (5.0 <= config.progress.interval_s <= 15.0, "progress.interval_s", "between 5 and 15 seconds", config.progress.interval_s),
        (config.progress.health_every >= 1, "progress.health_every", ">= 1", config.progress.health_every),
        (config.checkpoint.keep_last >= 1, "checkpoint.keep_last", ">= 1", config.checkpoint.keep_last),
        (
            config.segment.method in {"auto", "baseline", "search", "ensemble", "student"},
            "segment.method",
            "auto, baseline, search, ensemble or student",
            config.segment.method,
        ),
        (0.0 <= config.segment.overlap < 1.0, "segment.overlap", "in [0, 1)", config.segment.overlap),
        (config.distill.temperature > 0, "distill.temperature", "> 0", config.distill.temperature),
        (config.distill.arch in {"auto", "resenc", "plain"}, "distill.arch", "auto, resenc or plain", config.distill.arch),
        (config.distill.depth >= 1, "distill.depth", ">= 1", config.distill.depth),
        (config.distill.width >= 1, "distill.width", ">= 1", config.distill.width),
        (bool(config.distill.blocks) and all(b >= 1 for b in config.distill.blocks), "distill.blocks", "one or more values >= 1", config.distill.blocks),
        (config.distill.batch >= 1, "distill.batch", ">= 1", config.distill.batch),
        (config.distill.steps >= 0, "distill.steps", ">= 0 (0 = as long as the budget grants)", config.distill.steps),
        (config.distill.max_steps >= 1, "distill.max_steps", ">= 1", config.distill.max_steps),
        (config.distill.warmup_steps >= 1, "distill.warmup_steps", ">= 1", config.distill.warmup_steps),
        (config.distill.val_every >= 1, "distill.val_every", ">= 1", config.distill.val_every),
        (config.distill.workers >= 0, "distill.workers", ">= 0", config.distill.workers),
        (config.distill.checkpoint_every >= 1, "distill.checkpoint_every", ">= 1", config.distill.checkpoint_every),
        (0.0 <= config.distill.positive_fraction <= 1.0, "distill.positive_fraction", "in [0, 1]", config.distill.positive_fraction),
        (set(config.distill.augment) <= set(AUGMENTATIONS), "distill.augment", f"names from {list(AUGMENTATIONS)}", config.distill.augment),
        (
            config.distill.patch >= 2 ** config.distill.depth and config.distill.patch % (2 ** config.distill.depth) == 0,
            "distill.patch",
            f"a positive multiple of 2**depth = {2 ** config.distill.depth}",
            config.distill.patch,
        ),
    ]
    for ok, key, expected, found in checks:
        if not ok:
            raise ConfigError(f"invalid setting {key}", expected=expected, found=found)
