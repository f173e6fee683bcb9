"""Wall time and peak memory to segment one 320³ volume: inference + post-processing, CPU (and GPU when present).

Run: ``python bench/bench_segment.py [--size 320]``. Each measurement runs in a fresh
subprocess so its peak resident memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from nx46vx.config import DistillConfig, FeatureConfig, SegmentConfig
from nx46vx.distill import resolve
from nx46vx.student import build_network
from nx46vx.search import N_PARAMS
from nx46vx.segment import PostParams, postprocess, probability, sliding_window
from nx46vx.synthetic import make_volume


def one(method: str, size: int, device_name: str) -> dict[str, float]:
    device = torch.device(device_name)
    volume = make_volume((size, size, size), np.random.default_rng(0)).image
    seg = SegmentConfig()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if method == "search":
        rng = np.random.default_rng(1)
        thetas = rng.normal(0, 0.3, (5, N_PARAMS)).astype(np.float32)
        prob = probability(volume, thetas, np.zeros(11, np.float32), np.ones(11, np.float32), replace(FeatureConfig(), device=device_name), device=device)
    else:
        cfg = resolve(DistillConfig(), device)  # the default student for this device
        torch.manual_seed(0)
        student = build_network(cfg.arch, width=cfg.width, depth=cfg.depth, blocks=cfg.blocks).to(device).eval()
        prob = sliding_window(volume, student, patch=cfg.patch, overlap=seg.overlap, device=device)
    inference = time.perf_counter() - start
    mask, info = postprocess(prob, PostParams(), seg)
    total = time.perf_counter() - start
    out = {
        "method": method,
        "device": device_name,
        "inference_s": inference,
        "postprocess_s": total - inference,
        "total_s": total,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": base_rss / 1024,
        "mask_fraction": float(mask.mean()),
    }
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "DEVICE"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.size, args.one[1])))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"segmenting one {args.size}³ volume; torch threads {torch.get_num_threads()}")
    for device in devices:
        for method in ("search", "student"):
            proc = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--one", method, device], capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            gpu = f", peak GPU {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else ""
            print(
                f"{method:8s} {device:5s}: inference {r['inference_s']:.1f} s + post-processing {r['postprocess_s']:.1f} s = {r['total_s']:.1f} s, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB (volume generated before: {r['rss_before_mib']:.0f} MiB){gpu}"
            )


if __name__ == "__main__":
    main()
