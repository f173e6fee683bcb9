"""The one folder walker: breadth-first, sorted, hidden folders skipped, unreadable folders ignored.

Discovery (the competition root), resume (checkpoints and ``results.zip`` of
previous runs) and the feature cache (caches in attached outputs) all look for
folders under the input roots the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator


def walk_folders(roots: Iterable[Path], *, depth: int, prune: Callable[[Path], bool] = lambda _p: False) -> Iterator[Path]:
    """Yield every folder under each root, breadth-first, down to ``depth`` levels below it.

    Parameters
    ----------
    roots : iterable of Path
        Folders to start from (each yielded first).
    depth : int
        Levels below a root to descend (0 = the roots only).
    prune : callable, optional
        ``prune(folder)`` True: yield the folder but do not descend into it.
    """
    for top in roots:
        frontier = [Path(top)]
        for level in range(depth + 1):
            below: list[Path] = []
            for folder in frontier:
                yield folder
                if level == depth or prune(folder):
                    continue
                try:
                    below.extend(sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
                except OSError:
                    continue
            frontier = below
