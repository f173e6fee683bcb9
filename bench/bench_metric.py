"""The competition metric: ours (``nx46vx.metric``) against the reference, side by side, on scroll-like volumes.

Run: ``python bench/bench_metric.py [--size 320] [--tuning-size 96]`` (needs the test extra and
``pip install --no-deps topolosses==0.2.0``: the reference is rebuilt in ``tests/reference_metric.py``).

1. Seconds per scroll-like ``--size``³ volume (label 2 outside a labelled box and on a
   3-voxel border, as in the competition), ours on every core and on one thread vs the
   reference, and whether the scores agree.
2. The tuning candidates a run scores (two probability maps × the post-processing grid,
   each candidate's score its mean over two ``--tuning-size``³ validation volumes): every validation choice is made with
   ``nx46vx.metric`` itself, no proxy, so its agreement with the reference is measured as
   a proxy's would be (Spearman rank correlation, and the reference score of the
   candidate ours picks against the reference's best).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/reference_metric.py

import nx46vx.metric as metric  # noqa: E402
from nx46vx.config import SegmentConfig  # noqa: E402
from nx46vx.segment import postprocess, postprocess_grid  # noqa: E402
from nx46vx.synthetic import make_volume  # noqa: E402
from tests.reference_metric import reference_module, reference_score  # noqa: E402


def scroll_case(size: int, seed: int, *, blur: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """(labels 0/1/2, probability map) of one scroll-like volume, the map a blurred, noisy view of the surface."""
    rng = np.random.default_rng(seed)
    labels = make_volume((size, size, size), rng, style="scroll").label.copy()
    labels[:3], labels[-3:], labels[:, :3], labels[:, -3:], labels[:, :, :3], labels[:, :, -3:] = (2,) * 6
    return labels, probability(labels, rng, blur=blur)


def probability(labels: np.ndarray, rng: np.random.Generator, *, blur: float) -> np.ndarray:
    """A segmenter's map: the surface blurred by ``blur`` voxels plus smooth noise, in [0, 1]."""
    surface = ndimage.gaussian_filter((labels == 1).astype(np.float32), blur)
    noise = ndimage.gaussian_filter(rng.normal(0, 0.35, labels.shape).astype(np.float32), 1.0)
    return np.clip(0.8 * surface / max(float(surface.max()), 1e-6) + noise, 0, 1)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def speed(size: int, module) -> None:
    labels, prob = scroll_case(size, seed=1)
    pred = postprocess(prob, next(iter(postprocess_grid(SegmentConfig()))), SegmentConfig())[0]
    metric.score_volume(pred[:8, :8, :8], labels[:8, :8, :8])  # compile or load the kernels outside the timing
    ours, ours_s = timed(metric.score_volume, pred, labels)
    cpus = metric.usable_cpus
    metric.usable_cpus = lambda: 1
    _, ours_1_s = timed(metric.score_volume, pred, labels)
    metric.usable_cpus = cpus
    (ref, _counts), ref_s = timed(reference_score, pred, labels, module)
    diff = max(abs(getattr(ours, k) - v) for k, v in ref.items())
    print(f"one {size}³ scroll-like volume (prediction: the plain 0.5 threshold, {int(pred.sum())} voxels):")
    print(f"  ours {ours_s:.1f} s on {cpus()} threads, {ours_1_s:.1f} s on one; reference {ref_s:.1f} s: "
          f"{ref_s / ours_s:.1f}x ({ref_s / ours_1_s:.1f}x on one thread)")
    print(f"  score {ours.score:.6f}, topo {ours.topo_score:.6f}, counts {ours.topo_counts}; largest difference from the reference {diff:.1e}")


def agreement(size: int, module) -> None:
    seg = SegmentConfig()
    grid = list(postprocess_grid(seg))
    volumes = [scroll_case(size, seed)[0] for seed in (2, 3)]
    ours, ref, ours_s, ref_s, n = [], [], 0.0, 0.0, 0
    for blur in (1.0, 2.5):  # two segmenters: a sharp map and a blurry one
        maps = [probability(labels, np.random.default_rng(seed), blur=blur) for seed, labels in enumerate(volumes)]
        truths = [metric.Truth(labels) for labels in volumes]
        for params in grid:  # a candidate's score is its mean over the validation volumes, as tuning computes it
            mine, theirs = [], []
            for prob, labels, truth in zip(maps, volumes, truths):
                pred = postprocess(prob, params, seg)[0]
                score, seconds = timed(metric.score_volume, pred, truth)
                mine.append(score.score)
                ours_s += seconds
                (expected, _), seconds = timed(reference_score, pred, labels, module)
                theirs.append(expected["score"])
                ref_s += seconds
                n += 1
            ours.append(np.mean(mine))
            ref.append(np.mean(theirs))
    ours, ref = np.array(ours), np.array(ref)
    rho = spearmanr(ours, ref).statistic
    pick = int(np.argmax(ours))
    print(f"tuning candidates: {len(ours)} (2 maps x {len(grid)} post-processing points, each scored on two {size}³ validation volumes)")
    print(f"  ours {ours_s / n:.2f} s per volume scored, reference {ref_s / n:.2f} s: {ref_s / ours_s:.1f}x")
    print(f"  Spearman {rho:.4f}; ours picks a candidate the reference scores {ref[pick]:.6f}, the reference's best {ref.max():.6f} "
          f"(short by {ref.max() - ref[pick]:.2e}); largest score difference {np.abs(ours - ref).max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--tuning-size", type=int, default=96)
    args = parser.parse_args()
    module = reference_module()
    speed(args.size, module)
    agreement(args.tuning_size, module)


if __name__ == "__main__":
    main()
