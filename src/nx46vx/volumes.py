"""Reading and validating CT volumes and label volumes (multi-page TIFF, uint8, (z, y, x))."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile

from .errors import LabelValueError, VolumeDtypeError, VolumeReadError, VolumeShapeError

LABEL_VALUES = (0, 1, 2)
BACKGROUND, SURFACE, UNLABELED = LABEL_VALUES
# Peak bytes per voxel while one volume is processed (upper estimates, checked before a volume is decoded):
# segmenting holds the uint8 volume, the float32 probability map, the blending rows of the windows in flight and the
# post-processing labels; training reads image and label and indexes a class's voxels (int64 per voxel at worst).
SEGMENT_BYTES_PER_VOXEL = 24
TRAIN_BYTES_PER_VOXEL = 12


def read_any(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a 3-D TIFF of any dtype, shape (z, y, x); raises VolumeReadError / VolumeShapeError."""
    path = Path(path)
    with _checked_tiff(path) as tif:
        volume = tif.asarray()
    if volume.ndim != 3:
        raise VolumeShapeError("volume is not 3-D", path=path, expected="3-D (z, y, x)", found=f"shape {volume.shape}")
    return volume


def read_volume(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a 3-D uint8 volume.

    Parameters
    ----------
    path : path
        A multi-page TIFF, one page per z.

    Returns
    -------
    ndarray, uint8, shape (z, y, x)

    Raises
    ------
    VolumeReadError
        Not a readable TIFF (corrupt, truncated, missing codec).
    VolumeShapeError
        Not 3-D.
    VolumeDtypeError
        Not uint8.
    """
    path = Path(path)
    volume = read_any(path)
    if volume.dtype != np.uint8:
        raise VolumeDtypeError("volume is not uint8", path=path, expected="uint8", found=str(volume.dtype))
    if min(volume.shape) < 2:
        raise VolumeShapeError("volume is too small", path=path, expected="at least 2 voxels per axis", found=f"shape {volume.shape}")
    return volume


def read_label(path: str | os.PathLike[str], *, image_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read a label volume and check its values (and its shape against its image).

    Returns
    -------
    ndarray, uint8, shape (z, y, x), values in {0, 1, 2}
    """
    label = read_volume(path)
    if image_shape is not None and label.shape != tuple(image_shape):
        raise VolumeShapeError(
            "label shape differs from its image", path=path, expected=f"shape {tuple(image_shape)}", found=f"shape {label.shape}"
        )
    bad = np.setdiff1d(np.unique(label), LABEL_VALUES)
    if bad.size:
        raise LabelValueError(
            "label holds values outside {0, 1, 2}", path=path, expected="values in {0, 1, 2}", found=f"values {bad.tolist()}"
        )
    return label


def read_pair(image_path: str | os.PathLike[str], label_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate an (image, label) pair; both uint8 (z, y, x) of one shape."""
    image = read_volume(image_path)
    return image, read_label(label_path, image_shape=image.shape)


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs damaged structures as errors itself; the caller raises a package error naming them instead."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _truncation(tif: tifffile.TiffFile, size: int) -> str | None:
    """What lies past the end of a file of ``size`` bytes: a page's data or the next page's header; None when nothing."""
    last = tif.pages[-1]
    ends = [int(o) + int(c) for page in tif.pages for o, c in zip(page.dataoffsets, page.databytecounts)]
    if ends and max(ends) > size:
        return f"{size} bytes, but page data reaches byte {max(ends)}"
    fmt = tif.tiff
    handle = tif.filehandle
    handle.seek(last.offset)
    (count,) = struct.unpack(fmt.tagnoformat, handle.read(fmt.tagnosize))
    handle.seek(last.offset + fmt.tagnosize + count * fmt.tagsize)
    raw = handle.read(fmt.offsetsize)
    if len(raw) < fmt.offsetsize:
        return f"{size} bytes, cut inside the header of page {len(tif.pages)}"
    (next_page,) = struct.unpack(fmt.offsetformat, raw)
    if next_page >= size:
        return f"{size} bytes, but page {len(tif.pages) + 1} starts at byte {next_page}"
    return None


@contextlib.contextmanager
def _checked_tiff(path: Path) -> Iterator[tifffile.TiffFile]:
    """An open TIFF whose pages all lie inside the file; any failure, opening or inside the block, is a VolumeReadError."""
    try:
        size = path.stat().st_size
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            truncated = _truncation(tif, size)
            if truncated:
                raise VolumeReadError("truncated TIFF", path=path, expected="every page inside the file", found=truncated)
            yield tif
    except Exception as exc:  # tifffile and imagecodecs raise many kinds; all mean "unreadable"
        raise _read_error(path, exc) from None


def _read_error(path: Path, exc: BaseException) -> VolumeReadError:
    """The package error for a TIFF that could not be read (``exc`` as raised by the OS, tifffile or a codec)."""
    if isinstance(exc, VolumeReadError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return VolumeReadError("volume file not found", path=path, expected="a TIFF file", found="nothing")
    # a structure that ends early (an IFD cut in half, a header shorter than its fields) is a file cut short
    cut_short = isinstance(exc, (struct.error, EOFError)) or "corrupt" in str(exc).lower()
    what = "truncated or corrupt TIFF" if cut_short else "cannot read TIFF"
    return VolumeReadError(what, path=path, expected="a readable multi-page TIFF", found=f"{type(exc).__name__}: {exc}")


def inspect_volume(path: str | os.PathLike[str], *, label: bool = False) -> tuple[int, int, int]:
    """Check a volume TIFF in milliseconds, without decoding it whole: header, length, first and last page.

    Parameters
    ----------
    path : path
    label : bool
        Also check that the decoded pages hold only the label values {0, 1, 2}.

    Returns
    -------
    (z, y, x) : the volume's shape.

    Raises
    ------
    VolumeReadError
        Missing, not a TIFF, truncated (the message says "truncated"), or a page that does not decode.
    VolumeShapeError
        Not 3-D.
    VolumeDtypeError
        Not uint8.
    LabelValueError
        ``label`` and a checked page holds another value.
    """
    path = Path(path)
    with _checked_tiff(path) as tif:
        shape, dtype = tuple(int(s) for s in tif.series[0].shape), tif.series[0].dtype
        pages = [tif.pages[0].asarray(), tif.pages[-1].asarray()] if len(shape) == 3 and dtype == np.uint8 else []
    if len(shape) != 3:
        raise VolumeShapeError("volume is not 3-D", path=path, expected="3-D (z, y, x)", found=f"shape {shape}")
    if dtype != np.uint8:
        raise VolumeDtypeError("volume is not uint8", path=path, expected="uint8", found=str(dtype))
    if label:
        bad = np.setdiff1d(np.unique(np.concatenate([p.ravel() for p in pages])), LABEL_VALUES)
        if bad.size:
            raise LabelValueError("label holds values outside {0, 1, 2}", path=path, expected="values in {0, 1, 2}", found=f"values {bad.tolist()} (first or last page)")
    return shape  # type: ignore[return-value]


def volume_shape(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """Shape of a TIFF volume from its header (no decoding); None when unreadable.

    tifffile's shaped metadata wins over the pages counted, so a file cut short still
    says the shape it was written with (the shape of an empty mask in its place).
    """
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            for meta in tif.shaped_metadata or ():
                if isinstance(meta, dict) and len(meta.get("shape", ())) == 3:
                    return tuple(int(s) for s in meta["shape"])
            return tuple(int(s) for s in tif.series[0].shape)
    except Exception:  # an unreadable file is reported by the caller, naming it
        return None


def volume_voxels(path: str | os.PathLike[str]) -> int:
    """Voxel count of a TIFF volume from its header (no decoding); 0 when unreadable."""
    shape = volume_shape(path)
    return int(np.prod(shape)) if shape else 0


def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (hex), read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sampled_sha256(path: str | os.PathLike[str], *, block: int = 1 << 16, samples: int = 16) -> str:
    """SHA-256 over a file's size and ``samples`` evenly spaced blocks (first and last included).

    The content key of a volume at discovery: reading ~1 MiB per file instead of the
    whole file (26 GB of training data) keeps discovery to seconds, and a compressed
    TIFF that changed anywhere but between the samples is vanishingly unlikely to keep
    its size. Caches keyed by it also check their own content checksum when loaded.
    """
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as handle:
        if size <= block * samples:
            digest.update(handle.read())
        else:
            for i in range(samples):
                handle.seek((size - block) * i // (samples - 1))
                digest.update(handle.read(block))
    return digest.hexdigest()


def volume_key(image: str | os.PathLike[str], label: str | os.PathLike[str] | None = None) -> str:
    """Content key of a test volume (its image) or a training pair (image and label): names every cache entry."""
    key = sampled_sha256(image)[:32]
    return key if label is None else key + sampled_sha256(label)[:16]
