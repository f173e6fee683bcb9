"""The run's reports: RUN_PROFILE_SUMMARY.json, postmortem.json, GLOBAL_STATS.json and PNG previews.

Builders are pure functions of figures the runner collected; writers go through
:func:`nx46vx.atomic.write_atomic`, so a killed run leaves the previous version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .atomic import write_bytes_atomic

PREVIEW_SLICES = (0.25, 0.5, 0.75)


def profile_summary(
    *,
    wall_s: float,
    phase_seconds: Mapping[str, float],
    journal_s: float,
    io_s: float,
    journal_events: int,
    candidate_iterations: int,
    search_s: float,
    resumed_rate: float | None,
) -> dict[str, Any]:
    """Seconds per phase; compute vs journal vs I/O; candidates/s; cost per candidate-iteration; speed-up vs the resumed run."""
    compute_s = max(0.0, wall_s - journal_s - io_s)
    rate = candidate_iterations / search_s if search_s > 0 and candidate_iterations else None
    covered = sum(phase_seconds.values())
    return {
        "wall_s": wall_s,
        "phase_seconds": dict(phase_seconds),
        "phases_cover_wall": covered / wall_s if wall_s > 0 else None,
        "compute_s": compute_s,
        "journal_s": journal_s,
        "io_s": io_s,
        "shares": {k: (v / wall_s if wall_s > 0 else None) for k, v in (("compute", compute_s), ("journal", journal_s), ("io", io_s))},
        "journal_events": journal_events,
        "candidate_iterations": candidate_iterations,
        "candidates_per_s": rate,
        "seconds_per_candidate_iteration": (1.0 / rate) if rate else None,
        "speedup_vs_resumed_run": (rate / resumed_rate) if rate and resumed_rate else None,
    }


def postmortem(
    result: Mapping[str, Any],
    *,
    phase_fractions: Mapping[str, float],
    phase_seconds: Mapping[str, float],
    latest_checkpoint: str | None,
) -> dict[str, Any]:
    """Status, stop reason, cursor, % done per phase, bottleneck phase, and what the next run will do."""
    bottleneck = max(phase_seconds, key=phase_seconds.get) if phase_seconds else None
    if result["status"] == "complete":
        next_run = "nothing to resume: the search finished; a new run with the same config reuses the feature cache and checkpoints"
    else:
        cursor = result["cursor"]
        next_run = (
            f"attach this output folder (or its results.zip) as an input: the next run resumes {latest_checkpoint} "
            f"at epoch {cursor['epoch']}, candidate {cursor['candidate']}, iter {cursor['iter']}"
        )
    return dict(
        result,
        phase_percent_done={p: round(100.0 * f, 3) for p, f in phase_fractions.items()},
        phase_seconds=dict(phase_seconds),
        bottleneck_phase=bottleneck,
        latest_checkpoint=latest_checkpoint,
        next_run=next_run,
    )


def global_stats(stats: Mapping[str, Any], epoch_results: Sequence[Mapping[str, Any]], *, search_s: float, candidate_iterations: int, samples: int) -> dict[str, Any]:
    """GLOBAL_STATS.json: processed data, active weights, throughput, per-volume mask statistics."""
    active = {
        "per_candidate": {
            str(r["candidate"]): {"start": r["active_start"], "mid": r["active_mid"], "end": r["active_end"]} for r in epoch_results
        },
        "total": {k: int(sum(r[f"active_{k}"] for r in epoch_results)) for k in ("start", "mid", "end")},
    }
    volumes = stats.get("volumes", {})
    return {
        "files_processed": stats.get("files_processed", 0),
        "slices_processed": stats.get("slices_processed", 0),
        "voxels_processed": stats.get("voxels_processed", 0),
        "active_weights": active,
        "calc_per_sec": (candidate_iterations * samples / search_s) if search_s > 0 else None,
        "anchored_voxels": sum(v.get("anchored_voxels", 0) for v in volumes.values()),
        "papyrus_without_anchor": sum(v.get("papyrus_without_anchor", 0) for v in volumes.values()),
        "materials": sum(v.get("materials", 0) for v in volumes.values()),
        "golden_nonce": sum(v.get("golden_nonce", 0) for v in volumes.values()),
        "anomalies": [f"{i}: {a}" for i, v in volumes.items() for a in v.get("anomalies", [])],
        "volumes": dict(volumes),
        "phase": stats.get("phase"),
    }


def _png(image: np.ndarray) -> bytes:
    import imageio.v3 as iio

    return bytes(iio.imwrite("<bytes>", image, extension=".png"))


def write_slice_preview(path: str | os.PathLike[str], volume: np.ndarray, mask: np.ndarray) -> Path:
    """Three z-slices side by side, grey CT with the mask in red, as PNG."""
    tiles = []
    for frac in PREVIEW_SLICES:
        z = min(volume.shape[0] - 1, int(frac * volume.shape[0]))
        grey = volume[z].astype(np.float32)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        hit = mask[z] > 0
        rgb[hit] = 0.5 * rgb[hit] + 0.5 * np.array([255.0, 0.0, 0.0])
        tiles.append(rgb)
        tiles.append(np.full((volume.shape[1], 2, 3), 255.0))
    image = np.clip(np.concatenate(tiles[:-1], axis=1), 0, 255).astype(np.uint8)
    return write_bytes_atomic(path, _png(image))


def write_curve(path: str | os.PathLike[str], values: Sequence[float], *, size: tuple[int, int] = (240, 400)) -> Path:
    """A line plot of ``values`` (e.g. the best objective per epoch) as PNG, on a white canvas."""
    from skimage.draw import line_aa

    height, width = size
    image = np.full((height, width, 3), 255, np.uint8)
    image[height - 20, 20 : width - 10] = 0
    image[10 : height - 19, 20] = 0
    vals = np.asarray(values, dtype=np.float64)
    if vals.size:
        lo, hi = float(vals.min()), float(vals.max())
        span = hi - lo if hi > lo else 1.0
        xs = 20 + np.linspace(0, width - 30, max(2, vals.size))[: vals.size]
        ys = (height - 20) - (vals - lo) / span * (height - 40)
        if vals.size == 1:
            image[int(ys[0]) - 1 : int(ys[0]) + 2, int(xs[0]) - 1 : int(xs[0]) + 2] = (31, 119, 180)
        for i in range(vals.size - 1):
            rr, cc, aa = line_aa(int(ys[i]), int(xs[i]), int(ys[i + 1]), int(xs[i + 1]))
            image[rr, cc] = (255 * (1 - aa[:, None]) + np.array([31, 119, 180]) * aa[:, None]).astype(np.uint8)
    return write_bytes_atomic(path, _png(image))
