"""Per-volume mask files and the submission built from them.

Every mask is written to ``masks/<segmenter>/<id>.tif`` atomically as soon as it
exists, with its SHA-256 kept in the phase's checkpointed state: a resumed run keeps
the files whose checksum holds and only computes the others. ``submission.zip`` is
assembled from these files, written atomically and re-validated.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ..atomic import write_bytes_atomic
from ..package import encode_mask, validate_submission, write_submission

if TYPE_CHECKING:
    from .context import RunContext

SUBMISSION = "submission.zip"


def write_mask(folder: Path, vol_id: str, mask: np.ndarray) -> str:
    """Write one (z, y, x) {0, 1} mask as an LZW TIFF; return the file's SHA-256."""
    data = encode_mask(mask)
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / f"{vol_id}.tif", data)
    return hashlib.sha256(data).hexdigest()


def write_probability(folder: Path, vol_id: str, prob: np.ndarray) -> None:
    """Write a (z, y, x) probability map as a uint8 LZW TIFF (``round(255·p)``), for blending with other notebooks."""
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / f"{vol_id}.tif", encode_mask(np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)))


def mask_intact(path: Path, sha256: str) -> bool:
    """True when ``path`` exists and its bytes have the recorded SHA-256."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


def publish_submission(ctx: "RunContext", masks: Mapping[str, Path], shapes: Mapping[str, tuple[int, int, int]], *, segmenter: str, phase: str) -> Path:
    """Replace ``submission.zip`` atomically with ``masks``, re-validate it and journal ``SUBMISSION_WRITTEN``."""
    path = ctx.output / SUBMISSION
    write_submission(path, {vol_id: masks[vol_id].read_bytes() for vol_id in masks})
    summary = validate_submission(path, shapes)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ctx.event("SUBMISSION_WRITTEN", phase, {"path": str(path), "segmenter": segmenter, "volumes": summary, "sha256": digest})
    return path
