"""Phase 3: the per-voxel 3-D feature bank, computed in z-chunks with a halo, and its disk cache.

Every feature is a float32 map over the whole (z, y, x) volume, computed from the
intensity normalised per volume to [0, 1] by its 1st and 99.5th percentiles. The
one-dimensional passes run in ``scipy.ndimage`` on CPU (threaded) and in torch on a
GPU; the Gaussian derivatives share their partial products; the elementwise steps
are torch on both. Gaussian kernels are truncated at 3σ, borders
replicate the edge voxel. Spec version :data:`SPEC_VERSION`; parameters in
:class:`nx46vx.config.FeatureConfig`.

``x`` features (used by ``w`` and ``α``):

* ``intensity`` — Gaussian-smoothed intensity, σ = ``smooth_sigma``.
* ``local_entropy`` — differential entropy of a Gaussian with the local variance
  of the normalised intensity in a ``entropy_window``³ box:
  ``0.5·log(2πe·(var + 1e-4))`` (a Gaussian proxy of the local histogram entropy).
* ``grad_mag`` — Gaussian gradient magnitude at σ = ``smooth_sigma``.
* ``proj_max`` / ``proj_mean`` — max / mean of the smoothed intensity along z over
  ``±proj_half_window`` slices (local intensity projections across the sheets).
* ``laplace`` — scale-normalised Laplacian of Gaussian, ``σ²·ΔG_σ * I`` at
  σ = ``laplace_sigma``.
* ``bandpass_response`` — difference of Gaussians ``G_σ1 * I − G_σ2 * I``.
* ``sheetness`` — Hessian plate measure at σ = ``hessian_sigma``: with the
  eigenvalues of ``σ²·H`` ordered by magnitude ``|λ1| ≤ |λ2| ≤ |λ3|``,
  ``max(−λ3, 0)·exp(−(λ2/λ3)²/(2·0.5²))`` — large on a bright sheet (one strong
  negative curvature across it, little along it), small on lines, blobs and flat
  regions.

``g`` features (spatial derivatives, used by ``β``): ``|∂z|, |∂y|, |∂x|`` of the
smoothed intensity.

The cache keeps, per (volume content hash, spec), a *pool* of labelled voxels
(up to ``pool_per_class`` per class, label 2 never sampled) with their features,
so no candidate, epoch or later run recomputes features of training volumes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .atomic import cache_key, load_arrays_checked, save_arrays_checked
from .config import FeatureConfig
from . import streams

log = logging.getLogger("nx46vx")

SPEC_VERSION = "1"
X_NAMES = ("intensity", "local_entropy", "grad_mag", "proj_max", "proj_mean", "laplace", "bandpass_response", "sheetness")
G_NAMES = ("d_z", "d_y", "d_x")
CHANNELS = X_NAMES + G_NAMES
_CACHE_TILE_VOXELS = 200_000  # elementwise slab size on CPU: a dozen float32 temporaries fit in L2/L3


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def spec_dict(config: FeatureConfig) -> dict[str, object]:
    """The parameters that change feature values (not chunking or device), with the version."""
    spec = asdict(config)
    for key in ("chunk_z", "device", "pool_per_class"):
        spec.pop(key)
    spec["version"] = SPEC_VERSION
    spec["channels"] = list(CHANNELS)
    return spec


def spec_id(config: FeatureConfig) -> str:
    """Short hash of :func:`spec_dict`."""
    return hashlib.sha256(repr(sorted(spec_dict(config).items())).encode()).hexdigest()[:12]


def halo(config: FeatureConfig) -> int:
    """Slices of context each side of a z-chunk so chunked results equal whole-volume ones.

    The widest dependency along z: a Gaussian's radius, the projection window over the
    smoothed intensity, or the entropy box.
    """
    sigmas = (config.smooth_sigma, config.laplace_sigma, config.hessian_sigma, *config.bandpass_sigmas)
    return max(max(_radius(s) for s in sigmas), _radius(config.smooth_sigma) + config.proj_half_window, config.entropy_window // 2)


def normalise(volume: np.ndarray) -> tuple[float, float]:
    """(low, high): the 1st and 99.5th intensity percentiles of a uint8 volume, exact from its histogram."""
    # torch counts uint8 without widening to int64 first (~20x numpy's bincount here)
    hist = torch.bincount(torch.from_numpy(np.ascontiguousarray(volume)).view(-1), minlength=256).numpy().astype(np.float64)
    cdf = np.cumsum(hist) / hist.sum()
    low = float(np.searchsorted(cdf, 0.01))
    high = float(np.searchsorted(cdf, 0.995))
    return low, max(high, low + 1.0)


# ----------------------------------------------------------------------------- kernels and 1-D filters


def _radius(sigma: float) -> int:
    return max(1, math.ceil(3 * sigma))


def _gaussian_kernel(sigma: float, order: int) -> np.ndarray:
    """Sampled 1-D Gaussian (order 0) or its 1st / 2nd derivative, radius ceil(3σ), float64.

    The order-0 kernel sums to 1; the 2nd derivative is made zero-mean (a second
    derivative of a constant is zero).
    """
    t = np.arange(-_radius(sigma), _radius(sigma) + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    if order == 0:
        return g
    if order == 1:
        return -t / sigma**2 * g
    d2 = (t**2 / sigma**4 - 1 / sigma**2) * g
    return d2 - d2.mean()


def _box_kernel(size: int) -> np.ndarray:
    return np.full(size, 1.0 / size)


class _TorchFilters:
    """1-D correlation along one axis of a (z, y, x) tensor with torch ``conv3d`` (GPU, or CPU for parity tests)."""

    def correlate(self, x: torch.Tensor, kernel: np.ndarray, axis: int) -> torch.Tensor:
        r = kernel.size // 2
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.size
        weight = torch.as_tensor(kernel, dtype=torch.float32, device=x.device).view(shape)
        return F.conv3d(F.pad(x[None, None], pad, mode="replicate"), weight)[0, 0]

    def max_z(self, x: torch.Tensor, half: int) -> torch.Tensor:
        padded = F.pad(x[None, None], [0, 0, 0, 0, half, half], mode="replicate")
        return F.max_pool3d(padded, (2 * half + 1, 1, 1), stride=1)[0, 0]


class _ScipyFilters:
    """The same filters with ``scipy.ndimage`` on CPU, each pass split over threads.

    scipy's 1-D filters release the GIL, so the slabs of one pass run in parallel;
    every output voxel is computed exactly as in a single call, so the bits do not
    depend on the number of threads.
    """

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="nx46vx-features") if self.threads > 1 else None

    def _run(self, x: torch.Tensor, axis: int, apply: Callable[[np.ndarray, np.ndarray], None]) -> torch.Tensor:
        src = x.numpy()
        out = np.empty_like(src)
        split = 1 if axis == 0 else 0  # slabs across an axis the filter does not run along
        edges = np.linspace(0, src.shape[split], self.threads + 1).astype(int)
        slabs = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            index = [slice(None)] * 3
            index[split] = slice(lo, hi)
            slabs.append(tuple(index))
        if self._pool is None:
            for index in slabs:
                apply(src[index], out[index])
        else:
            for future in [self._pool.submit(apply, src[index], out[index]) for index in slabs]:
                future.result()
        return torch.from_numpy(out)

    def correlate(self, x: torch.Tensor, kernel: np.ndarray, axis: int) -> torch.Tensor:
        return self._run(x, axis, lambda src, out: ndimage.correlate1d(src, kernel, axis=axis, output=out, mode="nearest"))

    def max_z(self, x: torch.Tensor, half: int) -> torch.Tensor:
        return self._run(x, 0, lambda src, out: ndimage.maximum_filter1d(src, 2 * half + 1, axis=0, output=out, mode="nearest"))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


_Filters = _TorchFilters | _ScipyFilters


def _filters_for(device: torch.device) -> _Filters:
    """scipy's separable filters on CPU (several times faster than torch's CPU conv3d), torch elsewhere."""
    return _ScipyFilters(torch.get_num_threads()) if device.type == "cpu" else _TorchFilters()


def _z_pass(x: torch.Tensor, kernel: np.ndarray, lo: int, hi: int, filters: _Filters) -> torch.Tensor:
    """Correlate along z, keeping output slices ``[lo, hi)`` and reading only the input they need.

    Where the needed input reaches the block's edge the edge is replicated, exactly as a
    pass over the whole block would do.
    """
    r = kernel.size // 2
    a, b = max(0, lo - r), min(x.shape[0], hi + r)
    return filters.correlate(x[a:b], kernel, 0)[lo - a : hi - a]


def _gaussian_derivatives(
    block: torch.Tensor, sigma: float, orders: set[tuple[int, int, int]], z_range: tuple[int, int], filters: _Filters
) -> dict[tuple[int, int, int], torch.Tensor]:
    """``G_σ^(oz, oy, ox) * block`` over the slices ``z_range`` for every requested order, sharing partial products.

    The z pass of each distinct z order is done once, and the y pass of each distinct
    (z, y) prefix once: the Hessian's six maps take 15 one-dimensional passes, not 18.
    Only the z pass reads the halo; the y and x passes run over ``z_range`` alone.

    Parameters
    ----------
    block : Tensor, float32, shape (z, y, x)
    orders : set of (oz, oy, ox), each 0, 1 or 2
    z_range : (lo, hi)
        The slices of ``block`` wanted.

    Returns
    -------
    dict of (oz, oy, ox) → Tensor, float32, shape (hi - lo, y, x)
    """
    kernels = {order: _gaussian_kernel(sigma, order) for order in {o for triple in orders for o in triple}}
    by_z = {oz: _z_pass(block, kernels[oz], *z_range, filters) for oz in sorted({o[0] for o in orders})}
    by_zy = {p: filters.correlate(by_z[p[0]], kernels[p[1]], 1) for p in sorted({o[:2] for o in orders})}
    return {o: filters.correlate(by_zy[o[:2]], kernels[o[2]], 2) for o in sorted(orders)}


def _sheetness(h: dict[tuple[int, int, int], torch.Tensor], scale: float) -> torch.Tensor:
    """Plate measure from the Hessian maps (see the module docstring), elementwise in torch."""
    a, b, c = h[(2, 0, 0)], h[(0, 2, 0)], h[(0, 0, 2)]
    d, e, f = h[(1, 1, 0)], h[(1, 0, 1)], h[(0, 1, 1)]
    # closed-form eigenvalues of the symmetric 3x3 [[a, d, e], [d, b, f], [e, f, c]]: high ≥ mid ≥ low
    q = (a + b + c) / 3
    a, b, c = a - q, b - q, c - q
    p = torch.sqrt((a * a + b * b + c * c + 2 * (d * d + e * e + f * f)) / 6).clamp_min(1e-12)
    det = (a * (b * c - f * f) - d * (d * c - f * e) + e * (d * f - b * e)) / (p * p * p)
    phi = torch.acos((det / 2).clamp(-1.0, 1.0)) / 3
    high = q + 2 * p * torch.cos(phi)
    low = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)
    mid = 3 * q - high - low
    # λ3 has the largest magnitude, λ2 the middle one
    high_wins = high.abs() >= low.abs()
    lam3 = torch.where(high_wins, high, low)
    rest_a, rest_b = torch.where(high_wins, mid, high), torch.where(high_wins, low, mid)
    lam2 = torch.where(rest_a.abs() >= rest_b.abs(), rest_a, rest_b)
    lam2, lam3 = lam2 * scale, lam3 * scale
    ratio = lam2 / (lam3.abs() + 1e-6)
    return (-lam3).clamp_min(0) * torch.exp(-(ratio * ratio) / (2 * 0.25))


def _features_of_block(block: torch.Tensor, center: tuple[int, int], config: FeatureConfig, filters: _Filters) -> torch.Tensor:
    """All channels of the slices ``center = (lo, hi)`` of a normalised (z, y, x) block → (C, hi - lo, y, x).

    The block holds at least :func:`halo` slices of context each side of ``center``
    (fewer only where the volume ends).
    """
    lo, hi = center
    s0, sl, sh = config.smooth_sigma, config.laplace_sigma, config.hessian_sigma
    s1, s2 = config.bandpass_sigmas
    hessian = {(2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1)}
    wanted: dict[float, set[tuple[int, int, int]]] = {}
    for sigma, orders in (
        (s0, {(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)}),
        (sl, {(2, 0, 0), (0, 2, 0), (0, 0, 2)}),
        (s1, {(0, 0, 0)}),
        (s2, {(0, 0, 0)}),
        (sh, hessian),
    ):
        wanted.setdefault(sigma, set()).update(orders)
    # the projections look ±h slices beyond the centre into the smoothed intensity
    h = config.proj_half_window
    wide = (max(0, lo - h), min(block.shape[0], hi + h))
    maps: dict[tuple[float, tuple[int, int, int]], torch.Tensor] = {}
    for sigma, orders in wanted.items():
        z_range = wide if sigma == s0 else center
        for order, m in _gaussian_derivatives(block, sigma, orders, z_range, filters).items():
            if (sigma, order) == (s0, (0, 0, 0)):
                smooth_wide = m
            maps[(sigma, order)] = m[lo - z_range[0] : hi - z_range[0]]

    out = torch.empty((len(CHANNELS), hi - lo) + tuple(block.shape[1:]), dtype=block.dtype, device=block.device)
    smooth = maps[(s0, (0, 0, 0))]
    dz, dy, dx = maps[(s0, (1, 0, 0))], maps[(s0, (0, 1, 0))], maps[(s0, (0, 0, 1))]
    out[0] = smooth
    torch.sqrt(dz * dz + dy * dy + dx * dx, out=out[2])

    box = _box_kernel(config.entropy_window)
    mean, mean_sq = _z_pass(block, box, lo, hi, filters), _z_pass(block * block, box, lo, hi, filters)
    for axis in (1, 2):
        mean, mean_sq = filters.correlate(mean, box, axis), filters.correlate(mean_sq, box, axis)
    torch.log(2 * math.pi * math.e * ((mean_sq - mean * mean).clamp_min(0) + 1e-4), out=out[1]).mul_(0.5)

    offset = slice(lo - wide[0], hi - wide[0])
    out[3] = filters.max_z(smooth_wide, h)[offset]
    out[4] = filters.correlate(smooth_wide, _box_kernel(2 * h + 1), 0)[offset]
    torch.mul(maps[(sl, (2, 0, 0))] + maps[(sl, (0, 2, 0))] + maps[(sl, (0, 0, 2))], sl * sl, out=out[5])
    torch.sub(maps[(s1, (0, 0, 0))], maps[(s2, (0, 0, 0))], out=out[6])
    # on CPU the eigen step runs over slabs that stay in cache (~2x faster than whole maps)
    step = max(1, _CACHE_TILE_VOXELS // (out.shape[2] * out.shape[3])) if out.device.type == "cpu" else out.shape[1]
    for z in range(0, out.shape[1], step):
        out[7, z : z + step] = _sheetness({o: maps[(sh, o)][z : z + step] for o in hessian}, sh * sh)
    for channel, derivative in zip((8, 9, 10), (dz, dy, dx)):
        torch.abs(derivative, out=out[channel])
    return out


def iter_feature_chunks(
    volume: np.ndarray, config: FeatureConfig, *, device: torch.device | None = None, chunk_z: int | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Compute features z-chunk by z-chunk.

    Parameters
    ----------
    volume : ndarray, uint8, shape (z, y, x)
    config : FeatureConfig
    device : torch.device, optional
        Default from ``config.device``.
    chunk_z : int, optional
        Slices per chunk (default ``config.chunk_z``); results do not depend on it.

    Yields
    ------
    z0, z1 : int
        The slices ``[z0, z1)`` covered.
    features : Tensor, float32, shape (C, z1 - z0, y, x)
        On ``device``; channels :data:`CHANNELS`.
    """
    device = device or resolve_device(config.device)
    chunk = chunk_z or config.chunk_z
    low, high = normalise(volume)
    pad = halo(config)
    depth = volume.shape[0]
    filters = _filters_for(device)
    try:
        for z0 in range(0, depth, chunk):
            z1 = min(depth, z0 + chunk)
            a, b = max(0, z0 - pad), min(depth, z1 + pad)
            block = torch.from_numpy(np.ascontiguousarray(volume[a:b])).to(device=device, dtype=torch.float32)
            block = (block - low) / (high - low)
            with torch.no_grad():
                feats = _features_of_block(block, (z0 - a, z1 - a), config, filters)
            yield z0, z1, feats
    finally:
        if isinstance(filters, _ScipyFilters):
            filters.close()


