"""``nx46vx score``: a submission is checked in full before it is scored; every defect names its member."""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nx46vx.cli import main
from nx46vx.errors import DataLayoutError, Nx46Error, SubmissionError
from nx46vx.scoring import score_submission

SHAPE = (8, 8, 8)
IDS = ("101", "202")


def _label(seed: int) -> np.ndarray:
    """A uint8 (8, 8, 8) label with values 0, 1 and 2."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[:, 3:5, :] = 1
    label[:, :, seed % 8] = 2
    return label


def _tiff(volume: np.ndarray) -> bytes:
    """``volume`` as TIFF bytes."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, volume, photometric="minisblack")
    return buffer.getvalue()


def _good_masks() -> dict[str, bytes]:
    """``{member: TIFF bytes}``: each id's surface as a uint8 {0, 1} mask."""
    return {f"{i}.tif": _tiff((_label(n) == 1).astype(np.uint8)) for n, i in enumerate(IDS)}


def _zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write ``members`` (name, bytes; duplicates allowed) into the zip ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns on a duplicate name
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members:
                archive.writestr(name, data)
    return path


@pytest.fixture()
def truth(tmp_path: Path) -> Path:
    """A folder holding the two label TIFFs ``101.tif`` and ``202.tif``."""
    folder = tmp_path / "labels"
    folder.mkdir()
    for n, vol_id in enumerate(IDS):
        tifffile.imwrite(folder / f"{vol_id}.tif", _label(n), photometric="minisblack")
    return folder


def _with(replace: dict[str, bytes] | None = None, *, drop: str | None = None) -> list[tuple[str, bytes]]:
    """The good members, some replaced or one dropped."""
    members = {**_good_masks(), **(replace or {})}
    return [(name, data) for name, data in members.items() if name != drop]


def _fails(truth: Path, pred: Path, member: str, *words: str) -> SubmissionError:
    """Assert ``score_submission`` raises SubmissionError naming ``pred:member`` and ``words``."""
    with pytest.raises(SubmissionError) as info:
        score_submission(truth, pred)
    message = str(info.value)
    assert f"{pred}:{member}" in message, message
    for word in words:
        assert word in message, message
    return info.value


def test_valid_submission_scores(truth: Path, tmp_path: Path) -> None:
    pred = _zip(tmp_path / "submission.zip", _with())
    scores = score_submission(truth, pred)
    assert set(scores) == {*IDS, "mean"}
    for vol_id in IDS:
        assert set(scores[vol_id]) == {"surface_dice", "voi_score", "topo_score", "score", "topo_counts"}
        assert scores[vol_id]["score"] == pytest.approx(1.0)
        counts = scores[vol_id]["topo_counts"]  # a perfect mask: every finite pair of the truth is matched
        assert set(counts) == {"dim0", "dim1", "dim2"}
        assert all(c["matched"] == c["pred"] == c["truth"] for c in counts.values())
    assert scores["mean"] == pytest.approx(1.0)


def test_valid_submission_from_competition_root(truth: Path, tmp_path: Path) -> None:
    root = tmp_path / "competition"
    root.mkdir()
    truth.rename(root / "test_labels")
    pred = _zip(tmp_path / "submission.zip", _with())
    assert set(score_submission(root, pred)) == {*IDS, "mean"}


def test_imperfect_submission_scores_below_one(truth: Path, tmp_path: Path) -> None:
    empty = _tiff(np.zeros(SHAPE, dtype=np.uint8))
    pred = _zip(tmp_path / "submission.zip", _with({"202.tif": empty}))
    scores = score_submission(truth, pred)
    assert scores["202"]["score"] < 1.0 and scores["mean"] < 1.0


def test_missing_volume(truth: Path, tmp_path: Path) -> None:
    pred = _zip(tmp_path / "submission.zip", _with(drop="202.tif"))
    error = _fails(truth, pred, "202.tif", "lacks 1 volume", "2 volumes", "1 volumes")
    assert error.expected == "2 volumes" and error.found == "1 volumes"


def test_extra_readme_member(truth: Path, tmp_path: Path) -> None:
    pred = _zip(tmp_path / "submission.zip", [*_with(), ("README.txt", b"hello")])
    _fails(truth, pred, "README.txt", "unexpected member")


def test_nested_member(truth: Path, tmp_path: Path) -> None:
    good = _good_masks()
    pred = _zip(tmp_path / "submission.zip", [("sub/101.tif", good["101.tif"]), ("202.tif", good["202.tif"])])
    _fails(truth, pred, "sub/101.tif", "unexpected member")


def test_non_tiff_member(truth: Path, tmp_path: Path) -> None:
    pred = _zip(tmp_path / "submission.zip", _with({"101.tif": b"this is not a tiff at all"}))
    _fails(truth, pred, "101.tif", "not a TIFF", "b'this is '")


def test_wrong_shape(truth: Path, tmp_path: Path) -> None:
    pred = _zip(tmp_path / "submission.zip", _with({"202.tif": _tiff(np.zeros((8, 8, 4), dtype=np.uint8))}))
    _fails(truth, pred, "202.tif", "shape", "(8, 8, 8)", "(8, 8, 4)")


def test_values_0_255(truth: Path, tmp_path: Path) -> None:
    mask = (_label(0) == 1).astype(np.uint8) * 255
    pred = _zip(tmp_path / "submission.zip", _with({"101.tif": _tiff(mask)}))
    _fails(truth, pred, "101.tif", "outside {0, 1}", "255")


def test_float_mask_with_fraction(truth: Path, tmp_path: Path) -> None:
    mask = (_label(1) == 1).astype(np.float32) * np.float32(0.3)
    pred = _zip(tmp_path / "submission.zip", _with({"202.tif": _tiff(mask)}))
    _fails(truth, pred, "202.tif", "not uint8", "float32", "0.3")


def test_duplicate_member(truth: Path, tmp_path: Path) -> None:
    good = _good_masks()
    pred = _zip(tmp_path / "submission.zip", [*_with(), ("101.tif", good["101.tif"])])
    _fails(truth, pred, "101.tif", "duplicate member")


def test_not_a_zip(truth: Path, tmp_path: Path) -> None:
    pred = tmp_path / "submission.zip"
    pred.write_bytes(b"junk")
    with pytest.raises(SubmissionError, match="cannot open submission"):
        score_submission(truth, pred)


def test_truth_folder_without_labels(tmp_path: Path) -> None:
    pred = _zip(tmp_path / "submission.zip", _with())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataLayoutError, match="no label TIFF"):
        score_submission(tmp_path / "empty", pred)


def test_errors_are_package_errors() -> None:
    assert issubclass(SubmissionError, Nx46Error)


def test_cli_reports_bad_member(truth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = _zip(tmp_path / "submission.zip", [*_with(), ("README.txt", b"hello")])
    code = main(["score", "--truth", str(truth), "--pred", str(pred)])
    captured = capsys.readouterr()
    assert code != 0
    assert f"{pred}:README.txt" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_reports_bad_values(truth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mask = (_label(0) == 1).astype(np.uint8) * 255
    pred = _zip(tmp_path / "submission.zip", _with({"101.tif": _tiff(mask)}))
    code = main(["score", "--truth", str(truth), "--pred", str(pred)])
    captured = capsys.readouterr()
    assert code != 0 and f"{pred}:101.tif" in captured.err and captured.out == ""


def test_cli_prints_scores(truth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = _zip(tmp_path / "submission.zip", _with())
    assert main(["score", "--truth", str(truth), "--pred", str(pred)]) == 0
    assert '"mean"' in capsys.readouterr().out
