from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import orjson
import pytest

from nx46vx.cli import main
from nx46vx.errors import JournalError
from nx46vx.journal import ZERO_HASH, ChainLink, Journal, dumps, last_link, merkle_root, parse_line, verify

from .conftest import FAST, events


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


# ----------------------------------------------------------------------------- damage is named (issue #13)


def _damage(lines: list[bytes], kind: str) -> tuple[list[bytes], int, str]:
    """Damage a journal written by :func:`_write`; returns the lines, the first bad line and a word its message holds."""
    out = list(lines)
    sub = lambda i, pattern, repl: re.sub(pattern, repl, out[i - 1], count=1)  # noqa: E731  (1-based line)
    if kind == "truncated_last_line":
        out[-1] = out[-1][:-10]
        return out, len(out), "newline"
    if kind == "tampered_middle_line":
        out[6] = out[6].replace(b'"i":4', b'"i":5')
        return out, 7, "hash"
    if kind == "non_hex_prev":
        out[6] = sub(7, rb'"prev":"[0-9a-f]{64}"', b'"prev":"' + b"z" * 64 + b'"')
        return out, 7, "64 lowercase hex digits"
    if kind == "non_hex_prev_first_line":
        out[0] = sub(1, rb'"prev":"[0-9a-f]{64}"', b'"prev":"not hex"')
        return out, 1, "64 lowercase hex digits"
    if kind == "string_seq":
        out[6] = sub(7, rb'"seq":6', b'"seq":"6"')
        return out, 7, "an integer >= 0"
    if kind == "string_seq_first_line":
        out[0] = sub(1, rb'"seq":0', b'"seq":"0"')
        return out, 1, "an integer >= 0"
    if kind == "bad_json":
        out[4] = out[4].replace(b'"event":', b'"event"', 1)
        return out, 5, "not JSON"
    if kind == "missing_key":
        out[2] = out[2].replace(b'"phase":"test",', b"", 1)
        return out, 3, "wrong fields"
    if kind == "non_hex_hash":
        out[3] = re.sub(rb'"hash":"[0-9a-f]{64}"', b'"hash":"' + b"G" * 64 + b'"', out[3])
        return out, 4, "'hash'"
    if kind == "data_not_object":
        out[2] = re.sub(rb'"data":\{[^}]*\}', b'"data":[1]', out[2], count=1)
        return out, 3, "'data'"
    if kind == "broken_link":  # a well-formed prev that is not the previous record's hash
        out[8] = sub(9, rb'"prev":"[0-9a-f]{64}"', b'"prev":"' + b"a" * 64 + b'"')
        return out, 9, "broken chain: prev"
    if kind == "bad_merkle_root":
        i = next(i for i, line in enumerate(out) if b"MERKLE_ROOT" in line)
        out[i] = re.sub(rb'"root":"[0-9a-f]{64}"', b'"root":"' + b"0" * 64 + b'"', out[i])
        return _rechain(out, i), i + 1, "bad Merkle root"
    if kind == "empty":
        return [], 1, "empty"
    raise AssertionError(kind)


def _rechain(lines: list[bytes], start: int) -> list[bytes]:
    """Recompute ``prev`` and ``hash`` from line index ``start`` on, as a forger would (only the Merkle roots then tell)."""
    out = list(lines[:start])
    prev = orjson.loads(out[-1])["hash"]
    for line in lines[start:]:
        body = re.sub(rb'"prev":"[0-9a-f]{64}"', f'"prev":"{prev}"'.encode(), line[: -len(',"hash":""}\n') - 64] + b"}", count=1)
        prev = hashlib.sha256(b"\x00" + bytes.fromhex(prev) + body).hexdigest()
        out.append(body[:-1] + f',"hash":"{prev}"}}\n'.encode())
    return out


