"""Does a run end inside its budget? Wall seconds of ``nx46vx run`` against ``budget.total_s``, with a valid submission.

Run: ``python bench/bench_budget.py [--case all|kaggle-train|demo]``. Two cases, each in a fresh
process (as a user runs the CLI, imports included):

* ``kaggle-train``: ``--profile kaggle-train --set budget.total_s=30`` on 40 training volumes of 128³ + 3 test;
* ``demo``: ``--profile demo --set budget.total_s=25`` on 6 + 2 volumes of 80³.

Each prints the process's wall seconds, the journal's span (the governor's part), their ratio to
the budget, how the time went by phase, the segmenter chosen, whether the student trained or was
skipped for time, and the official metric's mean on the hidden test labels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import tifffile

from nx46vx.package import validate_submission
from nx46vx.synthetic import make_competition

CASES = {
    "kaggle-train": {"profile": "kaggle-train", "budget": 30.0, "n_train": 40, "n_test": 3, "size": 128, "seed": 3},
    "demo": {"profile": "demo", "budget": 25.0, "n_train": 6, "n_test": 2, "size": 80, "seed": 1},
}


def run_case(name: str, folder: Path) -> None:
    case = CASES[name]
    data = make_competition(folder / f"{name}-data", n_train=case["n_train"], n_test=case["n_test"], shapes=[(case["size"],) * 3], seed=case["seed"])
    out = folder / f"{name}-out"
    command = [sys.executable, "-m", "nx46vx.cli", "run", "--input", str(data), "--output", str(out), "--profile", case["profile"],
               "--set", f"budget.total_s={case['budget']}"]
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    events = [orjson.loads(line) for line in (out / "journal.jsonl").read_bytes().splitlines()]
    span = (events[-1]["ts_ns"] - events[0]["ts_ns"]) / 1e9
    phases = {e["phase"]: e["data"]["seconds"] for e in events if e["event"] == "PHASE_END"}
    student = next((f"skipped ({e['data']['reason']})" for e in events if e["event"] == "DISTILLATION_SKIPPED"), None) \
        or next((f"{e['data']['steps']} steps" for e in events if e["event"] == "DISTILLATION_END"), "not run")
    result = json.loads(proc.stdout)
    shapes = {p.stem: tifffile.imread(p).shape for p in (data / "test_images").glob("*.tif")}
    validate_submission(out / "submission.zip", shapes)
    score = subprocess.run([sys.executable, "-m", "nx46vx.cli", "score", "--truth", str(data / "test_labels"), "--pred", str(out / "submission.zip")],
                           capture_output=True, text=True, check=True)
    mean = json.loads(score.stdout)["mean"]
    budget = case["budget"]
    print(f"{name}: budget {budget:.0f} s | wall {wall:.1f} s ({wall / budget:.2f}x) | journal {span:.1f} s ({span / budget:.2f}x) | "
          f"segmenter {result['segmenter']} | student {student} | test score {mean:.3f} | valid submission")
    print("   phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=["all", *CASES], default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES if args.case == "all" else [args.case]:
            run_case(name, Path(tmp))


if __name__ == "__main__":
    main()