def compute_features(volume: np.ndarray, config: FeatureConfig, *, device: torch.device | None = None, chunk_z: int | None = None) -> np.ndarray:
    """Whole feature stack, float32, shape (C, z, y, x) (for small volumes and tests)."""
    out = np.empty((len(CHANNELS),) + volume.shape, dtype=np.float32)
    for z0, z1, feats in iter_feature_chunks(volume, config, device=device, chunk_z=chunk_z):
        out[:, z0:z1] = feats.cpu().numpy()
    return out


# ----------------------------------------------------------------------------- pools and cache


@dataclass(frozen=True)
class Pool:
    """Labelled voxels of one volume with their features.

    Attributes
    ----------
    features : ndarray, float32, shape (n, C)
    labels : ndarray, uint8, shape (n,), values {0, 1}
    coords : ndarray, int32, shape (n, 3)
    class_counts : ndarray, int64, shape (2,)
        Labelled voxels of each class in the whole volume (for unbiased validation weights).
    """

    features: np.ndarray
    labels: np.ndarray
    coords: np.ndarray
    class_counts: np.ndarray


def sample_pool(volume: np.ndarray, label: np.ndarray, config: FeatureConfig, *, rng: np.random.Generator, device: torch.device | None = None) -> Pool:
    """Draw up to ``config.pool_per_class`` voxels of each class (label 2 never) and compute their features."""
    chosen = []
    counts = np.zeros(2, dtype=np.int64)
    for cls in (0, 1):
        flat = np.flatnonzero(label.ravel() == cls)
        counts[cls] = flat.size
        take = min(flat.size, config.pool_per_class)
        chosen.append(np.sort(rng.choice(flat, size=take, replace=False)) if take else flat[:0])
    index = np.concatenate(chosen)
    labels = np.concatenate([np.full(c.size, cls, dtype=np.uint8) for cls, c in enumerate(chosen)])
    coords = np.stack(np.unravel_index(index, volume.shape), axis=1).astype(np.int32)
    features = np.empty((index.size, len(CHANNELS)), dtype=np.float32)
    for z0, z1, feats in iter_feature_chunks(volume, config, device=device):
        rows = np.flatnonzero((coords[:, 0] >= z0) & (coords[:, 0] < z1))
        if rows.size:
            zc, yc, xc = (torch.from_numpy(coords[rows, i].astype(np.int64)).to(feats.device) for i in range(3))
            features[rows] = feats[:, zc - z0, yc, xc].T.cpu().numpy()
    return Pool(features=features, labels=labels, coords=coords, class_counts=counts)


