from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nx46vx.config import FeatureConfig
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
    assert np.allclose(compute_features(vol, CFG, chunk_z=chunk), whole, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_gpu_agrees_with_cpu() -> None:
    vol = np.random.default_rng(0).integers(0, 255, (24, 20, 20), dtype=np.uint8)
    cpu = compute_features(vol, CFG, device=torch.device("cpu"))
    gpu = compute_features(vol, CFG, device=torch.device("cuda"))
    assert np.abs(cpu - gpu).max() < 1e-4


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
