"""Bad inputs get the package's errors, naming the file, what was expected and what was found."""

from __future__ import annotations

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
from nx46vx.volumes import read_label, read_pair, read_volume


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
