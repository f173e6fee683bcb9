"""Crash-safe file writes: temporary name, fsync, rename, fsync of the directory.

A crash at any instant leaves either the previous file or the new one, never a
torn file. One function per shape of payload; every persistent file of a run goes
through :func:`write_atomic`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

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
