"""Hash-chained, Merkle-rooted event journal (``journal.jsonl``) and its verifier.

Format (DESIGN.md, "Journal"). The *body* of a record is the JSON object
``{data, event, phase, prev, run_id, seq, ts_ns}`` serialised once with sorted keys,
no spaces, UTF-8. The line written is those exact bytes with
``,"hash":"<hex>"`` inserted before the final ``}``; a verifier recovers the body by
removing that suffix and never re-serialises.

* ``hash = SHA-256(0x00 || bytes.fromhex(prev) || body)``; ``prev`` of the very
  first record is 64 zeros; a resumed run's first record links to the last hash
  of the journal it resumes and continues its ``seq``. When that journal is damaged
  (torn or unparseable line, broken link, a field of the wrong type), the chain
  continues from its last good record and the new file journals
  ``JOURNAL_DAMAGED`` naming the file, the first bad line and what is wrong;
  ``verify(path, previous=...)`` then requires that record.
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
import re
import time
from dataclasses import dataclass, field, replace
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
    """Where a journal continues from: the last record's hash and the next seq.

    ``damage`` (not part of equality) says what is wrong in the journal this link
    was read from, after the record it points to (see :func:`last_link`).
    """

    prev: str = ZERO_HASH
    seq: int = 0
    damage: "JournalDamage | None" = field(default=None, compare=False)


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
        if not is_hash(link.prev) or not isinstance(link.seq, int) or isinstance(link.seq, bool) or link.seq < 0:
            raise JournalError("cannot continue a chain from this link", path=self.path,
                               expected="a 64-hex-digit hash and an integer seq >= 0", found=f"prev {link.prev!r}, seq {link.seq!r}")
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


_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_hash(value: Any) -> bool:
    """Whether ``value`` is a record hash: 64 lowercase hex digits."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _shown(value: Any, limit: int = 80) -> str:
    """``value`` as a short diagnostic: its type and a clipped repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:limit] + '…' if len(text) > limit else text}"


@dataclass(frozen=True)
class Record:
    """One parsed journal line."""

    line_no: int
    body: bytes
    hash: str
    fields: dict[str, Any]


class _BadLine(Exception):
    """A line that is not a well-formed record: what is wrong, what was expected, what was found."""

    def __init__(self, what: str, expected: Any = None, found: Any = None) -> None:
        super().__init__(what)
        self.what, self.expected, self.found = what, expected, found


# field -> (check, what a good value is); the body keys themselves are checked first
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "data": (lambda v: isinstance(v, dict), "a JSON object"),
    "event": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "phase": (lambda v: isinstance(v, str), "a string"),
    "prev": (is_hash, "64 lowercase hex digits"),
    "run_id": (lambda v: isinstance(v, str), "a string"),
    "seq": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "ts_ns": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
}


def _split_line(raw: bytes) -> Record:
    """Split one raw line into body, hash and typed fields; raises :class:`_BadLine` (line number 0: the caller's)."""
    if not raw.endswith(b"\n"):
        raise _BadLine("truncated line", "a line ending in a newline", "end of file")
    line = raw[:-1]
    suffix = line[-_HASH_SUFFIX_LEN:]
    if len(line) <= _HASH_SUFFIX_LEN or not (suffix.startswith(b',"hash":"') and suffix.endswith(b'"}')):
        raise _BadLine("no hash suffix", ',"hash":"<64 hex>"}', line[-80:].decode("utf-8", "replace"))
    digest = suffix[len(b',"hash":"') : -2].decode("ascii", "replace")
    if not is_hash(digest):
        raise _BadLine("field 'hash' is not a record hash", "64 lowercase hex digits", repr(digest))
    body = line[:-_HASH_SUFFIX_LEN] + b"}"
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _BadLine("body is not JSON", "a JSON object", str(exc)) from None
    if not isinstance(fields, dict) or tuple(sorted(fields)) != BODY_KEYS:
        found = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
        raise _BadLine("wrong fields", list(BODY_KEYS), found)
    for key, (check, good) in _FIELD_TYPES.items():
        if not check(fields[key]):
            raise _BadLine(f"field {key!r} has the wrong type or value", good, _shown(fields[key]))
    return Record(0, body, digest, fields)


def parse_line(raw: bytes, line_no: int) -> Record:
    """Split one line into body and hash, with every field's type checked; raises JournalError naming the line."""
    try:
        rec = _split_line(raw)
    except _BadLine as bad:
        raise JournalError(f"line {line_no}: {bad.what}", expected=bad.expected, found=bad.found) from None
    return Record(line_no, rec.body, rec.hash, rec.fields)


def iter_records(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Parse a journal file line by line (raises JournalError at a malformed line)."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            yield parse_line(raw, line_no)


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify`: ``ok`` is False at the first bad line, named by ``line`` (1-based).

    ``last_hash`` and ``next_seq`` are the link after the last good record (the
    last one before ``line`` whose chain verifies from the start); ``expected``
    and ``found`` detail a bad line; ``note`` says how a damaged previous journal
    was continued.
    """

    ok: bool
    records: int
    line: int | None = None
    reason: str = ""
    last_hash: str = ZERO_HASH
    next_seq: int = 0
    roots_checked: int = 0
    complete: bool = False
    expected: Any = None
    found: Any = None
    note: str = ""

    def message(self, path: str | os.PathLike[str]) -> str:
        """One line for a person: ``OK …`` or ``FAIL <file> line <n>: <what is wrong>``."""
        if self.ok:
            state = "ends with RUN_END" if self.complete else "no RUN_END: the run was interrupted or is still running"
            note = f"; {self.note}" if self.note else ""
            return f"OK {os.fspath(path)}: {self.records} records, {self.roots_checked} Merkle roots verified, {state}{note}"
        where = f" line {self.line}" if self.line is not None else ""
        return f"FAIL {os.fspath(path)}{where}: {self.reason}"


@dataclass(frozen=True)
class JournalDamage:
    """Where a journal a run continues is damaged, for its ``JOURNAL_DAMAGED`` event."""

    file: str
    line: int | None
    reason: str
    expected: str | None
    found: str | None
    good_records: int

    @classmethod
    def from_report(cls, path: str | os.PathLike[str], report: VerifyReport) -> "JournalDamage":
        """The damage a failed :func:`verify` report names (expected and found as text, for the journal)."""
        expected = None if report.expected is None else str(report.expected)
        found = None if report.found is None else str(report.found)
        return cls(os.fspath(path), report.line, report.reason, expected, found, report.records)

    def to_data(self, link: "ChainLink") -> dict[str, Any]:
        """``JOURNAL_DAMAGED`` data: the file, the first bad line, what is wrong and where the new chain starts."""
        return {
            "file": self.file,
            "line": self.line,
            "reason": self.reason,
            "expected": self.expected,
            "found": self.found,
            "last_good_line": self.good_records or None,
            "continues_from": {"hash": link.prev, "seq": link.seq},
        }

    def message(self) -> str:
        """One line for the log."""
        where = f"is damaged at line {self.line}" if self.line is not None else "cannot be read"
        start = f"its last good record (line {self.good_records})" if self.good_records else "a new chain (it has no good record)"
        return f"journal {self.file} {where}: {self.reason}; the new journal continues from {start}"


def last_link(path: str | os.PathLike[str]) -> ChainLink:
    """The link after the last good record of a journal; ``damage`` says what is wrong after it, if anything."""
    report = verify(path)
    damage = None if report.ok else JournalDamage.from_report(path, report)
    return ChainLink(report.last_hash, report.next_seq, damage)


def _fail(state: "_ScanState", line: int | None, what: str, expected: Any = None, found: Any = None) -> VerifyReport:
    reason = what + (f": expected {expected}, got {found}" if expected is not None or found is not None else "")
    return VerifyReport(False, state.count, line, reason, state.prev, state.next_seq, state.roots, expected=expected, found=found)


@dataclass
class _ScanState:
    prev: str
    next_seq: int
    count: int = 0
    roots: int = 0
    complete: bool = False


def _check_record(rec: Record, state: _ScanState, merkle: MerkleAccumulator, standalone: bool) -> VerifyReport | None:
    """Check one record against the chain so far and advance it; a report names what is wrong, None when good."""
    f, line_no = rec.fields, rec.line_no
    if line_no == 1:
        if f["event"] != "RUN_START":
            return _fail(state, 1, "wrong first event", "RUN_START", f["event"])
        if standalone:  # a standalone check accepts a continuation: the chain starts where the file says
            state.prev, state.next_seq = f["prev"], f["seq"]
    if f["seq"] != state.next_seq:
        return _fail(state, line_no, "broken chain: wrong seq", state.next_seq, f["seq"])
    if f["prev"] != state.prev:
        return _fail(state, line_no, "broken chain: prev is not the previous record's hash", state.prev, f["prev"])
    actual = chain_hash(state.prev, rec.body)
    if actual != rec.hash:
        return _fail(state, line_no, "hash does not match the record", actual, rec.hash)
    if f["event"] == "MERKLE_ROOT":
        data = f["data"]
        want = {"tree_size": merkle.size, "root": merkle.root()}
        got = {"tree_size": data.get("tree_size"), "root": data.get("root")}
        if got != want:
            return _fail(state, line_no, "bad Merkle root", want, got)
        state.roots += 1
    merkle.append(rec.body)
    state.prev, state.next_seq = rec.hash, f["seq"] + 1
    state.complete = f["event"] == "RUN_END"
    state.count += 1
    return None


def _scan(path: str | os.PathLike[str], start: ChainLink, standalone: bool) -> tuple[VerifyReport, list[dict[str, Any]]]:
    """Verify one file from ``start``; also returns the data of its ``JOURNAL_DAMAGED`` records."""
    state = _ScanState(start.prev, start.seq)
    merkle = MerkleAccumulator()
    damaged: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    rec = _split_line(raw)
                except _BadLine as bad:
                    return _fail(state, line_no, bad.what, bad.expected, bad.found), damaged
                bad_report = _check_record(Record(line_no, rec.body, rec.hash, rec.fields), state, merkle, standalone)
                if bad_report is not None:
                    return bad_report, damaged
                if rec.fields["event"] == "JOURNAL_DAMAGED":
                    damaged.append(rec.fields["data"])
    except OSError as exc:
        return VerifyReport(False, 0, None, f"cannot read the journal: {exc}"), damaged
    if state.count == 0:
        return _fail(state, 1, "journal is empty", "at least a RUN_START record", "no lines"), damaged
    return VerifyReport(True, state.count, None, "", state.prev, state.next_seq, state.roots, state.complete), damaged


def verify(path: str | os.PathLike[str], *, previous: str | os.PathLike[str] | None = None) -> VerifyReport:
    """Check a journal's chain, hashes, seq numbers, field types and Merkle roots.

    Parameters
    ----------
    path : path
        The journal to check.
    previous : path, optional
        The journal of the run this one resumed: its last good record must be the
        one the first record of ``path`` links to. When it is damaged, ``path``
        must also journal ``JOURNAL_DAMAGED`` naming the first bad line.

    Returns
    -------
    VerifyReport
        ``ok`` False names the first bad line (1-based) and what is wrong; never raises.
    """
    if previous is None:
        return _scan(path, ChainLink(), standalone=True)[0]
    before = verify(previous)
    if not before.ok and before.line is None:
        return VerifyReport(False, 0, None, f"previous journal {os.fspath(previous)} cannot be checked: {before.reason}")
    report, damaged = _scan(path, ChainLink(before.last_hash, before.next_seq), standalone=False)
    if before.ok:
        return report
    where = f"previous journal {os.fspath(previous)} is damaged at line {before.line} ({before.reason})"
    if not report.ok:
        good = f"its last good record (line {before.records})" if before.records else "a new chain (it has no good record)"
        return replace(report, reason=f"{report.reason}; {where}, so this journal must continue from {good}")
    if not any(d.get("line") == before.line for d in damaged):
        expected = f"a JOURNAL_DAMAGED event naming line {before.line}"
        return replace(report, ok=False, line=1, reason=f"{where} but this journal does not record it: expected {expected}, got none",
                       expected=expected, found="none", complete=False)
    note = f"{where}; continued from its last good record, as JOURNAL_DAMAGED records"
    return replace(report, note=note)
