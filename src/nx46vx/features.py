"""Phase 3: the per-voxel 3-D feature bank, computed in z-chunks with a halo, and its disk cache.

Every feature is a float32 map over the whole (z, y, x) volume, computed with torch
(CPU or GPU, same code) from the intensity normalised per volume to [0, 1] by its
1st and 99.5th percentiles. Gaussian kernels are truncated at 3σ, borders
replicate the edge voxel. Spec version :data:`SPEC_VERSION`; parameters in
:class:`nx46vx.config.FeatureConfig`.

``x`` features (used by ``w`` and ``α``):

* ``intensity`` — Gaussian-smoothed intensity, σ = ``smooth_sigma``.
* ``local_entropy`` — differential entropy of a Gaussian with the local variance
  of the normalised intensity in a ``entropy_window``³ box:
  ``0.5·log(2πe·(var + 1e-4))`` (a Gaussian proxy of the local histogram entropy).
* ``grad_mag`` — Gaussian gradient magnitude at σ = ``smooth_sigma``.
* ``proj_max`` / ``proj_mean`` — max / mean of the smoothed intensity along z over
  ``±proj_half_window`` slices (the 3-D analogue of the old 2-D projections).
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import load_arrays_checked, save_arrays_checked
from .config import FeatureConfig

log = logging.getLogger("nx46vx")

SPEC_VERSION = "1"
X_NAMES = ("intensity", "local_entropy", "grad_mag", "proj_max", "proj_mean", "laplace", "bandpass_response", "sheetness")
G_NAMES = ("d_z", "d_y", "d_x")
CHANNELS = X_NAMES + G_NAMES


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
    """Slices of context each side of a z-chunk so chunked results equal whole-volume ones."""
    smooth = math.ceil(3 * config.smooth_sigma)
    widest = max(math.ceil(3 * s) for s in (config.smooth_sigma, config.laplace_sigma, config.hessian_sigma, *config.bandpass_sigmas))
    return widest + smooth + max(config.proj_half_window, config.entropy_window // 2) + 1


def normalise(volume: np.ndarray) -> tuple[float, float]:
    """(low, high): the 1st and 99.5th intensity percentiles of a uint8 volume, exact from its histogram."""
    hist = np.bincount(volume.ravel(), minlength=256).astype(np.float64)
    cdf = np.cumsum(hist) / hist.sum()
    low = float(np.searchsorted(cdf, 0.01))
    high = float(np.searchsorted(cdf, 0.995))
    return low, max(high, low + 1.0)


# ----------------------------------------------------------------------------- kernels


def _gaussian_kernels(sigma: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, G', G'') sampled 1-D Gaussian and its derivatives, radius ceil(3σ), float32."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    d1 = -t / sigma**2 * g
    d2 = (t**2 / sigma**4 - 1 / sigma**2) * g
    d2 = d2 - d2.mean()  # a second derivative of a constant is zero
    return tuple(k.to(device=device, dtype=torch.float32) for k in (g, d1, d2))  # type: ignore[return-value]


def _conv_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate a (1, 1, z, y, x) tensor with a 1-D kernel along spatial ``axis`` (0, 1, 2), edge-replicated."""
    r = kernel.numel() // 2
    pad = [0, 0, 0, 0, 0, 0]
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
    shape = [1, 1, 1, 1, 1]
    shape[2 + axis] = kernel.numel()
    return F.conv3d(F.pad(x, pad, mode="replicate"), kernel.view(shape))


