"""The post-processing ablation in the 1st place's form, on the official metric (issue #28, point 3).

Run: ``python bench/bench_postprocess.py --data DATA --output OUT`` on a finished ``nx46vx run`` (e.g. one
``bench/bench_reference_unet.py`` leaves in its temporary folder), or without ``--output`` to make a real-style
dataset (seed ``--seed``) and run the ``demo`` profile on it first.

The run's student predicts its validation volumes (the scroll held out, ``DATASET_DISCOVERY.split.val_ids``) and the
test volumes (:func:`nx46vx.predict`). The clean-up steps are added one at a time in the 1st place's order, and at
every row the threshold is tuned on the validation volumes (the official metric) and then applied to the test
volumes:

1. none (threshold only);
2. + small components removed (``segment.min_component_voxels`` of the run);
3. + small holes plugged: ours plugs any gap of at most ``segment.plug_holes_voxels`` voxels that a plane through
   an axis encloses (:func:`nx46vx.segment.plug_holes`), which covers the 1st place's 1-voxel holes (its 2×2×2
   lookup) and small holes; its larger height-map patches per sheet have no counterpart here;
4. + closing (one 6-connected step over the whole mask; the 1st place closed each sheet on its own);
5. + fill holes (enclosed cavities, :func:`scipy.ndimage.binary_fill_holes`);
6. + tunnels repaired (ours, :func:`nx46vx.topology.repair_tunnels`: in each TopoScore tile, films of at most
   ``segment.tunnel_film_voxels`` across holes added, every other tunnel cut where the probability is lowest; it
   stands where the 1st place's height-map patches did, and leaves no tunnel at all).

A row says what the step is worth on validation and on test; the pipeline keeps a step only where validation says so
(:func:`nx46vx.segment.tune_postprocess`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import nx46vx
from nx46vx import checkpoint as ckpt
from nx46vx.config import SegmentConfig
from nx46vx.metric import Truth, score_volume
from nx46vx.segment import PostParams, postprocess
from nx46vx.synthetic import make_competition
from nx46vx.volumes import read_volume

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def steps(seg: SegmentConfig) -> list[tuple[str, dict]]:
    """The ablation's rows: a name and the :class:`PostParams` fields (besides the threshold) in force from that row on."""
    rows = [("none", dict(min_component=0, fill_holes=False)), ("+ small components removed", dict(min_component=seg.min_component_voxels)),
            (f"+ holes plugged (<= {seg.plug_holes_voxels} voxels, in-plane)", dict(plug_holes=seg.plug_holes_voxels)), ("+ closing", dict(closing=1)),
            ("+ fill holes", dict(fill_holes=True)),
            (f"+ tunnels repaired (films <= {seg.tunnel_film_voxels} voxels)", dict(repair_tunnels=True, max_film=seg.tunnel_film_voxels))]
    cumulative, out = {}, []
    for name, change in rows:
        cumulative = {**cumulative, **change}
        out.append((name, dict(cumulative)))
    return out


def mean_score(maps: list[np.ndarray], truths: list[Truth], params: PostParams, seg: SegmentConfig) -> float:
    return float(np.mean([score_volume(postprocess(prob, params, seg)[0], truth).score for prob, truth in zip(maps, truths)]))


def run_demo(data: Path, out: Path, seed: int) -> None:
    command = [sys.executable, "-m", "nx46vx.cli", "run", "--input", str(data), "--output", str(out), "--profile", "demo", "--set", f"seed={seed}"]
    subprocess.run(command, check=True, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, help="competition-layout folder with test_labels/ (made when absent)")
    parser.add_argument("--output", type=Path, help="a finished run's output folder (a demo run is made when absent)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nx46vx-postprocess-"))
    data = args.data or make_competition(work / "data", n_train=10, n_test=8, shapes=((96, 96, 96), (80, 80, 80)), seed=args.seed, style="real",
                                         unseen_test_scroll=True)
    out = args.output
    if out is None:
        out = work / "out"
        run_demo(data, out, args.seed)
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    val_ids = next(e["data"] for e in journal if e["event"] == "DATASET_DISCOVERY")["split"]["val_ids"]
    signature = ckpt.read_manifest(ckpt.latest_committed(out / "checkpoints"))["config_signature"]["segmentation"]
    seg = SegmentConfig(**{k: v for k, v in signature.items() if k in SegmentConfig.__dataclass_fields__})
    sets = {"validation": [(data / "train_images" / f"{i}.tif", data / "train_labels" / f"{i}.tif") for i in val_ids],
            "test": [(p, data / "test_labels" / p.name) for p in sorted((data / "test_images").glob("*.tif"))]}
    maps = {k: [nx46vx.predict(image, model=out).probability for image, _ in pairs] for k, pairs in sets.items()}
    truths = {k: [Truth(read_volume(label)) for _, label in pairs] for k, pairs in sets.items()}
    print(f"the student of {out}: {len(maps['validation'])} validation and {len(maps['test'])} test volumes; threshold tuned on validation over {THRESHOLDS}")
    print(f"{'step':48s} {'threshold':>9s} {'validation':>10s} {'test':>7s}")
    for name, fields in steps(seg):
        scored = {t: mean_score(maps["validation"], truths["validation"], PostParams(high=t, low=t, **fields), seg) for t in THRESHOLDS}
        best = max(scored, key=scored.__getitem__)
        test = mean_score(maps["test"], truths["test"], PostParams(high=best, low=best, **fields), seg)
        print(f"{name:48s} {best:9.1f} {scored[best]:10.4f} {test:7.4f}", flush=True)


if __name__ == "__main__":
    main()
