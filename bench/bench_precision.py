"""The student in float32 vs in ``distill.precision = "auto"``, side by side on this machine: a training step and a window.

Run: ``python bench/bench_precision.py [--profile demo] [--rounds 3] [--steps 8]``. The student is the profile's,
resolved for the device (:func:`nx46vx.distill.resolve`); both sides train the same seeded network on the same
augmented batches (:func:`nx46vx.distill.train_step`) and predict the same synthetic volume in one window of the
student's inference size (:func:`nx46vx.segment.sliding_window`), alternating round by round so that a slow spell of
the machine hits both. "auto" is float16 on a GPU, bfloat16 on a CPU that computes it natively (AVX-512 BF16 or AMX),
float32 otherwise (then the ratio is 1 by construction). Also printed: how far the auto window's probabilities are
from float32's (max |Δp|) and how many voxels change side at 0.5.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from nx46vx import distill
from nx46vx.config import load_config
from nx46vx.features import resolve_device
from nx46vx.patches import TrainVolume, foreground_sample, make_batch
from nx46vx.segment import compute_dtype, native_bfloat16, normalised, sliding_window
from nx46vx.synthetic import make_volume


def _timed(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="training steps per side per round")
    args = parser.parse_args()
    device = resolve_device("auto")
    base = dataclasses.replace(load_config(args.profile).distill, teacher_input=False)
    configs = {name: distill.resolve(dataclasses.replace(base, precision=name), device) for name in ("float32", "auto")}
    cfg = configs["auto"]
    window = distill.window(cfg)
    print(f"device {device}, profile {args.profile}: {cfg.arch} width {cfg.width} depth {cfg.depth}, patch {cfg.patch}, batch {cfg.batch}, window {window}³; "
          f"auto computes in {compute_dtype('auto', device)} (native bfloat16: {native_bfloat16()}), torch threads {torch.get_num_threads()}", flush=True)
    volume = make_volume((window,) * 3, np.random.default_rng(0), style="real")
    data = [TrainVolume(normalised(volume.image), volume.label, foreground_sample(volume.label, cap=20000, seed=0))]
    batches = [make_batch(lambda i: data[i], 1, s, seed=0, batch=cfg.batch, patch=cfg.patch, positive_fraction=0.5, augmentations=cfg.augment)
               for s in range(args.steps + 1)]
    states = {}
    for name, config in configs.items():
        states[name] = distill.init_state(config, seed=0, device=device)
        states[name].schedule_steps = 10**6
        distill.train_step(states[name], batches[-1], config)  # warm-up: one-off allocations and kernel choices
    step_s: dict[str, list[float]] = {name: [] for name in configs}
    window_s: dict[str, list[float]] = {name: [] for name in configs}
    maps: dict[str, np.ndarray] = {}

    def predict(name: str) -> None:
        network = states[name].network.eval()
        maps[name] = sliding_window(volume.image, network, patch=window, device=device, dtype=compute_dtype(configs[name].precision, device))

    for name in configs:
        predict(name)  # warm-up
    for _ in range(args.rounds):
        for name, config in configs.items():
            step_s[name].append(_timed(lambda: [distill.train_step(states[name], b, config) for b in batches[: args.steps]], device) / args.steps)
            window_s[name].append(_timed(lambda: predict(name), device))
    for name in configs:
        print(f"{name:8s}: training step {np.median(step_s[name]):.4f} s (rounds {', '.join(f'{s:.3f}' for s in step_s[name])}), "
              f"{window}³ window {np.median(window_s[name]):.3f} s", flush=True)
    # the two sides trained apart for rounds × steps: compare the windows of one network
    network = states["float32"].network.eval()
    float32 = sliding_window(volume.image, network, patch=window, device=device, dtype=torch.float32)
    auto = sliding_window(volume.image, network, patch=window, device=device, dtype=compute_dtype("auto", device))
    print(f"auto / float32: training step × {np.median(step_s['auto']) / np.median(step_s['float32']):.2f}, window × "
          f"{np.median(window_s['auto']) / np.median(window_s['float32']):.2f}; one network's window: max |Δp| {np.abs(auto - float32).max():.4f}, "
          f"{int(((auto >= 0.5) != (float32 >= 0.5)).sum())} of {auto.size} voxels change side at 0.5", flush=True)


if __name__ == "__main__":
    main()
