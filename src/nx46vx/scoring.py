"""Scoring a ``submission.zip`` against label TIFFs (``nx46vx score``)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import tifffile

from .errors import SubmissionError
from .metric import score_volume
from .volumes import read_label


def _truth_folder(truth: Path) -> Path:
    for sub in ("test_labels", "train_labels"):
        if (truth / sub).is_dir() and not any(truth.glob("*.tif")):
            return truth / sub
    return truth


def score_submission(truth: str | os.PathLike[str], pred: str | os.PathLike[str]) -> dict[str, Any]:
    """``{id: {surface_dice, voi_score, topo_score, score}, …, "mean": …}`` over the submission's volumes."""
    folder = _truth_folder(Path(truth))
    out: dict[str, Any] = {}
    try:
        archive = zipfile.ZipFile(pred)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SubmissionError("cannot open submission", path=pred, expected="a zip file", found=str(exc)) from None
    with archive:
        for name in sorted(archive.namelist()):
            vol_id = Path(name).stem
            label = read_label(folder / f"{vol_id}.tif")
            mask = tifffile.imread(io.BytesIO(archive.read(name)))
            if mask.shape != label.shape:
                raise SubmissionError("prediction shape differs from truth", path=f"{pred}:{name}", expected=label.shape, found=mask.shape)
            out[vol_id] = score_volume(mask, label).to_dict()
    if not out:
        raise SubmissionError("submission holds no volume", path=pred, expected="<id>.tif members", found="none")
    out["mean"] = sum(v["score"] for v in out.values()) / len(out)
    return out
