"""Hardware telemetry (psutil; NVML through nvidia-ml-py) and the run's statistics.

"Golden nonce" (the old system's name, kept for continuity): voxels of the final
mask whose probability is above the 99.99th percentile of that volume's
probability map — the most confident surface detections. They are counted per
test volume in ``GLOBAL_STATS.json``.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from scipy import ndimage

from .errors import MemoryLimitError
from .metric import CONN26

log = logging.getLogger("nx46vx")

GOLDEN_PERCENTILE = 99.99
ANCHOR_PROBABILITY = 0.9


def _nvml() -> list[dict[str, Any]]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no GPU: NVML raises its own error classes
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            gpus.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_total_bytes": int(mem.total),
                    "memory_used_bytes": int(mem.used),
                    "utilization_percent": int(util.gpu),
                }
            )
    except Exception as exc:  # a partial NVML answer is still useful; say what failed
        log.debug("NVML query failed: %s", exc)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return gpus


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_memory_free(root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this container may still use under its memory cgroup limit; None when there is no limit.

    cgroup v2 (``memory.max``, ``memory.current``) or v1 (``memory/memory.limit_in_bytes``,
    ``memory/memory.usage_in_bytes``). Inactive file cache counts as free: the kernel
    reclaims it before the OOM killer acts.
    """
    layouts = (("memory.max", "memory.current", "memory.stat", "inactive_file"),
               ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"))
    for limit_name, usage_name, stat_name, inactive_key in layouts:
        try:
            raw = (root / limit_name).read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:  # v2 "max", v1's page-rounded LONG_MAX: no limit
                return None
            usage = int((root / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        inactive = 0
        try:
            for line in (root / stat_name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(raw) - usage + inactive)
    return None


def free_memory(device: torch.device) -> int:
    """Bytes free for working buffers on ``device``: GPU memory, or RAM within the container's cgroup limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = int(psutil.virtual_memory().available)
    in_cgroup = cgroup_memory_free()
    return available if in_cgroup is None else min(available, in_cgroup)


def ensure_memory(needed: int, *, path: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`~nx46vx.errors.MemoryLimitError` when ``needed`` bytes exceed the RAM this process may use now."""
    free = free_memory(torch.device("cpu"))
    if needed > free:
        raise MemoryLimitError(
            f"{what} needs more memory than this process may use",
            path=path,
            expected=f"at most {free / 2**30:.2f} GiB (free within the container's limit)",
            found=f"{needed / 2**30:.2f} GiB",
            hint="run on a machine with more memory, or leave this volume out",
        )


def boot_info() -> dict[str, Any]:
    """Static facts for the ``BOOT`` event."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "ram_total_bytes": psutil.virtual_memory().total,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpus": _nvml(),
    }


def health() -> dict[str, Any]:
    """Current load for the periodic ``HEALTH`` event."""
    vm = psutil.virtual_memory()
    proc = psutil.Process()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "ram_used_bytes": int(vm.used),
        "ram_available_bytes": int(vm.available),
        "process_rss_bytes": int(proc.memory_info().rss),
        "gpus": _nvml(),
    }


def mask_stats(mask: np.ndarray, prob: np.ndarray | None) -> dict[str, Any]:
    """Statistics of one final mask (z, y, x) and, when the segmenter has one, its probability map.

    ``anchored_voxels``: mask voxels with probability ≥ :data:`ANCHOR_PROBABILITY`;
    ``papyrus_without_anchor``: mask voxels in 26-connected components holding no
    anchored voxel; ``materials``: the number of those components.
    """
    labels, materials = ndimage.label(mask, structure=CONN26)
    stats: dict[str, Any] = {
        "voxels": int(mask.size),
        "slices": int(mask.shape[0]),
        "mask_voxels": int(mask.sum()),
        "materials": int(materials),
        "anomalies": [],
    }
    if mask.sum() == 0:
        stats["anomalies"].append("empty mask")
    elif mask.mean() > 0.5:
        stats["anomalies"].append(f"mask covers {100 * mask.mean():.1f} % of the volume")
    if prob is None:
        return stats
    if not np.isfinite(prob).all():
        stats["anomalies"].append("non-finite probabilities")
    anchored = (prob >= ANCHOR_PROBABILITY) & (mask > 0)
    anchored_components = np.unique(labels[anchored])
    unanchored = (mask > 0) & ~np.isin(labels, anchored_components)
    golden_cut = float(np.percentile(prob, GOLDEN_PERCENTILE))
    stats.update(
        anchored_voxels=int(anchored.sum()),
        papyrus_without_anchor=int(unanchored.sum()),
        golden_nonce=int(((prob > golden_cut) & (mask > 0)).sum()),
        golden_threshold=golden_cut,
        probability={
            "mean": float(prob.mean()),
            "p50": float(np.percentile(prob, 50)),
            "p99": float(np.percentile(prob, 99)),
            "mean_inside_mask": float(prob[mask > 0].mean()) if mask.any() else None,
            "mean_outside_mask": float(prob[mask == 0].mean()) if (mask == 0).any() else None,
        },
    )
    return stats
