"""The student's training data: every training volume decoded lazily into a bounded cache, foreground coordinates
cached on disk, the teachers' maps of a bounded subset (within the time granted, the subset stored), the
agreement probe, and batches prepared ahead in background threads.

A batch is a pure function of ``(seed, step)`` (:func:`nx46vx.patches.make_batch`), so
preparing the next ones ahead changes nothing: a resumed run draws the same batches.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from .. import streams
from ..atomic import cache_key, load_arrays_checked, save_arrays_checked
from ..discovery import TrainPair
from ..config import DistillConfig
from ..distill import Teacher, soft_target
from ..errors import DistillationNotExecuted
from ..patches import TrainVolume, foreground_sample, make_batch
from ..segment import ENSEMBLE, PERCENTILE, Intensity, normalised
from ..volumes import read_pair, volume_shape
from .sources import validation_probabilities

if TYPE_CHECKING:
    from .context import RunContext
    from .schedule import MapsBudget
    from .state import RunState

log = logging.getLogger("nx46vx")


class VolumeCache:
    """Decoded training volumes, at most ``capacity`` in memory (least recently used leaves first); thread-safe.

    Parameters
    ----------
    pairs : sequence of TrainPair
    keys : dict id → str
        Content key per volume (image and label).
    folder : Path
        Where foreground samples are cached (named by :func:`~nx46vx.atomic.cache_key` of the volume's key, cap and seed).
    foreground_cap, seed : int
        The seeded, capped sample of label-1 coordinates per volume.
    targets : dict id → ndarray, optional
        Teacher soft targets of the subset that has them.
    priors : dict id → ndarray, optional
        The prior input maps (``distill.teacher_input``; every volume then needs one).
    admit : callable
        ``admit(nbytes)`` → whether a cache file may be written (the output quota).
    on_read : callable
        Called with each decoded volume's shape (statistics).
    """

    def __init__(
        self,
        pairs: Sequence[TrainPair],
        keys: dict[str, str],
        folder: Path,
        *,
        foreground_cap: int,
        seed: int,
        capacity: int,
        targets: dict[str, np.ndarray] | None = None,
        priors: dict[str, np.ndarray] | None = None,
        intensity: Intensity = PERCENTILE,
        admit: Callable[[int], bool] = lambda _n: True,
        on_read: Callable[[tuple[int, ...]], None] = lambda _s: None,
    ) -> None:
        self.pairs = list(pairs)
        self.intensity = intensity
        self.keys = keys
        self.folder = folder
        self.foreground_cap = foreground_cap
        self.seed = seed
        self.capacity = max(1, capacity)
        self.targets = targets or {}
        self.priors = priors or {}
        self.admit = admit
        self.on_read = on_read
        self._cache: OrderedDict[int, TrainVolume] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[int, threading.Lock] = {}
        self.reads = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def _foreground(self, pair: TrainPair, label: np.ndarray) -> np.ndarray:
        path = self.folder / f"{cache_key(self.keys[pair.id], self.foreground_cap, self.seed)}.npz"
        try:
            return load_arrays_checked(path, ("coords",))["coords"]
        except (OSError, ValueError, KeyError):
            coords = foreground_sample(label, cap=self.foreground_cap, seed=self.seed)
            if self.admit(coords.nbytes):
                self.folder.mkdir(parents=True, exist_ok=True)
                save_arrays_checked(path, {"coords": coords})
            return coords

    def __call__(self, index: int) -> TrainVolume:
        with self._lock:
            loading = self._loading.setdefault(index, threading.Lock())
        with loading:  # one thread decodes a volume; the others wanting it wait for that copy
            return self._get(index)

    def _get(self, index: int) -> TrainVolume:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        pair = self.pairs[index]
        image, label = read_pair(pair.image, pair.label)
        self.on_read(image.shape)
        volume = TrainVolume(normalised(image, intensity=self.intensity), label, self._foreground(pair, label), self.targets.get(pair.id), self.priors.get(pair.id))
        with self._lock:
            self.reads += 1
            self._cache[index] = volume
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return volume


class Prefetcher:
    """``get(step)`` returns ``make(step)``, computed up to ``depth`` steps ahead on ``workers`` threads (0 = inline)."""

    def __init__(self, make: Callable[[int], dict[str, torch.Tensor]], *, workers: int, depth: int | None = None) -> None:
        self.make = make
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nx46vx-batches") if workers > 0 else None
        self.depth = depth if depth is not None else 2 * workers
        self._pending: dict[int, Future] = {}

    def get(self, step: int) -> dict[str, torch.Tensor]:
        if self.pool is None:
            return self.make(step)
        for ahead in range(step, step + self.depth + 1):
            if ahead not in self._pending:
                self._pending[ahead] = self.pool.submit(self.make, ahead)
        for stale in [s for s in self._pending if s < step]:
            self._pending.pop(stale).cancel()
        return self._pending.pop(step).result()

    def settle(self) -> None:
        """Wait until the batches under way are made (their errors surface at :meth:`get`): what runs next has the cores to
        itself. A validation timed beside them measured the student's inference ~1.5× dearer than it runs on the test
        volumes (2.6× beside two busy threads on 2 cores), and that measurement sizes the reserve."""
        wait(list(self._pending.values()))

    def close(self) -> None:
        if self.pool is not None:
            for future in self._pending.values():
                future.cancel()
            self.pool.shutdown(wait=True)


#: ``fits(seconds_per_voxel, voxels_left)``: whether the rest of a loop over volumes may still run (asked before each volume).
Fits = Callable[[float, int], bool]


def teacher_maps(
    ctx: "RunContext", volume_keys: dict[str, str], teachers: Sequence[Teacher], pairs: Sequence[TrainPair], *, phase: str, fits: Fits | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float], int]:
    """Teachers' mean map per volume of a bounded subset (cached per volume and teacher): never every training volume.

    ``fits`` is asked before each volume with the seconds per voxel measured so far
    (0 before the first) and the voxels left; the maps stop at its first False (None:
    every volume, as when a stored subset is replayed). Returns the mean maps, the
    ensemble teacher's own maps (the student's prior input with ``distill.teacher_input``),
    each teacher's coverage in percent of ``pairs`` and how many of ``pairs`` (the first
    ones) were visited.
    """
    cache = ctx.output / "cache" / "teachers"
    cache.mkdir(parents=True, exist_ok=True)
    targets, priors, covered = {}, {}, {t.spec: 0 for t in teachers}
    voxels_left = sum(int(np.prod(volume_shape(p.image) or (0,))) for p in pairs) if fits is not None else 0
    t0, voxels_done, visited = ctx.governor.clock(), 0, 0
    for pair in pairs if teachers else []:
        if fits is not None and not fits((ctx.governor.clock() - t0) / voxels_done if voxels_done else 0.0, voxels_left):
            break
        visited += 1
        image = None
        probs = []
        for teacher in teachers:
            path = cache / f"{cache_key(volume_keys[pair.id], teacher.sha256)}.npz"
            prob = None
            try:
                prob = load_arrays_checked(path, ("prob",))["prob"].astype(np.float32) if path.is_file() else None
            except Exception as exc:  # a corrupt cache entry is recomputed, never used
                log.warning("teacher cache %s is corrupt (%s); recomputing", path, exc)
            if prob is None:
                image = read_pair(pair.image, pair.label)[0] if image is None else image
                prob = teacher.predict(pair.id, image)
                if prob is not None:
                    stored = prob.astype(np.float16)
                    if ctx.admit_cache(path, stored.nbytes, phase):
                        save_arrays_checked(path, {"prob": stored})
                    prob = stored.astype(np.float32)  # what a later cache hit returns
            covered[teacher.spec] += prob is not None
            probs.append(prob)
            if teacher.spec == ENSEMBLE and prob is not None:
                priors[pair.id] = prob
        target = soft_target(probs)
        if target is not None:
            targets[pair.id] = target
        if image is not None:
            ctx.governor.account("teacher_volume")  # a map was computed (cache hits are free)
        size = next((pr.size for pr in probs if pr is not None), 0)
        voxels_done, voxels_left = voxels_done + size, max(0, voxels_left - size)
    coverage = {spec: 100.0 * n / max(1, len(pairs)) for spec, n in covered.items()}
    return targets, priors, coverage, visited


@dataclasses.dataclass
class StudentMaps:
    """The teachers' maps a student trains with (:func:`student_maps`).

    ``pairs``: the training volumes its batches draw from; ``target_ids``: the ones the
    maps covered (stored with the student, replayed on resume); ``cut``: why the maps it
    needs did not fit the time (it then does not train). ``ensemble_seconds_per_voxel``:
    the ensemble teacher's validation maps' cost (0 without that teacher): the prior's
    when the student takes it as an input, the blend's pass on top of the student's.
    """

    targets: dict[str, np.ndarray]
    priors: dict[str, np.ndarray]
    coverage: dict[str, float]
    target_ids: list[str]
    pairs: list[TrainPair]
    ensemble_seconds_per_voxel: float = 0.0
    cut: str | None = None


def student_maps(ctx: "RunContext", state: "RunState", teachers: Sequence[Teacher], cfg: DistillConfig, *, budget: "MapsBudget | None",
                 replay: Sequence[str] | None) -> StudentMaps:
    """Every teacher's validation maps (``state.teacher_val_probs``), then their maps of the seeded training subset, within ``budget``.

    ``replay`` (the ``target_ids`` stored with a restored student) fixes the subset and
    lifts the budget: a stored time-driven decision, not decided again. With
    ``distill.teacher_input`` the ensemble's maps are only of use complete (the prior is
    an input of every patch), so a cut there is :attr:`StudentMaps.cut`.
    """
    state.teacher_val_probs = {}
    ensemble_s = 0.0
    for teacher in teachers:
        probs, seconds_per_voxel = validation_probabilities(ctx, state, teacher.spec, teacher.predict, keep=True, fits=budget and budget.whole)
        state.teacher_val_probs[teacher.spec] = probs if probs and all(pr is not None for pr in probs) else None
        if teacher.spec == ENSEMBLE:
            ensemble_s = seconds_per_voxel
            if cfg.teacher_input and probs is None:
                return StudentMaps({}, {}, {}, [], [], ensemble_s, cut="the ensemble's validation maps (the student's prior input) did not fit")
    order = streams.generator(ctx.config.seed, streams.TEACHER_SUBSET).permutation(len(state.train_pairs))
    subset = [state.train_pairs[i] for i in order[: cfg.teacher_volumes] if replay is None or state.train_pairs[i].id in replay]
    targets, priors, coverage, visited = teacher_maps(ctx, state.volume_keys, teachers, subset, phase="distillation",
                                                      fits=budget and (budget.whole if cfg.teacher_input else budget.partial))
    # with the prior as an input every patch needs the ensemble's map: student_config only keeps the setting when the
    # maps cover every training volume, so the subset is all of them (in the seeded order the batches index)
    maps = StudentMaps(targets, priors, coverage, [p.id for p in subset[:visited]], subset if cfg.teacher_input else list(state.train_pairs), ensemble_s)
    if cfg.teacher_input and visited < len(subset):
        maps.cut = f"the ensemble's maps of {visited} of {len(subset)} training volumes fit (the prior needs every one)"
    elif cfg.teacher_input and sum(p.id in priors for p in subset) != len(state.train_pairs):
        raise DistillationNotExecuted("distill.teacher_input needs the ensemble's map of every training volume", expected=f"{len(state.train_pairs)} maps",
                                      found=f"{sum(p.id in priors for p in subset)}", hint="set distill.teacher_input = false")
    return maps


def agreement_probe(
    ctx: "RunContext", state: "RunState", val: Sequence[tuple[np.ndarray, np.ndarray]], teachers: Sequence[Teacher], cfg: DistillConfig, priors: Sequence[np.ndarray] | None,
    *, intensity: Intensity = PERCENTILE,
) -> dict[str, torch.Tensor] | None:
    """Seeded validation patches with the teachers' targets (and ``priors``, the student's prior input per volume), to measure student–teacher agreement;
    images normalised by the student's ``intensity``."""
    probes = []
    for i, (image, label) in enumerate(val):
        target = soft_target([state.teacher_val_probs[t.spec][i] if state.teacher_val_probs[t.spec] else None for t in teachers])
        prior = priors[i] if priors else None
        probes.append(TrainVolume(normalised(image, intensity=intensity), label, foreground_sample(label, cap=cfg.foreground_samples, seed=ctx.config.seed), target, prior))
    if not probes or (cfg.teacher_input and not priors):
        return None
    return make_batch(lambda i: probes[i], len(probes), 0, seed=ctx.config.seed + streams.PROBE_SEED_OFFSET, batch=8, patch=cfg.patch, positive_fraction=cfg.positive_fraction,
                      augmentations=(), prior=cfg.teacher_input)
