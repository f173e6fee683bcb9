"""The student's training data: every training volume decoded lazily into a bounded cache, foreground coordinates
cached on disk, teacher targets for a bounded subset, and batches prepared ahead in background threads.

A batch is a pure function of ``(seed, step)`` (:func:`nx46vx.patches.make_batch`), so
preparing the next ones ahead changes nothing: a resumed run draws the same batches.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ..atomic import cache_key, load_arrays_checked, save_arrays_checked
from ..discovery import TrainPair
from ..distill import Teacher, soft_target
from ..patches import TrainVolume, foreground_sample
from ..segment import ENSEMBLE, normalised
from ..volumes import read_pair

if TYPE_CHECKING:
    from .context import RunContext

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
        admit: Callable[[int], bool] = lambda _n: True,
        on_read: Callable[[tuple[int, ...]], None] = lambda _s: None,
    ) -> None:
        self.pairs = list(pairs)
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
        volume = TrainVolume(normalised(image), label, self._foreground(pair, label), self.targets.get(pair.id), self.priors.get(pair.id))
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

    def close(self) -> None:
        if self.pool is not None:
            for future in self._pending.values():
                future.cancel()
            self.pool.shutdown(wait=True)


def teacher_maps(
    ctx: "RunContext", volume_keys: dict[str, str], teachers: Sequence[Teacher], pairs: Sequence[TrainPair], *, phase: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """Teachers' mean map per volume of a bounded subset (cached per volume and teacher): never every training volume.

    Returns the mean maps, the ensemble teacher's own maps (the student's prior
    input with ``distill.teacher_input``) and each teacher's coverage in percent.
    """
    cache = ctx.output / "cache" / "teachers"
    cache.mkdir(parents=True, exist_ok=True)
    targets, priors, covered = {}, {}, {t.spec: 0 for t in teachers}
    for pair in pairs if teachers else []:
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
    coverage = {spec: 100.0 * n / max(1, len(pairs)) for spec, n in covered.items()}
    return targets, priors, coverage
