"""Crash-safe file writes: temporary name, fsync, rename, fsync of the directory.

A crash at any instant leaves either the previous file or the new one, never a
torn file. One function per shape of payload; every persistent file of a run goes
through :func:`write_atomic`.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np

from .journal import dumps


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], Any]) -> Path:
    """Write a file atomically: ``writer(handle)`` fills a temporary file beside ``path``.

    The temporary file is flushed and fsynced, renamed over ``path``, and the
    directory fsynced. On any error the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    return write_atomic(path, lambda handle: handle.write(data))


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: bool = True) -> Path:
    """Atomically replace ``path`` with ``obj`` as JSON (sorted keys)."""
    return write_bytes_atomic(path, dumps(obj, indent=indent) + b"\n")


def copy_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Atomically copy a file."""
    with open(src, "rb") as source:
        return write_atomic(dst, lambda handle: shutil.copyfileobj(source, handle, 1 << 22))


def cache_key(*parts: str | int) -> str:
    """The name of a cache entry: a hash of everything its content depends on.

    Every cache of a run is keyed here (volume content keys, settings, seeds), so a
    changed label under an unchanged image, or a changed setting, misses the cache
    instead of reusing a stale entry.
    """
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:24]


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(str(arrays[key].dtype).encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def save_arrays_checked(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> Path:
    """Atomically write ``arrays`` as an ``.npz`` carrying the SHA-256 of their bytes."""
    buffer = io.BytesIO()
    np.savez(buffer, sha256=np.array(_arrays_digest(arrays)), **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def load_arrays_checked(path: str | os.PathLike[str], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read arrays written by :func:`save_arrays_checked`; raises ValueError (or OSError) unless the checksum holds."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in keys}
        stored = str(data["sha256"])
    actual = _arrays_digest(arrays)
    if stored != actual:
        raise ValueError(f"checksum expected {stored}, got {actual}")
    return arrays
