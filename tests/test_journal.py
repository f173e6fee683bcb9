from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import orjson
import pytest

from nx46vx.cli import main
from nx46vx.errors import JournalError
from nx46vx.journal import ZERO_HASH, ChainLink, Journal, dumps, last_link, merkle_root, verify


def _reference_mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 MTH, written recursively from the RFC's definition."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _reference_mth(leaves[:k]) + _reference_mth(leaves[k:])).digest()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 31, 33])
def test_merkle_root_matches_rfc6962(n: int) -> None:
    leaves = [f"leaf-{i}".encode() for i in range(n)]
    assert merkle_root(leaves) == _reference_mth(leaves).hex()


def _write(path: Path, n: int = 12, link: ChainLink = ChainLink()) -> Journal:
    j = Journal(path, run_id="r1", link=link)
    j.record("RUN_START", "run", {"x": 1})
    for i in range(n):
        j.record("STEP", "test", {"i": i, "v": [0.5, 1.5]})
        if i % 4 == 3:
            j.merkle_root("test")
    j.record("RUN_END", "run", {})
    j.close()
    return j


def test_format_body_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    _write(path, 2)
    lines = path.read_bytes().splitlines()
    first = lines[0]
    body = first[: -len(',"hash":""}') - 64] + b"}"
    fields = orjson.loads(body)
    assert list(fields) == sorted(fields) == ["data", "event", "phase", "prev", "run_id", "seq", "ts_ns"]
    assert b" " not in body
    assert fields["prev"] == ZERO_HASH and fields["seq"] == 0
    expected = hashlib.sha256(b"\x00" + bytes.fromhex(ZERO_HASH) + body).hexdigest()
    assert first.endswith(f',"hash":"{expected}"}}'.encode())
    second = orjson.loads(lines[1])
    assert second["prev"] == expected and second["seq"] == 1


def test_merkle_event_covers_previous_records(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    _write(path, 4)
    lines = path.read_bytes().splitlines()
    bodies = [line[: -len(',"hash":""}') - 64] + b"}" for line in lines]
    idx = next(i for i, line in enumerate(lines) if b'"MERKLE_ROOT"' in line)
    data = orjson.loads(lines[idx])["data"]
    assert data == {"tree_size": idx, "root": _reference_mth(bodies[:idx]).hex()}


def test_good_journal_verifies(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    _write(path)
    report = verify(path)
    assert report.ok and report.records == 17 and report.roots_checked == 3 and report.complete
    assert main(["verify", str(path)]) == 0


def _tamper(lines: list[bytes], kind: str) -> tuple[list[bytes], int]:
    out = list(lines)
    if kind == "changed":
        assert b'"i":4' in out[6]
        out[6] = out[6].replace(b'"i":4', b'"i":5')
        return out, 7
    if kind == "deleted":
        del out[5]
        return out, 6
    if kind == "inserted":
        out.insert(5, out[4])
        return out, 6
    if kind == "reordered":
        out[5], out[6] = out[6], out[5]
        return out, 6
    if kind == "truncated":
        out[-1] = out[-1][:-10]
        return out, len(out)
    if kind == "first_deleted":
        return out[1:], 1
    if kind == "merkle_changed":
        i = next(i for i, line in enumerate(out) if b"MERKLE_ROOT" in line)
        out[i] = out[i].replace(b'"tree_size":', b'"tree_size":1')
        return out, i + 1
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["changed", "deleted", "inserted", "reordered", "truncated", "first_deleted", "merkle_changed"])
def test_tampering_is_detected_and_named(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "journal.jsonl"
    _write(path)
    lines, bad_line = _tamper(path.read_bytes().splitlines(keepends=True), kind)
    if kind == "truncated":
        lines[-1] = lines[-1].rstrip(b"\n")
    path.write_bytes(b"".join(lines))
    report = verify(path)
    assert not report.ok
    assert report.line == bad_line
    assert main(["verify", str(path)]) == 1
    assert f"line {bad_line}" in capsys.readouterr().out


def test_continuation_links_to_previous(tmp_path: Path) -> None:
    first = _write(tmp_path / "a.jsonl", 3)
    link = last_link(tmp_path / "a.jsonl")
    assert link == ChainLink(first.prev, first.seq)
    _write(tmp_path / "b.jsonl", 3, link=link)
    assert verify(tmp_path / "b.jsonl", previous=tmp_path / "a.jsonl").ok
    assert main(["verify", str(tmp_path / "b.jsonl"), "--previous", str(tmp_path / "a.jsonl")]) == 0
    # a journal that does not continue the given previous one fails on its first line
    _write(tmp_path / "c.jsonl", 3)
    report = verify(tmp_path / "c.jsonl", previous=tmp_path / "a.jsonl")
    assert not report.ok and report.line == 1


def test_never_appends_to_an_existing_journal(tmp_path: Path) -> None:
    _write(tmp_path / "j.jsonl", 1)
    with pytest.raises(JournalError, match="already exists"):
        Journal(tmp_path / "j.jsonl", run_id="x")


def test_each_event_reaches_the_os_before_return(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.jsonl", run_id="x")
    j.record("RUN_START", "run", {})
    j.record("E", "p", {"k": 1})
    # read through a separate handle while the writer is still open (no flush, no close)
    assert (tmp_path / "j.jsonl").read_bytes().count(b"\n") == 2
    j.close()


def test_non_string_keys_serialise_like_string_keys() -> None:
    # the fast path refuses them; the fallback must give the same canonical bytes
    assert dumps({"b": {2: "x", "1": [np.float32(0.5)]}, "a": 1}) == b'{"a":1,"b":{"1":[0.5],"2":"x"}}'
