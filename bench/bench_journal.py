"""Journal cost: chained, hashed, Merkle-tracked writes vs plain orjson line writes, and its share of a demo run.

Run: ``python bench/bench_journal.py [--events 200000]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import orjson

import nx46vx
from nx46vx.journal import Journal
from nx46vx.synthetic import make_competition

PAYLOAD = {"epoch": 3, "candidate": 0, "batch_size": 135, "iter": 57, "objective": [0.1234567 + i * 1e-6 for i in range(8)]}


def bench_journal(folder: Path, n: int) -> float:
    journal = Journal(folder / "journal.jsonl", run_id="bench")
    journal.record("RUN_START", "bench", {})
    t0 = time.perf_counter()
    for _ in range(n):
        journal.record("FIT_ITER", "search", PAYLOAD)
    seconds = time.perf_counter() - t0
    journal.close()
    return n / seconds


def bench_plain(folder: Path, n: int) -> float:
    fd = os.open(folder / "plain.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    t0 = time.perf_counter()
    for seq in range(n):
        os.write(fd, orjson.dumps({"event": "FIT_ITER", "seq": seq, "data": PAYLOAD}) + b"\n")
    seconds = time.perf_counter() - t0
    os.close(fd)
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plain = bench_plain(folder, args.events)
        chained = bench_journal(folder, args.events)
        print(f"plain orjson line writes : {plain:,.0f} events/s")
        print(f"journal (chain+write)    : {chained:,.0f} events/s ({1e6 / chained:.2f} us/event)")
        print(f"journal vs plain         : {chained / plain:.2f}x the plain rate ({plain / chained:.2f}x slower)")
        data = make_competition(folder / "data", seed=0)
        result = nx46vx.run([data], output=folder / "out", profile="demo")
        profile = orjson.loads((folder / "out" / "RUN_PROFILE_SUMMARY.json").read_bytes())
        share = profile["journal_s"] / profile["wall_s"]
        print(f"demo run: {profile['journal_events']} events, journal {profile['journal_s']:.3f} s of {profile['wall_s']:.2f} s wall "
              f"= {100 * share:.2f} % (status {result.status})")


if __name__ == "__main__":
    main()
