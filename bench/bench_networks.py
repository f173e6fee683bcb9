"""The student's network, before vs after, at equal seconds: step time and validation quality (official metric).

Run: ``python bench/bench_networks.py [--seconds 90] [--before-rev 17d0dfd] [--arch plain resenc] [--seeds 0 1]``.
"after" is today's student (:func:`nx46vx.student.build_network`: nnU-Net v2's own
``PlainConvUNet`` / ``ResidualEncoderUNet`` from dynamic-network-architectures); "before" is the
``build_network`` of ``src/nx46vx/student.py`` at ``--before-rev`` (our hand-written U-Nets, read from
git, for this side-by-side only). Both train through :func:`nx46vx.distill.train_step` (Dice + BCE,
deep supervision where the network has it, the default augmentations) on the same 6 scroll-style
volumes of 80³, patch 48, batch 2, for the same wall seconds: four timed steps decide how many steps
fit (the learning-rate schedule is laid out over them, as the pipeline does). The hysteresis point is
chosen on 3 validation volumes and the score reported on 3 more (:func:`nx46vx.metric.score_volume`).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from nx46vx import distill
from nx46vx.config import DistillConfig, SegmentConfig
from nx46vx.metric import score_volume
from nx46vx.patches import TrainVolume, foreground_sample, make_batch
from nx46vx.segment import PostParams, normalised, postprocess, sliding_window
from nx46vx.student import build_network
from nx46vx.synthetic import make_volume

GRID = [PostParams(high=h, low=low, min_component=32) for h in (0.5, 0.6, 0.7, 0.8) for low in (0.3, 0.4, 0.5) if low <= h]
SETTINGS = {"plain": {"width": 16, "depth": 3, "blocks": (1,)}, "resenc": {"width": 16, "depth": 3, "blocks": (1, 3, 4, 6)}}
PATCH, BATCH = 48, 2


def before_module(rev: str) -> ModuleType:
    """``nx46vx/student.py`` as it was at ``rev``, imported as a module of its own."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:src/nx46vx/student.py"], cwd=root, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="nx46vx-before-")) / "student_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("student_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(network: torch.nn.Module, volumes: list[TrainVolume], config: DistillConfig, seconds: float) -> tuple[int, float]:
    """Train for about ``seconds``: four timed steps (after one untimed) fix the step count; returns (steps, seconds trained)."""
    state = distill.DistillState(network, torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay), None, schedule_steps=1000)

    def step() -> None:
        batch = make_batch(lambda i: volumes[i], len(volumes), state.step, seed=0, batch=BATCH, patch=PATCH, positive_fraction=0.5, augmentations=config.augment)
        distill.train_step(state, batch, config)

    step()  # the first step allocates: not timed
    start = time.perf_counter()
    for _ in range(4):
        step()
    per_step = (time.perf_counter() - start) / 4
    state.step, state.schedule_steps = 0, max(4, int(seconds / per_step))
    start = time.perf_counter()
    while state.step < state.schedule_steps:
        step()
    return state.step, time.perf_counter() - start


def scores(network: torch.nn.Module, val: list, test: list) -> tuple[float, float]:
    """Mean official score on ``val`` at its best hysteresis point, and on ``test`` at that point."""
    network.eval()
    with torch.no_grad():
        probs = [sliding_window(v.image, network, patch=PATCH, overlap=0.5) for v in val + test]
    cfg = SegmentConfig()

    def mean(indices: range, params: PostParams) -> float:
        return float(np.mean([score_volume(postprocess(probs[i], params, cfg)[0], (val + test)[i].label).score for i in indices]))

    best = max(GRID, key=lambda p: mean(range(len(val)), p))
    return mean(range(len(val)), best), mean(range(len(val), len(val) + len(test)), best)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=90.0, help="training wall seconds of each network")
    parser.add_argument("--before-rev", default="17d0dfd", help="the git revision whose student.py is 'before'")
    parser.add_argument("--arch", nargs="+", default=["plain", "resenc"], choices=sorted(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="torch seeds of the networks' initialisation")
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    made = [make_volume((80, 80, 80), rng, style="scroll") for _ in range(12)]
    training = [TrainVolume(normalised(v.image), v.label, foreground_sample(v.label, cap=20000, seed=0)) for v in made[:6]]
    val, test = made[6:9], made[9:]
    before = before_module(args.before_rev)
    print(f"{len(training)} training, {len(val)} validation, {len(test)} test volumes of 80³; patch {PATCH}, batch {BATCH}; "
          f"{args.seconds:.0f} s each; torch threads {torch.get_num_threads()}", flush=True)
    for arch in args.arch:
        config = replace(DistillConfig(), arch=arch, patch=PATCH, batch=BATCH, teachers=(), **SETTINGS[arch])
        rows: dict[str, list[tuple[float, float, float]]] = {"before": [], "after": []}
        for seed in args.seeds:
            for which, builder in (("before", before.build_network), ("after", build_network)):
                torch.manual_seed(seed)
                network = builder(arch, **SETTINGS[arch])
                steps, seconds = train(network, training, config, args.seconds)
                val_score, test_score = scores(network, val, test)
                rows[which].append((seconds / steps, val_score, test_score))
                print(f"{arch:>6} {which:>6} seed {seed}: {sum(p.numel() for p in network.parameters()) / 1e6:.2f} M parameters, {steps} steps in {seconds:.0f} s, "
                      f"{seconds / steps:.3f} s/step; validation {val_score:.4f}, test {test_score:.4f}", flush=True)
        mean = {which: np.mean(r, axis=0) for which, r in rows.items()}
        print(f"{arch:>6}: after/before step time {mean['after'][0] / mean['before'][0]:.2f}x; mean validation {mean['before'][1]:.4f} → {mean['after'][1]:.4f}, "
              f"test {mean['before'][2]:.4f} → {mean['after'][2]:.4f}", flush=True)


if __name__ == "__main__":
    main()
