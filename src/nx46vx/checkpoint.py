"""Atomic checkpoints, integrity, discovery across input roots, and compatibility.

Layout: ``checkpoints/ckpt-<seq>/`` with payload files and ``manifest.json``
(written last, holding the SHA-512 of every payload file), and
``checkpoints/LATEST`` naming the newest one for people and other tools: this
package never reads it (:func:`latest_committed` decides). A checkpoint is written
into a hidden temporary directory, every file and the directory fsynced, then
renamed into place; :func:`is_committed` is the one function that decides whether
a checkpoint can be used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import orjson
from ._faults import maybe_kill
from .atomic import fsync_dir, write_bytes_atomic
from .errors import CheckpointError
from .journal import dumps
from .payload import pack, unpack
from .walk import walk_folders

log = logging.getLogger("nx46vx")

MANIFEST = "manifest.json"
LATEST = "LATEST"
PREFIX = "ckpt-"
FORMAT = 2  # 2: per-phase payloads as JSON + safetensors, per-phase signatures; 1: torch pickles


def sha512_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(
    folder: str | os.PathLike[str],
    seq: int,
    payload: dict[str, bytes],
    manifest: dict[str, Any],
    *,
    keep_last: int,
    linked: dict[str, tuple[Path, str]] | None = None,
) -> Path:
    """Write ``checkpoints/ckpt-<seq>`` atomically and point ``LATEST`` at it.

    Parameters
    ----------
    folder : path
        The ``checkpoints`` folder.
    payload : dict name → bytes
        Payload files.
    manifest : dict
        Fields of the manifest; ``sha512`` and ``format`` are added here.
    keep_last : int
        Older committed checkpoints beyond this many are deleted (never the only valid one).
    linked : dict name → (path, sha512), optional
        Payload files unchanged since a committed checkpoint: hard-linked from it (copied
        where links are not possible) instead of serialised again. Committed files are
        never modified, so sharing them is safe, and pruning the old folder keeps them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{seq:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{seq:08d}-", dir=folder))
    try:
        digests = {}
        for name, data in payload.items():
            _write_synced(tmp / name, data)
            digests[name] = hashlib.sha512(data).hexdigest()
        for name, (source, digest) in (linked or {}).items():
            try:
                os.link(source, tmp / name)
            except OSError:
                shutil.copyfile(source, tmp / name)
            digests[name] = digest
        full = dict(manifest, sha512=digests, format=FORMAT, seq=seq)
        _write_synced(tmp / MANIFEST, dumps(full, indent=True))
        fsync_dir(tmp)
        maybe_kill("checkpoint_payload_written")
        if final.exists():  # a leftover from a crashed run with the same seq: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_bytes_atomic(folder / LATEST, final.name.encode() + b"\n")
    prune(folder, keep_last, committed=final)
    return final


def read_manifest(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse ``manifest.json``; raises CheckpointError naming the file."""
    path = Path(ckpt) / MANIFEST
    try:
        manifest = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError("checkpoint has no manifest", path=path, expected="manifest.json", found="nothing") from None
    except orjson.JSONDecodeError as exc:
        raise CheckpointError("manifest is not JSON", path=path, expected="JSON", found=str(exc)) from None
    if not isinstance(manifest, dict) or "sha512" not in manifest:
        raise CheckpointError("manifest lacks checksums", path=path, expected="a sha512 table", found=type(manifest).__name__)
    return manifest


def check_integrity(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the manifest if every payload file matches its SHA-512, else raise CheckpointError."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    for name, want in manifest["sha512"].items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError("payload file missing", path=path, expected=f"sha512 {want[:16]}…", found="no file")
        got = sha512_file(path)
        if got != want:
            raise CheckpointError("payload checksum mismatch", path=path, expected=f"sha512 {want[:16]}…", found=f"sha512 {got[:16]}…")
    return manifest


def is_committed(ckpt: str | os.PathLike[str]) -> bool:
    """The one rule: a checkpoint counts when its manifest parses and every payload checksum holds."""
    try:
        check_integrity(ckpt)
    except CheckpointError:
        return False
    return True


def payload_files(name: str, obj: Any) -> dict[str, bytes]:
    """The two files of one payload entry: ``<name>.json`` (plain data) and ``<name>.safetensors`` (its arrays)."""
    plain, arrays = pack(obj)
    return {f"{name}.json": plain, f"{name}.safetensors": arrays}


def load_payload(ckpt: str | os.PathLike[str], name: str) -> Any:
    """Load one payload entry of a checkpoint (call after :func:`check_integrity`).

    Only JSON and safetensors are read: nothing found under an input root is unpickled.
    """
    folder = Path(ckpt)
    try:
        plain = (folder / f"{name}.json").read_bytes()
        arrays = (folder / f"{name}.safetensors").read_bytes()
    except OSError as exc:
        raise CheckpointError("payload file unreadable", path=folder / name, expected=f"{name}.json and {name}.safetensors", found=str(exc)) from None
    return unpack(plain, arrays)


def latest_committed(folder: str | os.PathLike[str]) -> Path | None:
    """The newest committed ``ckpt-*`` under ``folder`` (None when there is none)."""
    committed = [p for p in list_checkpoints(folder) if is_committed(p)]
    return committed[-1] if committed else None


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """``ckpt-*`` folders under ``folder``, oldest first (temporary ones excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def prune(folder: str | os.PathLike[str], keep_last: int, *, committed: Path) -> None:
    """Delete checkpoints older than the newest ``keep_last`` and stale temporaries; never ``committed``.

    ``committed`` is the checkpoint just written, the newest (highest seq), whose checksums
    were computed from the bytes it was written with: it is the newest valid one without
    reading a file again, so pruning hashes nothing (checking every kept checkpoint at each
    write would re-read gigabytes per test volume with a GPU student).
    """
    folder = Path(folder)
    for stale in folder.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    older = [p for p in list_checkpoints(folder) if p.resolve() != Path(committed).resolve()]
    for old in older[: max(0, len(older) - max(0, keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Found:
    """A checkpoint found somewhere, with the journal of the run that wrote it (if present)."""

    path: Path
    source: Path
    journal: Path | None
    order: tuple[int, int]


def _journal_beside(run_root: Path) -> Path | None:
    journal = run_root / "journal.jsonl"
    return journal if journal.is_file() else None


def _is_link(info: zipfile.ZipInfo) -> bool:
    """Whether a zip member is a symbolic link (its Unix mode in the high bits of the external attributes)."""
    return stat.S_ISLNK(info.external_attr >> 16)


def extract_results_zip(archive: Path, into: Path) -> Path | None:
    """Unpack the checkpoints and journal of a previous run's ``results.zip`` into ``into``; None if it holds none."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.startswith("checkpoints/") or n == "journal.jsonl"]
            if not any(n.startswith("checkpoints/") for n in names):
                return None
            target = into / hashlib.sha256(str(archive.resolve()).encode()).hexdigest()[:16]
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            root = target.resolve()
            for info in (zf.getinfo(n) for n in names):
                if _is_link(info) or not (target / info.filename).resolve().is_relative_to(root):
                    log.warning("%s: member %s skipped: expected a file inside the archive's folder, got a link or a path leaving it", archive, info.filename)
                    continue
                zf.extract(info, target)
            return target
    except (OSError, zipfile.BadZipFile) as exc:
        log.warning("cannot read %s: %s", archive, exc)
        return None


def find_checkpoints(roots: Iterable[Path], *, unpack_into: Path, depth: int = 3) -> list[Found]:
    """Every ``ckpt-*`` under ``<root>/…/checkpoints/`` and inside ``results.zip`` files, newest first.

    A ``results.zip`` is unpacked only where no ``checkpoints/`` folder lies beside it
    (an archive attached or downloaded alone): a run folder's own archive holds a copy
    of a checkpoint in that folder.

    Order is by the manifest's ``ts_ns`` then seq (unreadable manifests sort last, so
    they are still reported as corrupt when reached).
    """
    run_roots: list[Path] = []
    for folder in walk_folders(roots, depth=depth, prune=lambda f: f.name == "checkpoints"):
        if folder.name == "checkpoints":
            continue
        archive = folder / "results.zip"
        if (folder / "checkpoints").is_dir():
            # a run folder's results.zip copies its newest checkpoint: unpacking it would read that checkpoint twice
            run_roots.append(folder)
        elif archive.is_file():
            unpacked = extract_results_zip(archive, unpack_into)
            if unpacked is not None:
                run_roots.append(unpacked)
    found: dict[Path, Found] = {}
    for run_root in run_roots:
        for ckpt in list_checkpoints(run_root / "checkpoints"):
            try:
                manifest = read_manifest(ckpt)
                order = (int(manifest.get("ts_ns", 0)), int(manifest.get("seq", 0)))
            except CheckpointError:
                order = (-1, -1)
            found.setdefault(ckpt.resolve(), Found(ckpt, run_root, _journal_beside(run_root), order))
    return sorted(found.values(), key=lambda f: f.order, reverse=True)


def signature_changes(stored: Any, current: Any, prefix: str = "") -> dict[str, list[Any]]:
    """Every leaf (dotted path) where two signatures differ, as ``{path: [old, new]}`` (None where absent)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out: dict[str, list[Any]] = {}
        for key in sorted(set(stored) | set(current)):
            out.update(signature_changes(stored.get(key), current.get(key), f"{prefix}{key}."))
        return out
    return {} if stored == current else {prefix.rstrip("."): [stored, current]}