class FeatureCache:
    """Pools on disk, keyed by (volume content key, feature spec, pool size, seed).

    Each file is an ``.npz`` written atomically whose arrays carry a SHA-256 of their
    bytes; a file that fails to load or to match its checksum is recomputed, never used
    (``allow_pickle=False``: an attached file cannot run code).

    Parameters
    ----------
    folder : path
        This run's cache folder (written).
    attached : sequence of path, optional
        Cache folders of attached previous outputs (read only): a pool found there
        is used after its checksum holds, and copied here when ``admit`` allows.
    admit : callable, optional
        ``admit(path, nbytes)`` → whether a file of ``nbytes`` may be written (the output quota).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        attached: Sequence[Path] = (),
        admit: Callable[[Path, int], bool] = lambda _path, _nbytes: True,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.attached = [Path(p) for p in attached if Path(p).resolve() != self.folder.resolve()]
        self.admit = admit
        self.hits = 0
        self.attached_hits = 0
        self.misses = 0
        self.corrupt = 0

    def path(self, content_hash: str, config: FeatureConfig, seed: int) -> Path:
        return self.folder / f"pool-{cache_key(content_hash, spec_id(config), config.pool_per_class, seed)}.npz"

    def has(self, content_hash: str, config: FeatureConfig, seed: int) -> bool:
        """Whether a file for this key exists here or in an attached cache (not yet checked)."""
        name = self.path(content_hash, config, seed).name
        return any((folder / name).is_file() for folder in [self.folder, *self.attached])

    def load(self, path: Path) -> Pool | None:
        """The cached pool, or None when absent or corrupt (corrupt files are counted and logged)."""
        if not path.is_file():
            return None
        try:
            arrays = load_arrays_checked(path, ("features", "labels", "coords", "class_counts"))
        except Exception as exc:  # any unreadable or inconsistent file is recomputed
            self.corrupt += 1
            log.warning("feature cache %s is corrupt (%s); recomputing", path, exc)
            return None
        return Pool(**arrays)

    def store(self, path: Path, pool: Pool) -> None:
        """Write ``pool`` unless the quota refuses it (the run goes on with the pool in memory)."""
        arrays = {"features": pool.features, "labels": pool.labels, "coords": pool.coords, "class_counts": pool.class_counts}
        if self.admit(path, sum(a.nbytes for a in arrays.values())):
            save_arrays_checked(path, arrays)

    def get_or_compute(
        self, content_hash: str, config: FeatureConfig, seed: int, read: Callable[[], tuple[np.ndarray, np.ndarray]], *, device: torch.device | None = None
    ) -> tuple[Pool, str]:
        """(pool, source) with source ``cache``, ``attached`` or ``computed``; ``read()`` → (image, label) only on a miss."""
        path = self.path(content_hash, config, seed)
        pool = self.load(path)
        if pool is not None:
            self.hits += 1
            return pool, "cache"
        for folder in self.attached:
            pool = self.load(folder / path.name)
            if pool is not None:
                self.attached_hits += 1
                self.store(path, pool)
                return pool, "attached"
        self.misses += 1
        image, label = read()
        rng = streams.pool_generator(seed, content_hash)
        pool = sample_pool(image, label, config, rng=rng, device=device)
        self.store(path, pool)
        return pool, "computed"
