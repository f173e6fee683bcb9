"""Scoring a ``submission.zip`` against label TIFFs (``nx46vx score``).

The submission is checked in full before any metric is computed: exactly one
``<id>.tif`` member per label TIFF of the truth folder (no missing, extra or
duplicate member), each a readable TIFF of the label's shape, uint8 with values in
{0, 1}. Any failure is a :class:`~nx46vx.errors.SubmissionError` naming the member
(``<zip>:<member>``); a bad submission never scores.

Each member is decoded once: while checking, the mask is kept bit-packed (one
eighth of its size) and unpacked again for the metric.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile

from .errors import DataLayoutError, SubmissionError
from .metric import score_volume
from .volumes import read_label, volume_shape

MASK_VALUES = (0, 1)
_SHOWN = 10  # how many ids / values an error message lists


@dataclass(frozen=True)
class _Mask:
    """A checked submission mask, bit-packed."""

    shape: tuple[int, ...]
    bits: np.ndarray

    def unpack(self) -> np.ndarray:
        """The mask as uint8 {0, 1}, shape ``self.shape``."""
        return np.unpackbits(self.bits, count=int(np.prod(self.shape))).reshape(self.shape)


def _truth_folder(truth: Path) -> Path:
    for sub in ("test_labels", "train_labels"):
        if (truth / sub).is_dir() and not any(truth.glob("*.tif")):
            return truth / sub
    return truth


def _expected_ids(folder: Path) -> list[str]:
    """Sorted ids (stems of ``*.tif``) of the truth folder; raises DataLayoutError when it holds none."""
    if not folder.is_dir():
        raise DataLayoutError("truth folder not found", path=folder, expected="a folder of <id>.tif labels", found="nothing")
    ids = sorted(p.stem for p in folder.glob("*.tif") if p.is_file())
    if not ids:
        raise DataLayoutError(
            "truth folder holds no label TIFF",
            path=folder,
            expected="<id>.tif labels (or train_labels/ or test_labels/)",
            found=sorted(p.name for p in folder.iterdir())[:_SHOWN],
        )
    return ids


def _shorten(items: Sequence[Any] | np.ndarray) -> str:
    """``items`` as a comma-separated list, the first few only (numpy scalars print as their dtype does: 0.3, not 0.30000001)."""
    text = ", ".join(str(i) for i in items[:_SHOWN])
    return text + (f", … ({len(items)} in all)" if len(items) > _SHOWN else "")


def _check_members(pred: str, names: list[str], ids: list[str]) -> None:
    """Raise SubmissionError for a duplicate, extra or missing member.

    Parameters
    ----------
    pred : str
        The submission's path (for messages).
    names : list of str
        The zip's member names, in archive order.
    ids : list of str
        The expected volume ids.
    """
    expected = {f"{i}.tif" for i in ids}
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        raise SubmissionError(
            f"duplicate member {duplicates[0]!r} in submission",
            path=f"{pred}:{duplicates[0]}",
            expected="each <id>.tif once",
            found=f"{Counter(names)[duplicates[0]]} members named {duplicates[0]!r} (duplicates: {_shorten(duplicates)})",
        )
    extra = sorted(n for n in names if n not in expected)
    if extra:
        raise SubmissionError(
            f"unexpected member {extra[0]!r} in submission",
            path=f"{pred}:{extra[0]}",
            expected=f"only <id>.tif members for the {len(ids)} truth ids ({_shorten(ids)})",
            found=f"extra member(s) {_shorten(extra)}",
        )
    missing = sorted(expected - set(names))
    if missing:
        raise SubmissionError(
            f"submission lacks {len(missing)} volume(s): {_shorten(missing)}",
            path=f"{pred}:{missing[0]}",
            expected=f"{len(expected)} volumes",
            found=f"{len(names)} volumes",
        )


def _read_member(archive: zipfile.ZipFile, name: str, member: str) -> bytes:
    """The bytes of a zip member; raises SubmissionError when the zip data is bad."""
    try:
        return archive.read(name)
    except (OSError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise SubmissionError(
            "cannot read zip member", path=member, expected="intact zip data", found=f"{type(exc).__name__}: {exc}"
        ) from None


def _decode_member(data: bytes, member: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a member's TIFF bytes, checking the shape from the header before decoding the pixels.

    Raises
    ------
    SubmissionError
        Not a readable TIFF, or a shape other than ``shape``.
    """
    found_shape: tuple[int, ...] | None = None
    mask: np.ndarray | None = None
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            found_shape = tuple(int(s) for s in tif.series[0].shape)
            if found_shape == shape:
                mask = tif.asarray()
    except Exception as exc:  # tifffile and imagecodecs raise many kinds; all mean "unreadable"
        raise SubmissionError(
            "member is not a TIFF (or cannot be decoded)",
            path=member,
            expected="a readable multi-page TIFF",
            found=f"{len(data)} bytes starting {data[:8]!r} ({type(exc).__name__}: {exc})",
        ) from None
    if mask is None or mask.shape != shape:
        found = found_shape if mask is None else mask.shape
        raise SubmissionError("mask shape differs from truth", path=member, expected=f"shape {shape}", found=f"shape {found}")
    return mask


