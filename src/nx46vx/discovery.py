"""Phase 1: find the competition data, the training pairs and the test ids among the input roots.

Kaggle mounts the competition under ``/kaggle/input/vesuvius-challenge-surface-detection/``
or ``/kaggle/input/competitions/vesuvius-challenge-surface-detection/``; nothing here
hard-codes either: every input root is searched (a few levels deep) for a folder
holding ``train.csv``/``test.csv`` beside ``train_images/``/``test_images/``.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .walk import walk_folders
from .errors import DataLayoutError, TestSetError

log = logging.getLogger("nx46vx")

KAGGLE_INPUT = Path("/kaggle/input")
SEARCH_DEPTH = 4
KNOWN_FOLDERS = ("train_images", "train_labels", "test_images")


@dataclass(frozen=True)
class TrainPair:
    """One training volume and its label."""

    id: str
    image: Path
    label: Path
    scroll_id: str = ""


@dataclass(frozen=True)
class TestVolume:
    """One test volume to segment."""

    __test__ = False  # not a pytest test class

    id: str
    image: Path


@dataclass(frozen=True)
class Discovery:
    """What phase 1 found."""

    root: Path
    input_roots: tuple[Path, ...]
    train: tuple[TrainPair, ...]
    test: tuple[TestVolume, ...]
    inventory: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def default_input_roots() -> list[Path]:
    """Every folder under ``/kaggle/input`` (the notebook's attached datasets)."""
    if not KAGGLE_INPUT.is_dir():
        return []
    return sorted(p for p in KAGGLE_INPUT.iterdir() if p.is_dir())


def _is_competition_root(folder: Path) -> bool:
    has_csv = (folder / "train.csv").is_file() or (folder / "test.csv").is_file()
    has_images = (folder / "train_images").is_dir() or (folder / "test_images").is_dir()
    return has_csv and has_images


def find_competition_root(input_roots: Sequence[Path]) -> Path:
    """The first folder (breadth-first, sorted) under any input root in the competition layout."""
    for folder in walk_folders(input_roots, depth=SEARCH_DEPTH):
        if _is_competition_root(folder):
            return folder
    raise DataLayoutError(
        "no competition data found under the input roots",
        path=", ".join(str(p) for p in input_roots) or "(none)",
        expected="a folder with train.csv or test.csv beside train_images/ or test_images/",
        found="no such folder",
        hint="pass --input DIR (repeatable) or attach the competition data to the notebook",
    )


def _read_ids(csv_path: Path) -> list[tuple[str, str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "id" not in reader.fieldnames:
                raise DataLayoutError("CSV has no id column", path=csv_path, expected="header id,scroll_id", found=reader.fieldnames)
            return [(str(row["id"]).strip(), str(row.get("scroll_id") or "").strip()) for row in reader if row.get("id")]
    except UnicodeDecodeError as exc:
        raise DataLayoutError("CSV is not UTF-8 text", path=csv_path, expected="UTF-8 CSV", found=str(exc)) from None


def _tifs(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in (".tif", ".tiff")}


def inventory(root: Path, ignored: Iterable[str]) -> dict[str, Any]:
    """Folders with file counts, suffix counts and bytes under ``root``."""
    ignored = set(ignored)
    folders: dict[str, dict[str, Any]] = {}
    suffixes: Counter[str] = Counter()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        entry = folders.setdefault(rel, {"files": 0, "bytes": 0, "ignored": rel.split(os.sep)[0] in ignored})
        for name in filenames:
            try:
                size = os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                continue
            entry["files"] += 1
            entry["bytes"] += size
            suffixes[Path(name).suffix.lower() or "(none)"] += 1
            total += size
    return {"folders": folders, "suffix_counts": dict(sorted(suffixes.items())), "bytes": total, "files": sum(suffixes.values())}


def discover(input_roots: Sequence[str | os.PathLike[str]] | None = None, *, include_deprecated: bool = False) -> Discovery:
    """Find the competition root, training pairs and test volumes.

    Parameters
    ----------
    input_roots : paths, optional
        Folders to search; default every folder under ``/kaggle/input``.
    include_deprecated : bool
        Also use ``deprecated_train_images/`` + ``deprecated_train_labels/``.

    Raises
    ------
    DataLayoutError
        No competition root found.
    TestSetError
        ``test_images/`` missing or empty, or an id of ``test.csv`` has no file.
    """
    roots = [Path(p) for p in input_roots] if input_roots else default_input_roots()
    for root_path in roots:
        if not root_path.exists():
            raise DataLayoutError("input root does not exist", path=root_path, expected="a folder", found="nothing")
    root = find_competition_root(roots)
    warnings: list[str] = []

    images, labels = _tifs(root / "train_images"), _tifs(root / "train_labels")
    if include_deprecated:
        images.update(_tifs(root / "deprecated_train_images"))
        labels.update(_tifs(root / "deprecated_train_labels"))
    listed = _read_ids(root / "train.csv") if (root / "train.csv").is_file() else [(i, "") for i in sorted(images)]
    train: list[TrainPair] = []
    for vol_id, scroll in listed:
        if vol_id in images and vol_id in labels:
            train.append(TrainPair(vol_id, images[vol_id], labels[vol_id], scroll))
    unpaired = len([i for i, _ in listed if not (i in images and i in labels)])
    if unpaired:
        warnings.append(f"{unpaired} training ids have no image+label pair and are skipped")

    test_dir = root / "test_images"
    test_files = _tifs(test_dir)
    if not test_files:
        raise TestSetError(
            "no test volumes",
            path=test_dir,
            expected="test_images/<id>.tif for every id of test.csv",
            found="missing folder" if not test_dir.is_dir() else "an empty folder",
        )
    if (root / "test.csv").is_file():
        test_ids = [i for i, _ in _read_ids(root / "test.csv")]
        missing = [i for i in test_ids if i not in test_files]
        if missing:
            raise TestSetError(
                f"test.csv lists id {missing[0]} but its volume is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                path=test_dir / f"{missing[0]}.tif",
                expected="a file for every id of test.csv",
                found=f"missing ids {missing[:10]}",
            )
        extra = sorted(set(test_files) - set(test_ids))
        if extra:
            warnings.append(f"{len(extra)} files in test_images/ are not in test.csv and are ignored: {extra[:5]}")
        if not test_ids:
            raise TestSetError("test.csv lists no ids", path=root / "test.csv", expected="at least one id", found="none")
    else:
        test_ids = sorted(test_files)
        warnings.append("no test.csv: every TIFF in test_images/ is a test volume")
    for w in warnings:
        log.warning(w)
    ignored = [p.name for p in root.iterdir() if p.is_dir() and p.name not in KNOWN_FOLDERS and not (include_deprecated and p.name.startswith("deprecated_"))]
    return Discovery(
        root=root,
        input_roots=tuple(roots),
        train=tuple(train),
        test=tuple(TestVolume(i, test_files[i]) for i in test_ids),
        inventory=inventory(root, ignored),
        warnings=tuple(warnings),
    )
