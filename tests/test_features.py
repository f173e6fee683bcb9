from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nx46vx.config import FeatureConfig
from nx46vx import features
from nx46vx.features import CHANNELS, FeatureCache, compute_features, spec_id

CFG = FeatureConfig()


def _channel(name: str) -> int:
    return CHANNELS.index(name)


def test_gradients_vanish_on_a_constant_volume() -> None:
    vol = np.full((20, 20, 20), 90, np.uint8)
    vol[0, 0, 0] = 91  # keep the percentile normalisation defined
    feats = compute_features(vol, CFG)
    inner = (slice(8, 12),) * 3
    for name in ("grad_mag", "d_z", "d_y", "d_x", "laplace", "sheetness"):
        assert np.abs(feats[_channel(name)][inner]).max() < 1e-5, name


def test_sheetness_peaks_on_a_plane() -> None:
    vol = np.full((32, 32, 32), 40, np.uint8)
    vol[:, 15:17, :] = 200  # a bright sheet normal to y
    feats = compute_features(vol, CFG)
    sheet = feats[_channel("sheetness")]
    profile = sheet[16, :, 16]
    assert int(np.argmax(profile)) in (15, 16)
    assert profile[15] > 10 * profile[5]
    # a line (tube) is not a sheet
    line = np.full((32, 32, 32), 40, np.uint8)
    line[:, 15:17, 15:17] = 200
    line[:, 0:2, :] = 200  # far away, keeps the percentile normalisation equal to the plane's
    assert compute_features(line, CFG)[_channel("sheetness")][16, 15, 15] < 0.5 * profile[15]


def test_proj_max_is_max_along_z() -> None:
    vol = np.full((24, 16, 16), 50, np.uint8)
    vol[12, 8, 8] = 250
    feats = compute_features(vol, CFG)
    proj = feats[_channel("proj_max")][:, 8, 8]
    intensity = feats[_channel("intensity")][:, 8, 8]
    h = CFG.proj_half_window
    assert proj[12 - h] == pytest.approx(intensity[12], rel=1e-6)
    assert proj[12 - h - 2] < proj[12 - h]


@pytest.mark.parametrize("chunk", [8, 13, 64])
def test_chunked_equals_whole_volume(chunk: int) -> None:
    vol = np.random.default_rng(0).integers(0, 255, (30, 18, 20), dtype=np.uint8)
    whole = compute_features(vol, CFG, chunk_z=64)
    assert np.array_equal(compute_features(vol, CFG, chunk_z=chunk), whole)  # the halo is exact: same bits


def test_bits_do_not_depend_on_the_thread_count() -> None:
    vol = np.random.default_rng(3).integers(0, 255, (26, 21, 19), dtype=np.uint8)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(compute_features(vol, CFG))
    finally:
        torch.set_num_threads(before)
    assert all(np.array_equal(results[0], other) for other in results[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_gpu_agrees_with_cpu() -> None:
    vol = np.random.default_rng(0).integers(0, 255, (24, 20, 20), dtype=np.uint8)
    cpu = compute_features(vol, CFG, device=torch.device("cpu"))
    gpu = compute_features(vol, CFG, device=torch.device("cuda"))
    for c, name in enumerate(CHANNELS):  # the tolerance; eigenvalue ties may swap on a few voxels
        close = np.abs(cpu[c] - gpu[c]) <= 1e-4 * max(1e-6, float(np.abs(cpu[c]).max()))
        assert close.mean() >= 0.999, (name, float(close.mean()))


def test_cpu_filters_agree_with_the_torch_filters_used_on_gpu() -> None:
    vol = np.random.default_rng(4).integers(0, 255, (28, 20, 22), dtype=np.uint8)
    low, high = features.normalise(vol)
    block = (torch.from_numpy(vol).float() - low) / (high - low)
    scipy_filters = features._ScipyFilters(2)
    try:
        cpu = features._features_of_block(block, (0, 28), CFG, scipy_filters)
    finally:
        scipy_filters.close()
    torch_path = features._features_of_block(block, (0, 28), CFG, features._TorchFilters())
    for c, name in enumerate(CHANNELS):
        assert torch.allclose(cpu[c], torch_path[c], rtol=0, atol=1e-5 * float(torch_path[c].abs().max())), name


# ----------------------------------------------------------------------------- a reference from the definitions


def _kernel(sigma: float, order: int) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2 * sigma**2))
    g /= g.sum()
    if order == 1:
        return -t / sigma**2 * g
    if order == 2:
        d2 = (t**2 / sigma**4 - 1 / sigma**2) * g
        return d2 - d2.mean()
    return g