def _check_values(mask: np.ndarray, member: str) -> None:
    """Raise SubmissionError unless ``mask`` is uint8 with values in {0, 1}."""
    values = np.unique(mask)
    bad = values[~np.isin(values, MASK_VALUES)]
    if mask.dtype != np.uint8 or bad.size:
        what = "mask is not uint8" if mask.dtype != np.uint8 else "mask values outside {0, 1}"
        raise SubmissionError(
            what,
            path=member,
            expected="uint8 with values in {0, 1}",
            found=f"dtype {mask.dtype}, values {_shorten(values)}",
        )


def _truth_shape(path: Path) -> tuple[int, ...]:
    """A label TIFF's shape from its header (a full, validating read when the header is unreadable)."""
    shape = volume_shape(path)
    return shape if shape is not None else tuple(read_label(path).shape)


def _load_masks(archive: zipfile.ZipFile, pred: str, folder: Path, ids: list[str]) -> dict[str, _Mask]:
    """Check every member against its label and return the masks, bit-packed, by id."""
    _check_members(pred, archive.namelist(), ids)
    masks: dict[str, _Mask] = {}
    for vol_id in ids:
        name = f"{vol_id}.tif"
        member = f"{pred}:{name}"
        shape = _truth_shape(folder / name)
        mask = _decode_member(_read_member(archive, name, member), member, shape)
        _check_values(mask, member)
        masks[vol_id] = _Mask(shape=shape, bits=np.packbits(mask))
    return masks


def score_submission(truth: str | os.PathLike[str], pred: str | os.PathLike[str]) -> dict[str, Any]:
    """Score a submission zip with the competition metric, after checking it in full.

    Parameters
    ----------
    truth : path
        A folder of ``<id>.tif`` label TIFFs (values 0/1/2), or a competition root
        holding ``test_labels/`` or ``train_labels/``. Its ids are the expected volumes.
    pred : path
        The ``submission.zip``: one ``<id>.tif`` per expected id, uint8 {0, 1}, the
        label's shape, and nothing else.

    Returns
    -------
    dict
        ``{id: {surface_dice, voi_score, topo_score, score}, …, "mean": float}``.

    Raises
    ------
    SubmissionError
        The zip is unreadable, or a member is missing, extra, duplicated, not a
        TIFF, of the wrong shape, dtype or values; the message names the member.
    DataLayoutError
        The truth folder is missing or holds no label TIFF.
    VolumeError
        A label TIFF is unreadable or invalid.
    """
    folder = _truth_folder(Path(truth))
    ids = _expected_ids(folder)
    pred_name = os.fspath(pred)
    try:
        archive = zipfile.ZipFile(pred)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SubmissionError("cannot open submission", path=pred, expected="a zip file", found=str(exc)) from None
    with archive:
        masks = _load_masks(archive, pred_name, folder, ids)
    out: dict[str, Any] = {}
    for vol_id, mask in masks.items():
        label = read_label(folder / f"{vol_id}.tif", image_shape=mask.shape)
        out[vol_id] = score_volume(mask.unpack(), label).to_dict()
    out["mean"] = sum(v["score"] for v in out.values()) / len(out)
    return out
