"""The student, old vs new, side by side: training patches/s, inference seconds and peak memory per volume.

Run: ``python bench/bench_student.py [--size 320] [--steps 6]``. "old" is the student this
package trained before (a width-16, depth-3 GroupNorm/ReLU U-Net, patch 64, no deep
supervision, plain BCE), kept here only as the baseline; "new" is today's default
student for the device (:func:`nx46vx.distill.resolve`: the ResEnc U-Net on a GPU, the
plain InstanceNorm U-Net on a CPU) trained by :func:`nx46vx.distill.train_step` on
augmented patches. Each measurement runs in a fresh subprocess so its peak resident
memory (``ru_maxrss``) is its own. CPU always; GPU too when one is present.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nx46vx import distill
from nx46vx.config import DistillConfig
from nx46vx.patches import TrainVolume, foreground_sample, make_batch
from nx46vx.segment import normalised, sliding_window
from nx46vx.student import PlainUNet
from nx46vx.synthetic import make_volume


class OldStudent(PlainUNet):
    """The previous student, for the side-by-side only: PlainUNet's layout with GroupNorm/ReLU blocks."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__(width, depth)
        chans = [width * 2**i for i in range(depth + 1)]

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU(inplace=True),
                                 nn.Conv3d(c_out, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU(inplace=True))

        self.down = nn.ModuleList([block(1, chans[0])] + [block(chans[i - 1], chans[i]) for i in range(1, depth + 1)])
        self.merge = nn.ModuleList([block(2 * chans[i - 1], chans[i - 1]) for i in range(depth, 0, -1)])


def _train_rate(which: str, device: torch.device, steps: int) -> tuple[float, int]:
    """Training patches per second (after one warm-up step) and the patch size."""
    vol = make_volume((96, 96, 96), np.random.default_rng(0), style="scroll")
    data = [TrainVolume(normalised(vol.image), vol.label, foreground_sample(vol.label, cap=20000, seed=0))]
    if which == "new":
        cfg = distill.resolve(DistillConfig(), device)
        state = distill.init_state(cfg, seed=0, device=device)
        state.schedule_steps = steps + 1
        step = lambda s: distill.train_step(state, make_batch(lambda i: data[i], 1, s, seed=0, batch=cfg.batch, patch=cfg.patch, positive_fraction=0.5, augmentations=cfg.augment), cfg)  # noqa: E731
        patch, batch = cfg.patch, cfg.batch
    else:
        patch, batch = 64, 2
        net = OldStudent().to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)

        def step(s: int) -> None:
            b = make_batch(lambda i: data[i], 1, s, seed=0, batch=batch, patch=patch, positive_fraction=0.5, augmentations=())
            opt.zero_grad()
            logits = net(b["image"].to(device))
            known = (b["label"] != 2).float().to(device)
            loss = (F.binary_cross_entropy_with_logits(logits, (b["label"] == 1).float().to(device), reduction="none") * known).sum() / known.sum()
            loss.backward()
            opt.step()

    step(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(1, steps + 1):
        step(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start), patch


def one(which: str, task: str, size: int, device_name: str, steps: int) -> dict[str, float]:
    device = torch.device(device_name)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, float] = {"which": which, "task": task, "device": device_name}
    if task == "train":
        out["patches_per_s"], out["patch"] = _train_rate(which, device, steps)
    else:
        volume = make_volume((size, size, size), np.random.default_rng(1), style="scroll").image
        if which == "new":
            cfg = distill.resolve(DistillConfig(), device)
            network, patch = distill.student_network(distill.init_state(cfg, seed=0, device=device)), cfg.patch
        else:
            network, patch = OldStudent().to(device).eval(), 64
        start = time.perf_counter()
        sliding_window(volume, network, patch=patch, overlap=0.5, device=device)
        out["inference_s"] = time.perf_counter() - start
        out["patch"] = patch
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=320, help="edge of the inference volume (320 = the competition's)")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    parser.add_argument("--one", nargs=3, metavar=("WHICH", "TASK", "DEVICE"))
    args = parser.parse_args()
    if args.one:
        which, task, device = args.one
        print(json.dumps(one(which, task, args.size, device, args.steps)))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"student, old vs new; inference on one {args.size}³ volume; torch threads {torch.get_num_threads()}")
    for device in devices:
        rows = {}
        for which in ("old", "new"):
            for task in ("train", "infer"):
                proc = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--steps", str(args.steps), "--one", which, task, device], capture_output=True, text=True, check=True)
                rows[which, task] = json.loads(proc.stdout.strip().splitlines()[-1])
        for which in ("old", "new"):
            t, i = rows[which, "train"], rows[which, "infer"]
            gpu = f", peak GPU {i['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in i else ""
            print(f"{which} {device}: training {t['patches_per_s']:.2f} patches/s (patch {t['patch']:.0f}, peak RSS {t['peak_rss_mib']:.0f} MiB); "
                  f"inference {i['inference_s']:.1f} s per {args.size}³ volume (peak RSS {i['peak_rss_mib']:.0f} MiB{gpu})")
        new_t, old_t = rows["new", "train"], rows["old", "train"]
        print(f"{device}: new/old training voxels per second {new_t['patches_per_s'] * new_t['patch'] ** 3 / (old_t['patches_per_s'] * old_t['patch'] ** 3):.2f}x, "
              f"new/old inference time {rows['new', 'infer']['inference_s'] / rows['old', 'infer']['inference_s']:.2f}x")


if __name__ == "__main__":
    main()
