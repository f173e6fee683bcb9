"""Our pipeline vs a plain 3-D U-Net at equal wall time, on the official metric, on data unlike ours (issue #28).

Run: ``python bench/bench_reference_unet.py [--seconds 160] [--profile demo] [--seeds 0 1] [--train 10] [--test 8]``.

Per seed, a competition-layout dataset of ``real``-style volumes (:mod:`nx46vx.synthetic`: windings at
every orientation, a scanner look per scroll, label 2 over ~70 % and a 3-voxel border, 96³ and 80³ mixed)
whose test volumes are all of a scroll that never trains. Both sides get the same data and cores:

- ours: ``nx46vx run --profile PROFILE --set budget.total_s=SECONDS`` (everything: features, search,
  student, segmentation, packaging), its ``submission.zip`` scored;
- the reference, what a competitor writes in an afternoon: nnU-Net's PlainConvUNet (width 16, 4 stages),
  z-score input, random 48³ crops (half centred on a surface voxel), random flips, BCE + Dice with label 2
  masked, AdamW 1e-3, batch 2, trained for SECONDS of wall time; sliding window (overlap 0.5), threshold 0.5,
  components under ``--min-component`` voxels removed.

Scores are the official metric (:func:`nx46vx.metric.score_volume`) per held-out volume, averaged; the
reference's training seconds exclude its inference, ours include everything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nx46vx.metric import score_volume
from nx46vx.scoring import score_submission
from nx46vx.segment import Intensity, normalised, remove_small_components, sliding_window
from nx46vx.student import build_network, label_losses
from nx46vx.synthetic import make_competition
from nx46vx.volumes import read_volume

PATCH, BATCH = 48, 2
ZSCORE = Intensity("ZScoreNormalization")


def dataset(root: Path, *, seed: int, train: int, test: int) -> Path:
    return make_competition(root, n_train=train, n_test=test, shapes=((96, 96, 96), (80, 80, 80)), seed=seed, style="real", unseen_test_scroll=True)


def _crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random ``PATCH``³ crop, centred on a surface voxel half of the time, randomly flipped on every axis."""
    surface = np.argwhere(label == 1)
    if surface.size and rng.random() < 0.5:
        centre = surface[rng.integers(len(surface))]
        start = [int(np.clip(c - PATCH // 2, 0, s - PATCH)) for c, s in zip(centre, image.shape)]
    else:
        start = [int(rng.integers(0, s - PATCH + 1)) for s in image.shape]
    box = tuple(slice(a, a + PATCH) for a in start)
    x, y = image[box], label[box]
    for axis in range(3):
        if rng.random() < 0.5:
            x, y = np.flip(x, axis), np.flip(y, axis)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def reference(data: Path, *, seconds: float, seed: int, min_component: int) -> tuple[list[float], int]:
    """Train the reference U-Net for ``seconds`` on ``data``'s training volumes; its scores on the test volumes and its step count."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    volumes = [(normalised(read_volume(p), intensity=ZSCORE), read_volume(data / "train_labels" / p.name)) for p in sorted((data / "train_images").glob("*.tif"))]
    network = build_network("plain", width=16, depth=3, blocks=(1,))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-4)
    steps, start = 0, time.perf_counter()
    network.train()
    while time.perf_counter() - start < seconds:
        crops = [_crop(*volumes[int(rng.integers(len(volumes)))], rng) for _ in range(BATCH)]
        x = torch.from_numpy(np.stack([c[0] for c in crops])[:, None])
        y = torch.from_numpy(np.stack([c[1] for c in crops])[:, None])
        losses = label_losses(network(x), y)
        optimizer.zero_grad()
        (losses["dice"] + losses["bce"]).backward()
        optimizer.step()
        steps += 1
    network.eval()
    scores = []
    for path in sorted((data / "test_images").glob("*.tif")):
        with torch.no_grad():
            prob = sliding_window(read_volume(path), network, patch=PATCH, overlap=0.5, intensity=ZSCORE)
        mask = remove_small_components(prob > 0.5, min_component)
        scores.append(score_volume(mask, read_volume(data / "test_labels" / path.name)).score)
    return scores, steps


def ours(data: Path, out: Path, *, profile: str, seconds: float, seed: int, extra: list[str]) -> tuple[list[float], float, dict]:
    """``nx46vx run`` on ``data`` for ``seconds``: its per-volume test scores, wall seconds and segmenter choice."""
    settings = [f"budget.total_s={seconds}", f"seed={seed}", *extra]
    command = [sys.executable, "-m", "nx46vx.cli", "run", "--input", str(data), "--output", str(out), "--profile", profile]
    start = time.perf_counter()
    subprocess.run(command + [arg for s in settings for arg in ("--set", s)], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    report = score_submission(data / "test_labels", out / "submission.zip")
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    choice = next((e["data"] for e in journal if e["event"] == "SEGMENTER_CHOICE"), {})
    return [v["score"] for k, v in report.items() if k != "mean"], wall, choice


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=160.0, help="wall seconds of both sides (the demo profile's budget)")
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train", type=int, default=10, help="training volumes")
    parser.add_argument("--test", type=int, default=8, help="held-out test volumes (all of a scroll that never trains)")
    parser.add_argument("--min-component", type=int, default=64, help="the reference's smallest kept component, voxels")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="an extra setting of our run")
    args = parser.parse_args()
    print(f"{args.train} training and {args.test} test volumes (real style, unseen test scroll), {args.seconds:.0f} s each side, "
          f"profile {args.profile}, torch threads {torch.get_num_threads()}", flush=True)
    rows = []
    for seed in args.seeds:
        work = Path(tempfile.mkdtemp(prefix=f"nx46vx-reference-{seed}-"))
        data = dataset(work / "data", seed=seed, train=args.train, test=args.test)
        ours_scores, wall, choice = ours(data, work / "out", profile=args.profile, seconds=args.seconds, seed=seed, extra=args.set)
        ref_scores, steps = reference(data, seconds=args.seconds, seed=seed, min_component=args.min_component)
        rows.append((np.mean(ours_scores), np.mean(ref_scores)))
        print(f"seed {seed}: ours {rows[-1][0]:.4f} ({wall:.0f} s wall, segmenter {choice.get('chosen')}, excluded for time {choice.get('excluded_for_time')}, "
              f"validation {choice.get('validation_scores')}); reference U-Net {rows[-1][1]:.4f} ({steps} steps)", flush=True)
    mean = np.mean(rows, axis=0)
    print(f"mean over {len(rows)} seeds: ours {mean[0]:.4f}, reference {mean[1]:.4f}, ours − reference {mean[0] - mean[1]:+.4f}", flush=True)


if __name__ == "__main__":
    main()
