"""Hash-chained, Merkle-rooted event journal (``journal.jsonl``) and its verifier.

Format (DESIGN.md, "Journal"). The *body* of a record is the JSON object
``{data, event, phase, prev, run_id, seq, ts_ns}`` serialised once with sorted keys,
no spaces, UTF-8. The line written is those exact bytes with
``,"hash":"<hex>"`` inserted before the final ``}``; a verifier recovers the body by
removing that suffix and never re-serialises.

* ``hash = SHA-256(0x00 || bytes.fromhex(prev) || body)``; ``prev`` of the very
  first record is 64 zeros; a resumed run's first record links to the last hash
  of the journal it resumes and continues its ``seq``.
* ``MERKLE_ROOT`` records ``{"tree_size": n, "root": hex}``: the RFC 6962 Merkle
  Tree Hash over the bodies of the first ``n`` records of this file, with leaf
  ``SHA-256(0x00 || body)`` and node ``SHA-256(0x01 || left || right)``.

Every record reaches the operating system through one ``os.write`` before
:meth:`Journal.record` returns, so a SIGKILL loses no journaled event; ``fsync``
happens at phase ends and checkpoints only (it costs ~100x a write).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson

from ._faults import maybe_kill
from .errors import JournalError

log = logging.getLogger("nx46vx")

ZERO_HASH = "0" * 64
BODY_KEYS = ("data", "event", "phase", "prev", "run_id", "seq", "ts_ns")
_HASH_SUFFIX_LEN = len(',"hash":""}') + 64
_ORJSON_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY
# Non-string keys (ints in per-class counts, ...) are rare; allowing them costs orjson about as much as the rest of
# the serialisation, so it is the fallback, not the default. Both give the same bytes for string keys.
_ORJSON_OPTS_ANY_KEYS = _ORJSON_OPTS | orjson.OPT_NON_STR_KEYS


def _default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot journal a {type(obj).__name__}")


def dumps(obj: Any, *, indent: bool = False) -> bytes:
    """Canonical JSON bytes: sorted keys, UTF-8, no spaces (the journal's serialisation) unless ``indent``."""
    indent_opt = orjson.OPT_INDENT_2 if indent else 0
    try:
        return orjson.dumps(obj, option=_ORJSON_OPTS | indent_opt, default=_default)
    except orjson.JSONEncodeError:
        return orjson.dumps(obj, option=_ORJSON_OPTS_ANY_KEYS | indent_opt, default=_default)


# Hash states after the domain-separation byte; ``copy()`` of one is cheaper than hashing a concatenation.
_LEAF_STATE = hashlib.sha256(b"\x00")
_NODE_STATE = hashlib.sha256(b"\x01")


def leaf_hash(body: bytes) -> bytes:
    """RFC 6962 leaf hash ``SHA-256(0x00 || body)``."""
    state = _LEAF_STATE.copy()
    state.update(body)
    return state.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash ``SHA-256(0x01 || left || right)``."""
    state = _NODE_STATE.copy()
    state.update(left)
    state.update(right)
    return state.digest()


def _chain_digest(prev: bytes, body: bytes) -> bytes:
    state = _LEAF_STATE.copy()
    state.update(prev)
    state.update(body)
    return state.digest()


def chain_hash(prev_hex: str, body: bytes) -> str:
    """The record hash ``SHA-256(0x00 || bytes.fromhex(prev) || body)`` as hex."""
    return _chain_digest(bytes.fromhex(prev_hex), body).hex()


class MerkleAccumulator:
    """Incremental RFC 6962 Merkle Tree Hash.

    Keeps the roots of the perfect subtrees that make up the leaves so far: one per
    set bit of the leaf count, largest first. Appending is a binary increment (each
    trailing 1 bit of the count merges two subtrees), and the root of the current
    size is a right fold over those peaks: for n leaves the RFC 6962 split point is
    the largest power of two below n, which is exactly the first peak.
    """

    def __init__(self) -> None:
        self._peaks: list[bytes] = []  # subtree hashes, sizes the set bits of ``size``, largest first
        self.size = 0

    def append(self, body: bytes) -> None:
        """Add one leaf (a record body)."""
        digest = leaf_hash(body)
        carry = self.size
        while carry & 1:
            digest = node_hash(self._peaks.pop(), digest)
            carry >>= 1
        self._peaks.append(digest)
        self.size += 1

    def root(self) -> str:
        """Hex Merkle Tree Hash of all leaves so far (SHA-256 of the empty string for none)."""
        if not self._peaks:
            return hashlib.sha256(b"").hexdigest()
        digest = self._peaks[-1]
        for left in reversed(self._peaks[:-1]):
            digest = node_hash(left, digest)
        return digest.hex()


def merkle_root(bodies: list[bytes]) -> str:
    """RFC 6962 Merkle Tree Hash of ``bodies`` (hex)."""
    acc = MerkleAccumulator()
    for body in bodies:
        acc.append(body)
    return acc.root()


@dataclass(frozen=True)
class ChainLink:
    """Where a journal continues from: the last record's hash and the next seq."""

    prev: str = ZERO_HASH
    seq: int = 0


class Journal:
    """Append-only writer of ``journal.jsonl``.

    Parameters
    ----------
    path : path
        The file to create. An existing file is never appended to: a resumed run
        writes a new file linked through ``link``.
    run_id : str
        Identifier of this run, stored in every record.
    link : ChainLink, optional
        Hash and seq to continue from (default: a new chain).
    """

    def __init__(self, path: str | os.PathLike[str], *, run_id: str, link: ChainLink = ChainLink()) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.prev = link.prev
        self._prev_raw = bytes.fromhex(link.prev)
        self.seq = link.seq
        self.first_seq = link.seq
        self._merkle = MerkleAccumulator()
        self.write_seconds = 0.0
        self.events = 0
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except FileExistsError:
            raise JournalError(
                "journal file already exists; a run never appends to another run's journal",
                path=self.path,
                expected="a new file",
                found="an existing file",
            ) from None
        except OSError as exc:
            raise JournalError("cannot create journal", path=self.path, expected="a writable file", found=str(exc)) from None

    @property
    def tree_size(self) -> int:
        """Number of records written to this file."""
        return self._merkle.size

    def link(self) -> ChainLink:
        """The link a continuation of this journal starts from."""
        return ChainLink(self.prev, self.seq)

    def record(self, event: str, phase: str, data: dict[str, Any] | None = None) -> str:
        """Append one event; returns its hash. The line reaches the OS before return."""
        start = time.perf_counter()
        body = dumps(
            {
                "data": data if data is not None else {},
                "event": event,
                "phase": phase,
                "prev": self.prev,
                "run_id": self.run_id,
                "seq": self.seq,
                "ts_ns": time.time_ns(),
            }
        )
        raw = _chain_digest(self._prev_raw, body)
        digest = raw.hex()
        line = b"".join((body[:-1], b',"hash":"', digest.encode("ascii"), b'"}\n'))
        written = os.write(self._fd, line)
        if written < len(line):  # a short write (full disk, signal): finish it or raise
            view = memoryview(line)[written:]
            while view:
                view = view[os.write(self._fd, view) :]
        self._merkle.append(body)
        self.prev, self._prev_raw = digest, raw
        self.seq += 1
        self.events += 1
        self.write_seconds += time.perf_counter() - start
        maybe_kill(event)
        return digest

    def merkle_root(self, phase: str) -> tuple[int, str]:
        """Journal a ``MERKLE_ROOT`` over every record so far; returns ``(tree_size, root)``."""
        size, root = self._merkle.size, self._merkle.root()
        self.record("MERKLE_ROOT", phase, {"tree_size": size, "root": root})
        return size, root

    def sync(self) -> None:
        """fsync the file (phase ends and checkpoints)."""
        start = time.perf_counter()
        os.fsync(self._fd)
        self.write_seconds += time.perf_counter() - start

    def close(self) -> None:
        """fsync and close; idempotent."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Record:
    """One parsed journal line."""

    line_no: int
    body: bytes
    hash: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify`: ``ok`` is False at the first bad line, named by ``line``."""

    ok: bool
    records: int
    line: int | None = None
    reason: str = ""
    last_hash: str = ZERO_HASH
    next_seq: int = 0
    roots_checked: int = 0
    complete: bool = False

    def message(self, path: str | os.PathLike[str]) -> str:
        if self.ok:
            state = "ends with RUN_END" if self.complete else "no RUN_END: the run was interrupted or is still running"
            return f"OK {os.fspath(path)}: {self.records} records, {self.roots_checked} Merkle roots verified, {state}"
        return f"FAIL {os.fspath(path)} line {self.line}: {self.reason}"


def parse_line(raw: bytes, line_no: int) -> Record:
    """Split one line into body and hash; raises JournalError on a malformed line."""
    if not raw.endswith(b"\n"):
        raise JournalError(f"line {line_no} is truncated", expected="a line ending in a newline", found="end of file")
    line = raw[:-1]
    suffix = line[-_HASH_SUFFIX_LEN:]
    if len(line) <= _HASH_SUFFIX_LEN or not (suffix.startswith(b',"hash":"') and suffix.endswith(b'"}')):
        raise JournalError(f"line {line_no} has no hash suffix", expected=',"hash":"<64 hex>"}', found=line[-80:].decode("utf-8", "replace"))
    digest = suffix[len(b',"hash":"'):-2].decode("ascii", "replace")
    body = line[:-_HASH_SUFFIX_LEN] + b"}"
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise JournalError(f"line {line_no} body is not JSON", expected="a JSON object", found=str(exc)) from None
    if not isinstance(fields, dict) or tuple(sorted(fields)) != BODY_KEYS:
        found = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
        raise JournalError(f"line {line_no} has the wrong fields", expected=list(BODY_KEYS), found=found)
    return Record(line_no, body, digest, fields)


def iter_records(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Parse a journal file line by line (raises JournalError at a malformed line)."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            yield parse_line(raw, line_no)


def last_link(path: str | os.PathLike[str]) -> ChainLink:
    """The link after the last intact record of a journal (stops at the first bad line)."""
    report = verify(path)
    return ChainLink(report.last_hash, report.next_seq)


def verify(path: str | os.PathLike[str], *, previous: str | os.PathLike[str] | None = None) -> VerifyReport:
    """Check a journal's chain, hashes, seq numbers and Merkle roots.

    Parameters
    ----------
    path : path
        The journal to check.
    previous : path, optional
        The journal of the run this one resumed: its last intact record must be
        the one the first record of ``path`` links to.

    Returns
    -------
    VerifyReport
        ``ok`` False names the first bad line (1-based) and why.
    """
    expected = ChainLink()
    if previous is not None:
        before = verify(previous)
        if not before.ok:
            return VerifyReport(False, 0, before.line, f"previous journal {os.fspath(previous)} is bad: {before.reason}")
        expected = ChainLink(before.last_hash, before.next_seq)
    merkle = MerkleAccumulator()
    count = roots = 0
    prev, next_seq, complete = expected.prev, expected.seq, False
    line_no = 0
    try:
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                rec = parse_line(raw, line_no)
                f = rec.fields
                if line_no == 1:
                    if f["event"] != "RUN_START":
                        return VerifyReport(False, 0, 1, f"first event expected RUN_START, got {f['event']}")
                    if previous is None:
                        # A standalone check accepts a continuation: the chain starts where the file says.
                        prev, next_seq = f["prev"], f["seq"]
                if f["seq"] != next_seq:
                    return VerifyReport(False, count, line_no, f"seq expected {next_seq}, got {f['seq']}", prev, next_seq, roots)
                if f["prev"] != prev:
                    return VerifyReport(False, count, line_no, f"prev expected {prev}, got {f['prev']}", prev, next_seq, roots)
                actual = chain_hash(prev, rec.body)
                if actual != rec.hash:
                    return VerifyReport(False, count, line_no, f"hash expected {actual}, got {rec.hash}", prev, next_seq, roots)
                if f["event"] == "MERKLE_ROOT":
                    data = f["data"]
                    want = {"tree_size": merkle.size, "root": merkle.root()}
                    got = {"tree_size": data.get("tree_size"), "root": data.get("root")}
                    if got != want:
                        return VerifyReport(False, count, line_no, f"Merkle root expected {want}, got {got}", prev, next_seq, roots)
                    roots += 1
                merkle.append(rec.body)
                prev, next_seq = rec.hash, f["seq"] + 1
                complete = f["event"] == "RUN_END"
                count += 1
    except JournalError as exc:
        return VerifyReport(False, count, line_no, exc.what + (f": expected {exc.expected}, got {exc.found}" if exc.expected else ""), prev, next_seq, roots)
    except OSError as exc:
        return VerifyReport(False, 0, None, f"cannot read: {exc}")
    if count == 0:
        return VerifyReport(False, 0, 1, "journal is empty", prev, next_seq, roots)
    return VerifyReport(True, count, None, "", prev, next_seq, roots, complete)
