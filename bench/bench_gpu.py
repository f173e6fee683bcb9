"""On a GPU: the ``kaggle-train`` student at the competition's scale, measured (issue #28, point 5).

Run: ``python bench/bench_gpu.py [--volumes 8] [--size 320] [--seconds 300] [--cap-gb 16] [--steps 20]``.

Prints, for the student ``kaggle-train`` resolves on this device (on a GPU the ResEnc U-Net,
patch 128, batch 2, fp16):

- training steps/s and peak GPU memory, uncapped and with
  ``torch.cuda.set_per_process_memory_fraction`` capping the process at ``--cap-gb`` (a T4's
  16 GB), each in a fresh subprocess so its peak is its own;
- sliding-window seconds per ``--size``³ volume with the profile's window, overlap and window
  batch, without and with flip TTA (8 flips), and their ratio;
- a whole ``nx46vx run --profile kaggle-train --set budget.total_s=SECONDS`` on ``--volumes``
  training volumes of ``--size``³ (``real``-style, :mod:`nx46vx.synthetic`) and two test
  volumes: its steps and seconds per step (``DISTILLATION_SCHEDULE``), the segmenter chosen,
  any excluded for time, and the wall time.

Without CUDA it runs on the CPU (no memory figures); ``--smoke`` shrinks everything (64³,
a small ResEnc at patch 32) so the script itself can be checked on any machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nx46vx import distill
from nx46vx.config import load_config
from nx46vx.patches import TrainVolume, foreground_sample, make_batch
from nx46vx.segment import normalised, sliding_window, windows_per_pass
from nx46vx.synthetic import make_competition, make_volume

#: What ``--smoke`` sets on top of ``kaggle-train``: a ResEnc student small enough for a CPU.
SMOKE = ["distill.arch=resenc", "distill.width=8", "distill.depth=3", "distill.blocks=[1,1,1,1]", "distill.patch=32",
         "distill.inference_patch=0", "distill.workers=1", "distill.cache_volumes=4", "search.samples_per_class=4000",
         "search.val_samples_per_class=4000", "features.pool_per_class=4000"]


def student_settings(overrides: list[str], device: torch.device):
    """The distillation settings ``kaggle-train`` (with ``overrides``) resolves on ``device``."""
    return distill.resolve(load_config("kaggle-train", overrides=overrides).distill, device)


def seconds(work: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``work()``, the GPU's queue drained before and after it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def train_rate(overrides: list[str], *, steps: int, cap_gb: float) -> dict:
    """Steps/s of :func:`nx46vx.distill.train_step` after 3 warm-up steps, and the peak GPU memory (capped at ``cap_gb`` when > 0)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict = {"device": str(device), "cap_gb": cap_gb}
    if device.type == "cuda":
        if cap_gb > 0:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total), device)
        torch.cuda.reset_peak_memory_stats()
    cfg = student_settings(overrides, device)
    size = max(96, 2 * cfg.patch)
    vol = make_volume((size, size, size), np.random.default_rng(0), style="real")
    data = [TrainVolume(normalised(vol.image), vol.label, foreground_sample(vol.label, cap=20000, seed=0))]
    state = distill.init_state(cfg, seed=0, device=device)
    state.schedule_steps = steps + 3

    def step(s: int) -> None:
        batch = make_batch(lambda i: data[i], 1, s, seed=0, batch=cfg.batch, patch=cfg.patch, positive_fraction=cfg.positive_fraction,
                           augmentations=cfg.augment)
        distill.train_step(state, batch, cfg)

    try:
        for s in range(3):
            step(s)
        out["steps_per_s"] = steps / seconds(lambda: [step(s) for s in range(3, steps + 3)], device)
    except torch.cuda.OutOfMemoryError as error:
        out["error"] = f"out of memory: {str(error).splitlines()[0]}"
    out.update(arch=cfg.arch, patch=cfg.patch, batch=cfg.batch, fp16=state.scaler is not None)
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def inference_seconds(overrides: list[str], *, size: int) -> dict:
    """Seconds of :func:`nx46vx.segment.sliding_window` on one ``size``³ volume, without and with flip TTA."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = load_config("kaggle-train", overrides=overrides)
    cfg = distill.resolve(config.distill, device)
    network = distill.student_network(distill.init_state(cfg, seed=0, device=device))
    volume = make_volume((size, size, size), np.random.default_rng(1), style="real").image
    window, batch = distill.window(cfg), windows_per_pass(config.segment.window_batch, device)
    out: dict = {"window": window, "overlap": config.segment.overlap, "window_batch": batch}
    sliding_window(volume[:window, :window, :window], network, patch=window, device=device, batch=batch)  # warm-up
    for tta in (False, True):
        out["tta_s" if tta else "plain_s"] = seconds(
            lambda: sliding_window(volume, network, patch=window, overlap=config.segment.overlap, flip_tta=tta, device=device, batch=batch), device)
    return out


def whole_run(root: Path, overrides: list[str], *, volumes: int, size: int, seconds: float) -> dict:
    """``nx46vx run --profile kaggle-train`` on a generated dataset; what its journal says about the student and the choice."""
    start = time.perf_counter()
    data = make_competition(root / "data", n_train=volumes, n_test=2, shapes=((size, size, size),), seed=0, style="real", unseen_test_scroll=True)
    out: dict = {"data_s": time.perf_counter() - start}
    settings = [f"budget.total_s={seconds}", *overrides]
    command = [sys.executable, "-m", "nx46vx.cli", "run", "--input", str(data), "--output", str(root / "out"), "--profile", "kaggle-train"]
    start = time.perf_counter()
    subprocess.run(command + [arg for s in settings for arg in ("--set", s)], check=True, capture_output=True, text=True)
    out["wall_s"] = time.perf_counter() - start
    events = [json.loads(line) for line in (root / "out" / "journal.jsonl").read_text().splitlines()]
    schedules = [e["data"] for e in events if e["event"] == "DISTILLATION_SCHEDULE"]
    choice = next((e["data"] for e in events if e["event"] == "SEGMENTER_CHOICE"), {})
    steps = next((e["data"].get("steps") for e in events if e["event"] == "PHASE_END" and e.get("phase") == "distillation"), None)
    out.update(steps=steps, seconds_per_step=schedules[-1].get("seconds_per_step") if schedules else None,
               chosen=choice.get("chosen"), excluded_for_time=choice.get("excluded_for_time"),
               predicted_test_seconds=choice.get("predicted_test_seconds"))
    return out


def subprocess_json(*args: str) -> dict:
    """Run this script's ``--one`` mode in a fresh process (its own peak memory); its last stdout line as JSON."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=8, help="training volumes of the whole run")
    parser.add_argument("--size", type=int, default=320, help="edge of every volume (320 = most of the competition's)")
    parser.add_argument("--seconds", type=float, default=300.0, help="budget.total_s of the whole run (0 skips it)")
    parser.add_argument("--cap-gb", type=float, default=16.0, help="GPU memory cap of the second training measurement (a T4: 16)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a small ResEnc: checks the script on any machine")
    parser.add_argument("--one", choices=("train", "infer"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = SMOKE if args.smoke else []
    size = 64 if args.smoke else args.size
    if args.one == "train":
        print(json.dumps(train_rate(overrides, steps=args.steps, cap_gb=args.cap_gb)))
        return
    if args.one == "infer":
        print(json.dumps(inference_seconds(overrides, size=size)))
        return
    flags = [f"--steps={args.steps}"] + (["--smoke"] if args.smoke else [])
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA: CPU"
    print(f"device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}", flush=True)
    for cap in (0.0, args.cap_gb):
        row = subprocess_json("--one", "train", f"--cap-gb={cap}", *flags)
        memory = f", peak GPU {row['peak_gpu_gib']:.2f} GiB allocated / {row['peak_reserved_gib']:.2f} GiB reserved" if "peak_gpu_gib" in row else ""
        rate = row.get("error") or f"{row['steps_per_s']:.3f} steps/s"
        print(f"training {row['arch']} patch {row['patch']} batch {row['batch']} fp16 {row['fp16']}, "
              f"cap {'none' if not cap else f'{cap:g} GB'}: {rate}{memory}", flush=True)
    row = subprocess_json("--one", "infer", f"--size={size}", *flags)
    print(f"sliding window ({row['window']}³ windows, overlap {row['overlap']}, batch {row['window_batch']}) per {size}³ volume: "
          f"{row['plain_s']:.1f} s; with flip TTA {row['tta_s']:.1f} s ({row['tta_s'] / row['plain_s']:.1f}x)", flush=True)
    if args.seconds > 0:
        with tempfile.TemporaryDirectory(prefix="nx46vx-gpu-") as tmp:
            run = whole_run(Path(tmp), overrides, volumes=args.volumes, size=size, seconds=args.seconds)
        print(f"kaggle-train, {args.volumes} training volumes of {size}³, budget {args.seconds:g} s: data {run['data_s']:.0f} s, "
              f"run {run['wall_s']:.0f} s, {run['steps']} student steps at {run['seconds_per_step']} s, chosen {run['chosen']}, "
              f"excluded for time {run['excluded_for_time']}, predicted test seconds {run['predicted_test_seconds']}", flush=True)


if __name__ == "__main__":
    main()