def _separable(x: torch.Tensor, kernels: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    for axis, kernel in enumerate(kernels):
        x = _conv_axis(x, kernel, axis)
    return x


def _box_mean(x: torch.Tensor, size: int, axes: tuple[int, ...]) -> torch.Tensor:
    kernel = torch.full((size,), 1.0 / size, dtype=x.dtype, device=x.device)
    for axis in axes:
        x = _conv_axis(x, kernel, axis)
    return x


def _sym3_eigvals(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of [[a, d, e], [d, b, f], [e, f, c]] per voxel (closed form), stacked on dim 0, any order."""
    q = (a + b + c) / 3
    p1 = d * d + e * e + f * f
    p2 = (a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2 * p1
    p = torch.sqrt(p2 / 6).clamp_min(1e-12)
    ba, bb, bc = (a - q) / p, (b - q) / p, (c - q) / p
    bd, be, bf = d / p, e / p, f / p
    det = ba * (bb * bc - bf * bf) - bd * (bd * bc - bf * be) + be * (bd * bf - bb * be)
    phi = torch.acos((det / 2).clamp(-1.0, 1.0)) / 3
    l1 = q + 2 * p * torch.cos(phi)
    l3 = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)
    l2 = 3 * q - l1 - l3
    return torch.stack((l1, l2, l3))


def _features_of_block(block: torch.Tensor, config: FeatureConfig) -> torch.Tensor:
    """All channels of a normalised (1, 1, z, y, x) block → (C, z, y, x)."""
    dev = block.device
    g, d1, _ = _gaussian_kernels(config.smooth_sigma, dev)
    smooth = _separable(block, (g, g, g))
    dz, dy, dx = _separable(block, (d1, g, g)), _separable(block, (g, d1, g)), _separable(block, (g, g, d1))
    grad_mag = torch.sqrt(dz * dz + dy * dy + dx * dx)

    w = config.entropy_window
    mean = _box_mean(block, w, (0, 1, 2))
    var = (_box_mean(block * block, w, (0, 1, 2)) - mean * mean).clamp_min(0)
    entropy = 0.5 * torch.log(2 * math.pi * math.e * (var + 1e-4))

    k = 2 * config.proj_half_window + 1
    proj_max = F.max_pool3d(F.pad(smooth, [0, 0, 0, 0, config.proj_half_window, config.proj_half_window], mode="replicate"), (k, 1, 1), stride=1)
    proj_mean = _box_mean(smooth, k, (0,))

    s = config.laplace_sigma
    gl, _, d2l = _gaussian_kernels(s, dev)
    laplace = s * s * (_separable(block, (d2l, gl, gl)) + _separable(block, (gl, d2l, gl)) + _separable(block, (gl, gl, d2l)))

    s1, s2 = config.bandpass_sigmas
    k1, k2 = _gaussian_kernels(s1, dev)[0], _gaussian_kernels(s2, dev)[0]
    bandpass = _separable(block, (k1, k1, k1)) - _separable(block, (k2, k2, k2))

    s = config.hessian_sigma
    gh, d1h, d2h = _gaussian_kernels(s, dev)
    scale = s * s
    hzz = scale * _separable(block, (d2h, gh, gh))
    hyy = scale * _separable(block, (gh, d2h, gh))
    hxx = scale * _separable(block, (gh, gh, d2h))
    hzy = scale * _separable(block, (d1h, d1h, gh))
    hzx = scale * _separable(block, (d1h, gh, d1h))
    hyx = scale * _separable(block, (gh, d1h, d1h))
    eig = _sym3_eigvals(hzz, hyy, hxx, hzy, hzx, hyx)
    order = eig.abs().argsort(dim=0)
    eig = torch.gather(eig, 0, order)
    lam2, lam3 = eig[1], eig[2]
    ratio = lam2 / (lam3.abs() + 1e-6)
    sheetness = (-lam3).clamp_min(0) * torch.exp(-(ratio * ratio) / (2 * 0.25))

    channels = (smooth, entropy, grad_mag, proj_max, proj_mean, laplace, bandpass, sheetness, dz.abs(), dy.abs(), dx.abs())
    return torch.cat([c.reshape((1,) + c.shape[2:]) for c in channels], dim=0)


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
    for z0 in range(0, depth, chunk):
        z1 = min(depth, z0 + chunk)
        a, b = max(0, z0 - pad), min(depth, z1 + pad)
        block = torch.from_numpy(np.ascontiguousarray(volume[a:b])).to(device=device, dtype=torch.float32)
        block = ((block - low) / (high - low)).reshape((1, 1) + block.shape)
        with torch.no_grad():
            feats = _features_of_block(block, config)
        yield z0, z1, feats[:, z0 - a : z0 - a + (z1 - z0)]


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
        return self.folder / f"pool-{content_hash[:24]}-{spec_id(config)}-p{config.pool_per_class}-s{seed}.npz"

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
        rng = np.random.default_rng([seed, int(content_hash[:15], 16)])
        pool = sample_pool(image, label, config, rng=rng, device=device)
        self.store(path, pool)
        return pool, "computed"
