"""Experiment for issue #12: a student fed the search ensemble's probability (a residual on its logit) vs the ensemble vs an image-only student.

Run: ``python bench/bench_cascade.py [--seconds 90] [--seed 1] [--workdir DIR]``. It writes scroll-style data
(6 training + 2 test volumes of 80³, :func:`nx46vx.synthetic.make_competition`), runs the demo profile without
distillation to get the candidate search, then trains two plain U-Nets (width 16, depth 3, patch 48, batch 2,
Dice + BCE, flips and rot90) for the same number of seconds on the run's training volumes:

* **cascade** — input (image, ensemble probability), output ``net(...) + logit(p_ensemble)`` with the last
  layer zero-initialised, so it starts as the ensemble and learns a correction (nnU-Net's cascade feeds the
  previous stage's output the same way; in the pipeline as ``distill.teacher_input``,
  :class:`nx46vx.student.PriorResidual`);
* **image only** — today's student without a teacher.

Each source gets the best hysteresis point of a small grid on the run's validation volumes (by the competition
metric); its validation and test scores are printed, with smoothed Otsu on the test volumes for reference.
Not part of the pipeline: the measurement behind the next step of #12.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import nx46vx
from nx46vx import checkpoint as ckpt
from nx46vx.config import FeatureConfig, SegmentConfig
from nx46vx.distill import network_input
from nx46vx.metric import score_volume
from nx46vx.patches import TrainVolume, foreground_sample, make_batch
from nx46vx.segment import PostParams, intensity_baseline, normalised, postprocess, probability, sliding_window
from nx46vx.student import build_network, label_losses
from nx46vx.synthetic import make_competition
from nx46vx.volumes import read_volume

GRID = [PostParams(high=h, low=low, min_component=32) for h in (0.6, 0.7, 0.8) for low in (0.3, 0.4, 0.5, 0.6) if low <= h]


def train(model: nn.Module, volumes: list[TrainVolume], seconds: float, *, prior: bool) -> int:
    """AdamW steps on seeded batches until ``seconds`` have passed; returns the step count."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start, step = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        batch = make_batch(lambda i: volumes[i], len(volumes), step, seed=0, batch=2, patch=48, positive_fraction=0.5, augmentations=("flip", "rot90"), prior=prior)
        model.train()
        optimiser.zero_grad()
        terms = label_losses(model(network_input(batch)), batch["label"])
        (terms["dice"] + terms["bce"]).backward()
        optimiser.step()
        step += 1
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=90.0, help="training time of each student")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated data")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nx46vx-cascade-"))
    data = make_competition(work / "data", n_train=6, n_test=2, shapes=[(80, 80, 80)], seed=args.seed, style="scroll")
    out = work / "out"
    print(f"data in {data}; running the demo profile without distillation for the search …", flush=True)
    nx46vx.run([data], output=out, profile="demo", overrides=["distill.enabled=false"], resume="never")
    search = ckpt.load_payload(ckpt.latest_committed(out / "checkpoints"), "search")
    top = sorted(search["epoch_results"], key=lambda r: (-r["val_f1"], r["candidate"]))[:5]
    thetas = search["theta"][[int(r["candidate"]) for r in top]].numpy()
    mean, std = np.asarray(search["standardiser"]["mean"]), np.asarray(search["standardiser"]["std"])
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    discovery = next(e["data"] for e in journal if e["event"] == "DATASET_DISCOVERY")
    val_ids, test_ids = list(discovery["split"]["val_ids"]), list(discovery["test_ids"])
    train_ids = sorted(p.stem for p in (data / "train_images").glob("*.tif") if p.stem not in val_ids)

    def load(split: str, vid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = read_volume(data / f"{split}_images" / f"{vid}.tif")
        return image, read_volume(data / f"{split}_labels" / f"{vid}.tif"), probability(image, thetas, mean, std, FeatureConfig())

    volumes = {v: load("train", v) for v in train_ids + val_ids} | {v: load("test", v) for v in test_ids}
    training = [TrainVolume(normalised(volumes[v][0]), volumes[v][1], foreground_sample(volumes[v][1], cap=20000, seed=0), volumes[v][2], volumes[v][2]) for v in train_ids]
    cfg = SegmentConfig()

    def scores(probs: dict[str, np.ndarray]) -> tuple[float, float]:
        mean_score = lambda ids, pp: float(np.mean([score_volume(postprocess(probs[v], pp, cfg)[0], volumes[v][1]).score for v in ids]))  # noqa: E731
        best = max(GRID, key=lambda pp: mean_score(val_ids, pp))
        return round(mean_score(val_ids, best), 4), round(mean_score(test_ids, best), 4)

    results = {"ensemble": scores({v: volumes[v][2] for v in val_ids + test_ids})}
    for name, prior in (("cascade", True), ("image only", False)):
        torch.manual_seed(0)
        model = build_network("plain", width=16, depth=3, blocks=(1,), prior=prior)
        steps = train(model, training, args.seconds, prior=prior)
        model.eval()
        with torch.no_grad():
            probs = {v: sliding_window(volumes[v][0], model, patch=max(volumes[v][0].shape), overlap=0.0, prior=volumes[v][2] if prior else None) for v in val_ids + test_ids}
        results[f"{name} ({steps} steps)"] = scores(probs)
    otsu = float(np.mean([score_volume(intensity_baseline(volumes[v][0], cfg), volumes[v][1]).score for v in test_ids]))
    print(f"{len(train_ids)} training, {len(val_ids)} validation, {len(test_ids)} test volumes; {args.seconds:.0f} s of training per student")
    for name, (val, test) in results.items():
        print(f"{name:>28}: validation {val:.4f}, test {test:.4f}")
    print(f"{'smoothed Otsu':>28}: test {otsu:.4f}")


if __name__ == "__main__":
    main()
