"""Phase 7: write and re-validate ``submission.zip``; bundle the run's outputs into ``results.zip``.

A submission holds one ``<id>.tif`` per test id: uint8 values {0, 1}, the shape of
the source volume, one page per z, LZW-compressed. It is written to a temporary
name, fsynced and renamed, then reopened and validated; a failed validation is an
error, never a silently bad file.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import tifffile

from ._faults import maybe_kill
from .atomic import write_atomic
from .errors import SubmissionError


def encode_mask(mask: np.ndarray) -> bytes:
    """A (z, y, x) uint8 volume (a {0, 1} mask, or a uint8 probability map) as multi-page LZW TIFF bytes."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ascontiguousarray(mask, dtype=np.uint8), photometric="minisblack", compression="lzw")
    return buffer.getvalue()


def write_submission(path: str | os.PathLike[str], masks: Mapping[str, bytes]) -> Path:
    """Write already-encoded ``{id: tiff bytes}`` into ``path`` atomically (stored, the TIFFs are compressed)."""

    def fill(handle: io.BufferedIOBase) -> None:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
            for vol_id in sorted(masks):
                archive.writestr(f"{vol_id}.tif", masks[vol_id])
                maybe_kill("submission_member_written")

    return write_atomic(path, fill)


def validate_submission(path: str | os.PathLike[str], expected_shapes: Mapping[str, tuple[int, int, int]]) -> dict[str, dict[str, object]]:
    """Reopen ``path`` and check names, shapes, dtype, values, pages and compression.

    Returns
    -------
    dict
        Per id: shape, positive voxel count and positive fraction.

    Raises
    ------
    SubmissionError
        Naming the member and what differs.
    """
    path = Path(path)
    summary: dict[str, dict[str, object]] = {}
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SubmissionError("submission is not a readable zip", path=path, expected="a zip file", found=str(exc)) from None
    with archive:
        names = sorted(archive.namelist())
        expected = sorted(f"{i}.tif" for i in expected_shapes)
        if names != expected:
            raise SubmissionError(
                "submission members differ from the test ids",
                path=path,
                expected=expected[:10],
                found=names[:10],
            )
        bad = archive.testzip()
        if bad is not None:
            raise SubmissionError("zip member fails its CRC", path=f"{path}:{bad}", expected="intact data", found="CRC mismatch")
        for vol_id, shape in expected_shapes.items():
            member = f"{path}:{vol_id}.tif"
            with tifffile.TiffFile(io.BytesIO(archive.read(f"{vol_id}.tif"))) as tif:
                pages = len(tif.pages)
                compression = tif.pages[0].compression.name if pages else "none"
                data = tif.asarray()
            if data.shape != tuple(shape):
                raise SubmissionError("mask shape differs from its volume", path=member, expected=tuple(shape), found=data.shape)
            if pages != shape[0]:
                raise SubmissionError("mask is not one page per z", path=member, expected=f"{shape[0]} pages", found=f"{pages} pages")
            if data.dtype != np.uint8:
                raise SubmissionError("mask is not uint8", path=member, expected="uint8", found=str(data.dtype))
            if compression != "LZW":
                raise SubmissionError("mask is not LZW-compressed", path=member, expected="LZW", found=compression)
            values = np.unique(data)
            if not np.isin(values, (0, 1)).all():
                raise SubmissionError("mask values outside {0, 1}", path=member, expected="{0, 1}", found=values.tolist()[:10])
            positives = int(np.count_nonzero(data))
            summary[vol_id] = {"shape": list(shape), "positive_voxels": positives, "positive_fraction": positives / data.size}
    return summary


#: Members stored as they are in ``results.zip``: float tensors and already-compressed files barely deflate, and
#: deflating a GPU student's checkpoints (~1 GB each) took minutes past the run's deadline.
STORED_SUFFIXES = frozenset({".safetensors", ".npz", ".zip", ".png", ".tif", ".tiff"})


def write_results_zip(path: str | os.PathLike[str], root: str | os.PathLike[str], members: list[str]) -> Path:
    """Bundle ``members`` (paths relative to ``root``; folders recursively) into ``path`` atomically.

    Text (journal, JSON) is deflated; :data:`STORED_SUFFIXES` are stored.
    """
    root = Path(root)

    def fill(handle: io.BufferedIOBase) -> None:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for name in members:
                target = root / name
                files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
                for file in files:
                    if file.is_file() and not file.name.startswith("."):
                        stored = file.suffix.lower() in STORED_SUFFIXES
                        archive.write(file, file.relative_to(root).as_posix(), compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)

    return write_atomic(path, fill)