def _correlate3d(vol: np.ndarray, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    """Direct 3-D correlation with the outer-product kernel over an edge-replicated volume (no separability)."""
    rz, ry, rx = kz.size // 2, ky.size // 2, kx.size // 2
    padded = np.pad(vol, ((rz, rz), (ry, ry), (rx, rx)), mode="edge")
    out = np.zeros(vol.shape)
    for i in range(kz.size):
        for j in range(ky.size):
            for k in range(kx.size):
                out += kz[i] * ky[j] * kx[k] * padded[i : i + vol.shape[0], j : j + vol.shape[1], k : k + vol.shape[2]]
    return out


def _window(vol: np.ndarray, half: tuple[int, int, int]) -> np.ndarray:
    """Every voxel's edge-replicated neighbourhood, shape (n_neighbours, z, y, x)."""
    padded = np.pad(vol, [(h, h) for h in half], mode="edge")
    z, y, x = vol.shape
    return np.stack(
        [padded[i : i + z, j : j + y, k : k + x] for i in range(2 * half[0] + 1) for j in range(2 * half[1] + 1) for k in range(2 * half[2] + 1)]
    )


def _reference_features(vol: np.ndarray, cfg: FeatureConfig) -> dict[str, np.ndarray]:
    flat = np.sort(vol.ravel())
    low = float(flat[int(np.ceil(0.01 * flat.size)) - 1])
    high = max(float(flat[int(np.ceil(0.995 * flat.size)) - 1]), low + 1)
    x = (vol.astype(np.float64) - low) / (high - low)

    def gauss(sigma: float, oz: int, oy: int, ox: int) -> np.ndarray:
        return _correlate3d(x, _kernel(sigma, oz), _kernel(sigma, oy), _kernel(sigma, ox))

    out = {}
    s = cfg.smooth_sigma
    out["intensity"] = gauss(s, 0, 0, 0)
    out["d_z"], out["d_y"], out["d_x"] = (np.abs(gauss(s, *o)) for o in ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    out["grad_mag"] = np.sqrt(out["d_z"] ** 2 + out["d_y"] ** 2 + out["d_x"] ** 2)
    w = cfg.entropy_window // 2
    neighbourhood = _window(x, (w, w, w))
    out["local_entropy"] = 0.5 * np.log(2 * np.pi * np.e * (neighbourhood.var(axis=0) + 1e-4))
    along_z = _window(out["intensity"], (cfg.proj_half_window, 0, 0))
    out["proj_max"], out["proj_mean"] = along_z.max(axis=0), along_z.mean(axis=0)
    sl = cfg.laplace_sigma
    out["laplace"] = sl**2 * (gauss(sl, 2, 0, 0) + gauss(sl, 0, 2, 0) + gauss(sl, 0, 0, 2))
    s1, s2 = cfg.bandpass_sigmas
    out["bandpass_response"] = gauss(s1, 0, 0, 0) - gauss(s2, 0, 0, 0)
    sh = cfg.hessian_sigma
    h = {o: sh**2 * gauss(sh, *o) for o in ((2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1))}
    matrix = np.stack(
        [
            np.stack([h[(2, 0, 0)], h[(1, 1, 0)], h[(1, 0, 1)]], -1),
            np.stack([h[(1, 1, 0)], h[(0, 2, 0)], h[(0, 1, 1)]], -1),
            np.stack([h[(1, 0, 1)], h[(0, 1, 1)], h[(0, 0, 2)]], -1),
        ],
        -2,
    )
    eig = np.linalg.eigvalsh(matrix)
    eig = np.take_along_axis(eig, np.argsort(np.abs(eig), axis=-1), axis=-1)
    lam2, lam3 = eig[..., 1], eig[..., 2]
    out["sheetness"] = np.maximum(-lam3, 0) * np.exp(-((lam2 / (np.abs(lam3) + 1e-6)) ** 2) / (2 * 0.5**2))
    return out


def test_feature_bank_matches_a_reference_written_from_the_channel_definitions() -> None:
    rng = np.random.default_rng(5)
    vol = rng.normal(100, 30, (22, 20, 21))
    vol[:, 9:11, :] += 90  # a bright sheet, so the Hessian channels see structure as well as noise
    vol = np.clip(vol, 0, 255).astype(np.uint8)
    ours = compute_features(vol, CFG, chunk_z=8)
    reference = _reference_features(vol, CFG)
    assert set(reference) == set(CHANNELS)
    for c, name in enumerate(CHANNELS):
        ref = reference[name]
        close = np.abs(ours[c] - ref) <= 1e-4 * np.abs(ref).max()
        assert close.mean() >= 0.9999, (name, float(np.abs(ours[c] - ref).max()), float(close.mean()))


def test_cache_hit_identical_and_corrupt_recomputed(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (16, 16, 16), dtype=np.uint8)
    label = rng.integers(0, 3, (16, 16, 16), dtype=np.uint8)
    cfg = replace(CFG, pool_per_class=200)
    cache = FeatureCache(tmp_path)
    calls = []

    def read():
        calls.append(1)
        return image, label

    first, hit1 = cache.get_or_compute("ab" * 32, cfg, 7, read)
    path = cache.path("ab" * 32, cfg, 7)
    raw = path.read_bytes()
    second, hit2 = cache.get_or_compute("ab" * 32, cfg, 7, read)
    assert (hit1, hit2) == ("computed", "cache") and len(calls) == 1
    assert second.features.tobytes() == first.features.tobytes() and np.array_equal(second.labels, first.labels)
    assert not (first.labels == 2).any() and first.labels.size == 400
    # flip one byte inside the data: the file is recomputed, never used
    corrupt = bytearray(raw)
    corrupt[len(corrupt) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    third, hit3 = cache.get_or_compute("ab" * 32, cfg, 7, read)
    assert hit3 == "computed" and cache.corrupt == 1 and len(calls) == 2
    assert third.features.tobytes() == first.features.tobytes()


def test_attached_cache_is_used_after_its_checksum_and_copied_within_quota(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (16, 16, 16), dtype=np.uint8)
    label = rng.integers(0, 3, (16, 16, 16), dtype=np.uint8)
    cfg = replace(CFG, pool_per_class=100)
    previous = FeatureCache(tmp_path / "previous")
    made, _ = previous.get_or_compute("cd" * 32, cfg, 3, lambda: (image, label))
    refused = []
    fresh = FeatureCache(tmp_path / "fresh", attached=[tmp_path / "previous"], admit=lambda path, n: refused.append(n) and False)
    pool, source = fresh.get_or_compute("cd" * 32, cfg, 3, lambda: pytest.fail("an attached pool must not be recomputed"))
    assert source == "attached" and pool.features.tobytes() == made.features.tobytes()
    assert refused and not fresh.path("cd" * 32, cfg, 3).exists()  # the quota refused the copy
    # a damaged attached file is never used
    attached_file = previous.path("cd" * 32, cfg, 3)
    data = bytearray(attached_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    attached_file.write_bytes(bytes(data))
    again = FeatureCache(tmp_path / "again", attached=[tmp_path / "previous"])
    _, source = again.get_or_compute("cd" * 32, cfg, 3, lambda: (image, label))
    assert source == "computed" and again.corrupt == 1


def test_spec_id_changes_with_parameters() -> None:
    assert spec_id(CFG) != spec_id(replace(CFG, hessian_sigma=2.0))
    assert spec_id(CFG) == spec_id(replace(CFG, chunk_z=16))


def test_a_corrected_label_under_the_same_image_misses_every_cache(tmp_path: Path) -> None:
    """The pool and foreground caches are keyed by image and label: a rewritten label is resampled, never reused."""
    import tifffile

    from nx46vx.discovery import TrainPair
    from nx46vx.runner.training_data import VolumeCache
    from nx46vx.volumes import volume_key

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (24, 24, 24), dtype=np.uint8)
    label = np.zeros(image.shape, np.uint8)
    label[:, :12] = 1
    tifffile.imwrite(tmp_path / "a.tif", image)
    tifffile.imwrite(tmp_path / "a_label.tif", label)
    pair = TrainPair("a", tmp_path / "a.tif", tmp_path / "a_label.tif")
    cfg = replace(CFG, pool_per_class=100)
    pools = FeatureCache(tmp_path / "pools")

    def caches() -> tuple:
        key = volume_key(pair.image, pair.label)
        pool, source = pools.get_or_compute(key, cfg, 5, lambda: (image, tifffile.imread(pair.label)))
        volume = VolumeCache([pair], {"a": key}, tmp_path / "foreground", foreground_cap=500, seed=5, capacity=1)(0)
        return pool, source, volume.foreground

    pool, source, foreground = caches()
    assert source == "computed" and (foreground[:, 1] < 12).all()
    assert caches()[1] == "cache"
    label[:] = 0
    label[:, 12:] = 1  # the corrected label: the image is unchanged
    tifffile.imwrite(tmp_path / "a_label.tif", label)
    pool, source, foreground = caches()
    assert source == "computed" and (foreground[:, 1] >= 12).all()
    assert (pool.coords[pool.labels == 1][:, 1] >= 12).all()
