"""The output folder's size limit (Kaggle keeps 20 GB of ``/kaggle/working``): checked before each cache write."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (0 when it does not exist), a hard-linked file once.

    Checkpoints share a finished phase's files by hard links: counting each link would
    charge the quota for copies that take no space.
    """
    total, seen = 0, set()
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                info = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


class OutputQuota:
    """Running tally of the output folder's size against ``quota_gb``.

    The folder is measured once (lazily), then each cache write adds its size, so a
    check costs nothing per write. Checkpoints, journal and submission are never
    refused: only caches, which can be recomputed. :meth:`allow` is thread-safe
    (the training-volume loaders ask it from their threads).
    """

    def __init__(self, output: Path, quota_gb: float) -> None:
        self.output = output
        self.limit = int(quota_gb * (1 << 30))
        self._used: int | None = None
        self.refused = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        if self._used is None:
            self._used = folder_bytes(self.output)
        return self._used

    def allow(self, nbytes: int) -> bool:
        """True (and counted) when ``nbytes`` more stay under the quota."""
        with self._lock:
            if self.used + nbytes > self.limit:
                self.refused += 1
                return False
            self._used = self.used + nbytes
            return True
