"""The output folder after a ``kaggle-train`` run with a ResEnc student: bytes by part, and what a checkpoint write costs.

Run: ``python bench/bench_output.py [--budget 240] [--volumes 8] [--size 96]``. It generates
competition-layout data, runs ``kaggle-train`` under the budget with ``distill.arch=resenc``,
then prints, from that one run:

* bytes of ``checkpoints/``, ``results.zip``, ``cache/`` and the whole folder, beside what
  ``results.zip`` would hold if it copied every kept checkpoint (the previous layout);
* per checkpoint write, the seconds and new bytes the journal recorded, beside the seconds
  that hashing every kept checkpoint (what pruning did at every write) takes on this disk now.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zipfile
from pathlib import Path

import orjson

import nx46vx
from nx46vx import checkpoint as ckpt
from nx46vx.runner.quota import folder_bytes
from nx46vx.synthetic import make_competition


def mib(n: float) -> str:
    return f"{n / 2**20:9.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=240.0)
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--patch", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_competition(Path(tmp) / "data", n_train=args.volumes, n_test=2, shapes=[(args.size,) * 3], seed=4, style="scroll")
        out = Path(tmp) / "out"
        overrides = [f"budget.total_s={args.budget}", "budget.margin_s=10", "distill.arch=resenc", f"distill.patch={args.patch}", "distill.checkpoint_every=10"]
        t0 = time.perf_counter()
        result = nx46vx.run([data], output=out, profile="kaggle-train", overrides=overrides)
        wall = time.perf_counter() - t0
        events = [orjson.loads(line) for line in (out / "journal.jsonl").read_bytes().splitlines()]
        kept = ckpt.list_checkpoints(out / "checkpoints")
        with zipfile.ZipFile(out / "results.zip") as zf:
            zipped = sorted({n.split("/")[1] for n in zf.namelist() if n.startswith("checkpoints/")})
        archive = (out / "results.zip").stat().st_size
        previous_layout = archive + sum(folder_bytes(p) for p in kept[:-1])  # every kept checkpoint copied in
        print(f"kaggle-train, ResEnc student, {args.volumes} x {args.size}^3 + 2 test, budget {args.budget:.0f} s: wall {wall:.1f} s, "
              f"status {result.status}, segmenter {result.segmenter}, student steps {next((e['data']['steps'] for e in events if e['event'] == 'DISTILLATION_END'), 0)}")
        print(f"checkpoints/ ({len(kept)} kept) {mib(folder_bytes(out / 'checkpoints'))}   newest {mib(folder_bytes(kept[-1]))}")
        print(f"results.zip (holds {zipped})   {mib(archive)}   with every kept checkpoint (previous layout) {mib(previous_layout)}")
        print(f"cache/ {mib(folder_bytes(out / 'cache'))}   whole folder {mib(folder_bytes(out))}   "
              f"without results.zip {mib(folder_bytes(out) - archive)}")
        writes = [e["data"] for e in events if e["event"] == "CHECKPOINT_WRITTEN"]
        seconds = sorted(w["seconds"] for w in writes)
        t0 = time.perf_counter()
        for path in kept:
            ckpt.check_integrity(path)
        hashing = time.perf_counter() - t0
        print(f"{len(writes)} checkpoint writes: median {seconds[len(seconds) // 2]:.3f} s, max {seconds[-1]:.3f} s; "
              f"hashing the {len(kept)} kept checkpoints once (per write before) {hashing:.3f} s")


if __name__ == "__main__":
    main()
