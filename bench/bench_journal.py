"""Journal cost: chained, hashed, Merkle-tracked writes vs plain orjson line writes, and its share of a demo run.

Run: ``python bench/bench_journal.py [--events 200000] [--rounds 20] [--no-demo]``. Plain writes and journal
records alternate in blocks; the ratio printed is the median of the per-block ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import orjson

import nx46vx
from nx46vx.journal import Journal
from nx46vx.synthetic import make_competition

PAYLOAD = {"epoch": 3, "candidate": 0, "batch_size": 135, "iter": 57, "objective": [0.1234567 + i * 1e-6 for i in range(8)]}


def time_journal(journal: Journal, n: int) -> float:
    """Seconds for ``n`` chained, hashed, Merkle-tracked events."""
    t0 = time.perf_counter()
    for _ in range(n):
        journal.record("FIT_ITER", "search", PAYLOAD)
    return time.perf_counter() - t0


def time_plain(fd: int, n: int, first_seq: int) -> float:
    """Seconds for ``n`` plain orjson line writes of the same payload."""
    t0 = time.perf_counter()
    for seq in range(first_seq, first_seq + n):
        os.write(fd, orjson.dumps({"event": "FIT_ITER", "seq": seq, "data": PAYLOAD}) + b"\n")
    return time.perf_counter() - t0


def side_by_side(folder: Path, n: int, rounds: int) -> tuple[list[float], list[float]]:
    """Per-round seconds per event of plain writes and of the journal, alternating in blocks of ``n // rounds``.

    Alternating keeps a slow minute of this shared machine from landing on one side only.
    """
    journal = Journal(folder / "journal.jsonl", run_id="bench")
    journal.record("RUN_START", "bench", {})
    fd = os.open(folder / "plain.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    block = max(1, n // rounds)
    plain, chained = [], []
    for r in range(rounds):
        plain.append(time_plain(fd, block, r * block) / block)
        chained.append(time_journal(journal, block) / block)
    os.close(fd)
    journal.close()
    return plain, chained


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=20, help="alternating blocks of plain and journal writes")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo run (its journal share)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plain, chained = side_by_side(folder, args.events, args.rounds)
        ratios = sorted(c / p for c, p in zip(chained, plain))
        median = statistics.median(ratios)
        print(f"plain orjson line writes : {1e6 * statistics.median(plain):.2f} us/event (median of {args.rounds} blocks)")
        print(f"journal (chain+write)    : {1e6 * statistics.median(chained):.2f} us/event (median of {args.rounds} blocks)")
        print(f"per-block ratios         : min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x")
        print(f"journal vs plain         : {median:.2f}x slower per event (median of the per-block ratios)")
        if args.no_demo:
            return
        data = make_competition(folder / "data", seed=0)
        result = nx46vx.run([data], output=folder / "out", profile="demo")
        profile = orjson.loads((folder / "out" / "RUN_PROFILE_SUMMARY.json").read_bytes())
        share = profile["journal_s"] / profile["wall_s"]
        print(f"demo run: {profile['journal_events']} events, journal {profile['journal_s']:.3f} s of {profile['wall_s']:.2f} s wall "
              f"= {100 * share:.2f} % (status {result.status})")


if __name__ == "__main__":
    main()
