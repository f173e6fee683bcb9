"""Feature bank cost per volume vs one ``scipy.ndimage.gaussian_filter(σ=1)`` pass over the same volume.

Run: ``python bench/bench_features.py [--size 320] [--repeats 3] [--device cpu|cuda|all]``.

Both are timed in this process, side by side, median of ``--repeats`` runs each:
``iter_feature_chunks`` over the whole volume (all 11 channels, the chunks the
pipeline uses, results discarded as the pool sampler discards them once gathered)
and one ``gaussian_filter(volume, 1.0)`` on the same uint8 volume. Peak memory:
the process's resident set sampled while the feature bank runs (it includes the
volume, ``size³`` bytes, and the interpreter) and torch's peak allocation on GPU.
The ratio is printed last.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np
import psutil
import torch
from scipy import ndimage

from nx46vx.config import FeatureConfig
from nx46vx.features import CHANNELS, iter_feature_chunks


def scroll_like(size: int, seed: int = 0) -> np.ndarray:
    """A uint8 volume with sheets, blur and noise (the filters' cost does not depend on content)."""
    rng = np.random.default_rng(seed)
    z = np.arange(size, dtype=np.float32)[:, None, None]
    y = np.arange(size, dtype=np.float32)[None, :, None]
    x = np.arange(size, dtype=np.float32)[None, None, :]
    sheets = np.cos(2 * np.pi * (y + 6 * np.sin(x / 37.0) + 4 * np.sin(z / 53.0)) / 14.0)
    image = 110 + 60 * np.clip(sheets, 0, 1) + rng.normal(0, 20, (size, size, size)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class PeakRSS:
    """Samples this process's resident set every 5 ms while active (the feature bank's own peak)."""

    def __enter__(self) -> "PeakRSS":
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_features(volume: np.ndarray, config: FeatureConfig, device: torch.device) -> None:
    for _z0, _z1, chunk in iter_feature_chunks(volume, config, device=device):
        del chunk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    args = parser.parse_args()
    config = FeatureConfig()
    volume = scroll_like(args.size)
    gpu = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices = {"cpu": [torch.device("cpu")], "cuda": [torch.device("cuda")], "all": [torch.device("cpu"), *gpu]}[args.device]
    print(f"volume {args.size}^3 uint8, {len(CHANNELS)} channels, chunk_z {config.chunk_z}, torch threads {torch.get_num_threads()}")
    baseline = median_seconds(lambda: ndimage.gaussian_filter(volume, 1.0), args.repeats)
    print(f"gaussian_filter(sigma=1) : {baseline:.3f} s (median of {args.repeats})")
    ratios = {}
    for device in devices:
        run_features(volume, config, device)  # warm-up: thread pools, CUDA context, allocator
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with PeakRSS() as rss:
            seconds = median_seconds(lambda: run_features(volume, config, device), args.repeats)
        peak = f"peak process RSS {rss.peak / 2**30:.2f} GiB"
        if device.type == "cuda":
            peak += f", peak GPU allocation {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
        ratios[device.type] = seconds / baseline
        print(f"feature bank on {device.type:4s} : {seconds:.3f} s per volume (median of {args.repeats}), {peak}")
    for kind, ratio in ratios.items():
        print(f"ratio feature bank / one gaussian pass ({kind}): {ratio:.1f}")


if __name__ == "__main__":
    main()