DAMAGE = ["truncated_last_line", "tampered_middle_line", "non_hex_prev", "non_hex_prev_first_line", "string_seq", "string_seq_first_line",
          "bad_json", "missing_key", "non_hex_hash", "data_not_object", "broken_link", "bad_merkle_root", "empty"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_names_every_damage_without_a_traceback(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "journal.jsonl"
    _write(path)
    lines, bad_line, word = _damage(path.read_bytes().splitlines(keepends=True), kind)
    path.write_bytes(b"".join(lines))
    report = verify(path)
    assert not report.ok and report.line == bad_line and word in report.reason
    assert report.records == bad_line - 1  # the good records before it
    assert main(["verify", str(path)]) == 1
    captured = capsys.readouterr()
    assert f"FAIL {path} line {bad_line}: " in captured.out and word in captured.out
    assert "Traceback" not in captured.out + captured.err
    if bad_line > 1:  # a continuation checked against it names the damage and where it must link
        assert main(["verify", str(path), "--previous", str(path)]) == 1
        assert f"damaged at line {bad_line}" in capsys.readouterr().out


def test_parse_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    _write(path, 2)
    lines, _, _ = _damage(path.read_bytes().splitlines(keepends=True), "string_seq_first_line")
    with pytest.raises(JournalError, match=r"line 3: field 'seq'.*expected an integer >= 0, got str '0'"):
        parse_line(lines[0], 3)


def _continue(previous: Path, path: Path, *, record_damage: bool = True) -> ChainLink:
    """A continuation of ``previous`` as a run writes it: linked to its last good record, damage journaled."""
    link = last_link(previous)
    j = Journal(path, run_id="r2", link=link)
    j.record("RUN_START", "run", {})
    if record_damage and link.damage is not None:
        j.record("JOURNAL_DAMAGED", "run", link.damage.to_data(link))
    j.record("RUN_END", "run", {})
    j.close()
    return link


@pytest.mark.parametrize("kind", ["truncated_last_line", "tampered_middle_line", "non_hex_prev", "string_seq"])
def test_continuation_of_a_damaged_journal_starts_at_its_last_good_record(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(a)
    good = a.read_bytes().splitlines(keepends=True)
    lines, bad_line, _ = _damage(good, kind)
    a.write_bytes(b"".join(lines))
    link = _continue(a, b)
    last_good = orjson.loads(good[bad_line - 2])
    assert (link.prev, link.seq) == (last_good["hash"], last_good["seq"] + 1)
    assert link.damage is not None and link.damage.line == bad_line and link.damage.file == str(a)
    data = [e["data"] for e in map(orjson.loads, b.read_bytes().splitlines()) if e["event"] == "JOURNAL_DAMAGED"]
    assert data and data[0]["line"] == bad_line and data[0]["last_good_line"] == bad_line - 1 and data[0]["expected"] is not None
    report = verify(b, previous=a)
    assert report.ok and f"damaged at line {bad_line}" in report.message(b)
    assert main(["verify", str(b), "--previous", str(a)]) == 0
    assert f"damaged at line {bad_line}" in capsys.readouterr().out
    # the same link without JOURNAL_DAMAGED is a silent fork: refused, and named
    _continue(a, tmp_path / "c.jsonl", record_damage=False)
    report = verify(tmp_path / "c.jsonl", previous=a)
    assert not report.ok and f"JOURNAL_DAMAGED event naming line {bad_line}" in report.reason


def test_intact_journal_links_without_damage(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", 3)
    assert last_link(tmp_path / "a.jsonl").damage is None
    assert verify(tmp_path / "missing.jsonl").message(tmp_path / "missing.jsonl").startswith(f"FAIL {tmp_path / 'missing.jsonl'}: cannot read")


def test_a_bad_link_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="cannot continue a chain"):
        Journal(tmp_path / "j.jsonl", run_id="x", link=ChainLink("zz" * 32, 3))
    with pytest.raises(JournalError, match="cannot continue a chain"):
        Journal(tmp_path / "j.jsonl", run_id="x", link=ChainLink(ZERO_HASH, "3"))  # type: ignore[arg-type]
    assert not (tmp_path / "j.jsonl").exists()


# A run that is done in well under a second: one training volume, so no search and no distillation.
TINY = FAST + ["data.max_train_volumes=1"]


@pytest.mark.parametrize("damage", ["torn_last_line", "tampered_middle_line"])
@pytest.mark.parametrize("attach", [False, True], ids=["same_output", "attached_output"])
def test_resume_from_a_damaged_journal_names_the_damage(demo_data: Path, tmp_path: Path, attach: bool, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    import nx46vx

    first = tmp_path / "first"
    assert nx46vx.run([demo_data], output=first, profile="demo", overrides=TINY).status == "complete"
    journal = first / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    if damage == "torn_last_line":
        bad_line, reason, expected = len(lines), "truncated", "a line ending in a newline"
        lines[-1] = lines[-1][:-20]
    else:
        bad_line, reason, expected = len(lines) // 2, "hash does not match", None
        lines[bad_line - 1] = re.sub(rb'"ts_ns":(\d)', lambda m: b'"ts_ns":' + (b"2" if m[1] == b"1" else b"1"), lines[bad_line - 1])
    journal.write_bytes(b"".join(lines))
    second = tmp_path / "second" if attach else first
    with caplog.at_level(logging.WARNING, logger="nx46vx"):
        result = nx46vx.run([demo_data] + ([first] if attach else []), output=second, profile="demo", overrides=TINY)
    assert result.status == "complete" and result.resumed_from is not None
    previous = journal if attach else sorted((first / "journals").glob("journal-*.jsonl"))[-1]
    assert any(f"is damaged at line {bad_line}" in r.getMessage() for r in caplog.records)
    recorded = [e for e in events(second / "journal.jsonl") if e["event"] == "JOURNAL_DAMAGED"]
    assert len(recorded) == 1
    data = recorded[0]["data"]
    assert data["file"] == str(previous) and data["line"] == bad_line and data["last_good_line"] == bad_line - 1
    assert reason in data["reason"] and data["expected"] is not None and (expected is None or data["expected"] == expected)
    assert verify(second / "journal.jsonl", previous=previous).ok
    assert main(["verify", str(second / "journal.jsonl"), "--previous", str(previous)]) == 0
