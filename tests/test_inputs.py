"""Bad inputs get the package's errors, naming the file, what was expected and what was found."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nx46vx.discovery import discover
from nx46vx.errors import (
    DataLayoutError,
    LabelValueError,
    Nx46Error,
    TestSetError,
    VolumeDtypeError,
    VolumeReadError,
    VolumeShapeError,
)
from nx46vx.synthetic import make_competition, write_tiff
from nx46vx.volumes import inspect_volume, read_label, read_pair, read_volume

from .conftest import events, masks, run_args, run_cli


def test_reads_competition_tiff(tmp_path: Path) -> None:
    vol = np.random.default_rng(0).integers(0, 255, (5, 7, 9), dtype=np.uint8)
    write_tiff(tmp_path / "v.tif", vol)
    with tifffile.TiffFile(tmp_path / "v.tif") as tif:
        assert len(tif.pages) == 5 and tif.pages[0].compression.name == "LZW"
    assert np.array_equal(read_volume(tmp_path / "v.tif"), vol)


def test_corrupt_tiff(tmp_path: Path) -> None:
    path = tmp_path / "bad.tif"
    write_tiff(path, np.zeros((4, 8, 8), np.uint8))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(VolumeReadError) as err:
        read_volume(path)
    assert str(path) in str(err.value) and "expected a readable multi-page TIFF" in str(err.value)


def test_not_a_tiff(tmp_path: Path) -> None:
    path = tmp_path / "text.tif"
    path.write_text("hello")
    with pytest.raises(VolumeReadError, match="text.tif"):
        read_volume(path)


def test_non_3d_tiff(tmp_path: Path) -> None:
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    with pytest.raises(VolumeShapeError) as err:
        read_volume(path)
    assert "expected 3-D (z, y, x), got shape (8, 8)" in str(err.value) and str(path) in str(err.value)


def test_float_tiff(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.float32))
    with pytest.raises(VolumeDtypeError) as err:
        read_volume(path)
    assert "expected uint8, got float32" in str(err.value) and str(path) in str(err.value)


def test_label_value_7(tmp_path: Path) -> None:
    label = np.zeros((3, 8, 8), np.uint8)
    label[1, 2, 3] = 7
    write_tiff(tmp_path / "lab.tif", label)
    with pytest.raises(LabelValueError) as err:
        read_label(tmp_path / "lab.tif")
    assert "expected values in {0, 1, 2}, got values [7]" in str(err.value)


def test_label_wrong_shape(tmp_path: Path) -> None:
    write_tiff(tmp_path / "img.tif", np.zeros((3, 8, 8), np.uint8))
    write_tiff(tmp_path / "lab.tif", np.zeros((3, 8, 9), np.uint8))
    with pytest.raises(VolumeShapeError) as err:
        read_pair(tmp_path / "img.tif", tmp_path / "lab.tif")
    assert "expected shape (3, 8, 8), got shape (3, 8, 9)" in str(err.value) and "lab.tif" in str(err.value)


@pytest.fixture()
def layout(tmp_path: Path) -> Path:
    return make_competition(tmp_path / "kaggle" / "input" / "competitions" / "vesuvius-challenge-surface-detection", n_train=2, n_test=1, shapes=((12, 12, 12),), seed=1)


def test_discovery_finds_nested_root_and_ignores_extras(layout: Path) -> None:
    (layout / "deprecated_train_images").mkdir()
    write_tiff(layout / "deprecated_train_images" / "999.tif", np.zeros((4, 4, 4), np.uint8))
    found = discover([layout.parents[2]])
    assert found.root == layout
    assert len(found.train) == 2 and len(found.test) == 1
    assert found.inventory["suffix_counts"][".tif"] == 7  # 2 pairs, 1 test image, 1 test label, 1 deprecated
    assert found.inventory["folders"]["deprecated_train_images"]["ignored"] is True


def test_empty_test_images(layout: Path) -> None:
    for f in (layout / "test_images").iterdir():
        f.unlink()
    with pytest.raises(TestSetError) as err:
        discover([layout])
    assert "test_images" in str(err.value) and "got an empty folder" in str(err.value)


def test_listed_test_id_without_file(layout: Path) -> None:
    with open(layout / "test.csv", "a") as handle:
        handle.write("1407735,1\n")
    with pytest.raises(TestSetError) as err:
        discover([layout])
    assert "1407735" in str(err.value) and "1407735.tif" in str(err.value)


def test_no_competition_root(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    with pytest.raises(DataLayoutError, match="no competition data"):
        discover([tmp_path])


def test_errors_share_the_base() -> None:
    for cls in (TestSetError, VolumeReadError, LabelValueError, DataLayoutError):
        assert issubclass(cls, Nx46Error)


# ----------------------------------------------------------------------------- checked at discovery


def _page_offsets(path: Path) -> list[int]:
    with tifffile.TiffFile(path) as tif:
        return [page.offset for page in tif.pages]


@pytest.mark.parametrize("where", ["inside_page_data", "at_a_page_header", "inside_a_page_header", "inside_the_file_header"])
def test_truncated_tiff_is_named_truncated(tmp_path: Path, where: str) -> None:
    path = tmp_path / "cut.tif"
    write_tiff(path, np.random.default_rng(0).integers(0, 255, (10, 16, 16), dtype=np.uint8))
    data, offsets = path.read_bytes(), _page_offsets(path)
    cut = {"inside_page_data": len(data) - 7, "at_a_page_header": offsets[6], "inside_a_page_header": offsets[6] + 5, "inside_the_file_header": 6}[where]
    path.write_bytes(data[:cut])
    for check in (inspect_volume, read_volume):
        with pytest.raises(VolumeReadError) as err:
            check(path)
        assert "truncated" in str(err.value) and str(path) in str(err.value)


def test_inspect_checks_header_pages_and_label_values(tmp_path: Path) -> None:
    good = tmp_path / "good.tif"
    write_tiff(good, np.ones((6, 8, 9), np.uint8))
    assert inspect_volume(good, label=True) == (6, 8, 9)
    flat, floats, labels = tmp_path / "flat.tif", tmp_path / "float.tif", tmp_path / "labels.tif"
    tifffile.imwrite(flat, np.zeros((8, 8), np.uint8))
    tifffile.imwrite(floats, np.zeros((3, 8, 8), np.float32), photometric="minisblack")
    write_tiff(labels, np.full((4, 8, 8), 7, np.uint8))
    with pytest.raises(VolumeShapeError, match="not 3-D"):
        inspect_volume(flat)
    with pytest.raises(VolumeDtypeError, match="uint8"):
        inspect_volume(floats)
    with pytest.raises(LabelValueError, match=r"values \[7\]"):
        inspect_volume(labels, label=True)


def _damaged_copy(demo_data: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of the demo data with its first test volume cut short and one training image made 2-D."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    test_path = sorted((data / "test_images").glob("*.tif"))[0]
    test_path.write_bytes(test_path.read_bytes()[: test_path.stat().st_size // 2])
    train_path = sorted((data / "train_images").glob("*.tif"))[0]
    tifffile.imwrite(train_path, np.zeros((8, 8), np.uint8))
    return data, test_path.stem, train_path.stem


def test_truncated_test_volume_stops_the_run_at_discovery(demo_data: Path, tmp_path: Path) -> None:
    data, test_id, _ = _damaged_copy(demo_data, tmp_path)
    out = tmp_path / "out"
    proc = run_cli(*run_args(data, out))
    assert proc.returncode != 0
    assert f"{test_id}.tif" in proc.stderr and "truncated" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "journal.jsonl").exists() and not list(out.glob("cache/features/*"))  # stopped before any work


def test_bad_inputs_are_rejected_and_an_empty_mask_submitted_when_asked(demo_data: Path, tmp_path: Path) -> None:
    data, test_id, train_id = _damaged_copy(demo_data, tmp_path)
    out = tmp_path / "out"
    proc = run_cli(*run_args(data, out, "--set", "data.on_bad_test=empty", "--set", "search.max_epochs=1", "--set", "distill.enabled=false"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rejected = {e["data"]["kind"]: e["data"] for e in events(out / "journal.jsonl") if e["event"] == "INPUT_REJECTED"}
    assert rejected["test"]["id"] == test_id and rejected["test"]["action"] == "empty mask" and "truncated" in rejected["test"]["what"]
    assert rejected["train"]["id"] == train_id and rejected["train"]["action"] == "skipped" and "not 3-D" in rejected["train"]["what"]
    submitted = masks(out / "submission.zip")
    with tifffile.TiffFile(demo_data / "test_images" / f"{test_id}.tif") as tif:
        shape = tif.series[0].shape
    assert submitted[f"{test_id}.tif"].shape == shape and not submitted[f"{test_id}.tif"].any()
    assert len(submitted) == len(list((data / "test_images").glob("*.tif")))


def test_validation_volumes_without_surface_are_excluded_and_the_choice_says_how_it_was_made(demo_data: Path, tmp_path: Path) -> None:
    from nx46vx.config import load_config
    from nx46vx.runner.phases.discovery import split_train_val

    from .conftest import FAST

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    config = load_config("demo", overrides=FAST)
    _, val, _ = split_train_val(discover([data]).train, config)
    assert len(val) == 2
    write_tiff(val[0].label, np.full(tifffile.imread(val[0].label).shape, 2, np.uint8))  # nothing labelled
    write_tiff(val[1].label, np.zeros(tifffile.imread(val[1].label).shape, np.uint8))  # labelled, but no surface
    out = tmp_path / "out"
    proc = run_cli(*run_args(data, out, "--set", "search.max_epochs=1", "--set", "distill.enabled=false"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    journal = events(out / "journal.jsonl")
    excluded = {e["data"]["id"]: e["data"]["surface_voxels"] for e in journal if e["event"] == "VALIDATION_EXCLUDED"}
    assert excluded == {val[0].id: 0, val[1].id: 0}
    unavailable = [e["data"] for e in journal if e["event"] == "VALIDATION_UNAVAILABLE"]
    assert unavailable and unavailable[0]["reason"] == "no validation volume has enough surface voxels"
    choice = next(e["data"] for e in journal if e["event"] == "SEGMENTER_CHOICE")
    assert choice["by"] == "preference order" and choice["validation_scores"] == {}
    assert choice["chosen"] == unavailable[0]["order"][0]  # the documented order decides, not a 1.0 on an empty truth


# ----------------------------------------------------------------------------- memory guard


def test_cgroup_memory_is_read_from_v2_and_v1_layouts(tmp_path: Path) -> None:
    from nx46vx.telemetry import cgroup_memory_free

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1073741824\n")
    (v2 / "memory.current").write_text("805306368\n")
    (v2 / "memory.stat").write_text("anon 1\ninactive_file 100663296\nactive_file 5\n")
    assert cgroup_memory_free(v2) == (1024 - 768 + 96) << 20  # reclaimable file cache counts as free
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_memory_free(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2 << 30))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(1 << 30))
    assert cgroup_memory_free(v1) == 1 << 30
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    assert cgroup_memory_free(v1) is None
    assert cgroup_memory_free(tmp_path / "none") is None


def test_a_volume_too_big_for_the_memory_limit_fails_at_discovery(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nx46vx
    from nx46vx import telemetry

    monkeypatch.setattr(telemetry, "free_memory", lambda _device: 1 << 20)  # a 1 MiB container
    with pytest.raises(TestSetError) as err:
        nx46vx.run([demo_data], output=tmp_path / "out", profile="demo")
    message = str(err.value)
    assert "needs more memory than this process may use" in message and "test_images" in message and "GiB" in message
    assert not (tmp_path / "out" / "journal.jsonl").exists()  # before any work


# ----------------------------------------------------------------------------- validation split by scroll


def _pairs(scrolls: dict[str, int]) -> list:
    from nx46vx.discovery import TrainPair

    out, n = [], 0
    for scroll, count in scrolls.items():
        for _ in range(count):
            out.append(TrainPair(f"{1000 + n}", Path(f"{n}.tif"), Path(f"l{n}.tif"), scroll))
            n += 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_validation_holds_out_whole_scrolls(seed: int) -> None:
    from nx46vx.config import load_config
    from nx46vx.runner.phases.discovery import split_train_val

    config = load_config("default", overrides=[f"seed={seed}"])  # val_fraction 0.2 of 20 volumes: target 4
    pairs = _pairs({"1": 6, "2": 3, "3": 1, "4": 7, "5": 3})
    train, val, how = split_train_val(pairs, config)
    assert how["by"] == "scroll" and sorted(p.id for p in train + val) == sorted(p.id for p in pairs)
    val_scrolls, train_scrolls = {p.scroll_id for p in val}, {p.scroll_id for p in train}
    assert val_scrolls.isdisjoint(train_scrolls) and sorted(val_scrolls) == how["val_scrolls"]
    assert 1 <= len(val) <= 4 and train_scrolls  # within the target, and something still trains
    assert split_train_val(list(reversed(pairs)), config) == (train, val, how)  # seeded, order-independent


def test_a_single_scroll_or_no_scroll_ids_split_by_volume_and_say_so() -> None:
    from nx46vx.config import load_config
    from nx46vx.runner.phases.discovery import split_train_val

    config = load_config("default")
    _, val, how = split_train_val(_pairs({"1": 10}), config)
    assert how == {"by": "volume", "reason": "one scroll only"} and len(val) == 2
    _, val, how = split_train_val(_pairs({"": 10}), config)
    assert how["by"] == "volume" and how["reason"] == "no scroll_id for every volume" and len(val) == 2
    # only big scrolls: the smallest is held out rather than none
    _, val, how = split_train_val(_pairs({"a": 8, "b": 12}), config)
    assert how["val_scrolls"] == ["a"] and len(val) == 8
