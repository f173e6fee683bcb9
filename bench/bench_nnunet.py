"""What an nnU-Net model costs here: as a teacher (seconds per 320³) and as the student's start (seconds per step).

Run: ``python bench/bench_nnunet.py [--preset M] [--windows 1] [--steps 2] [--device cpu]``. It writes an
nnU-Net v2 model folder of the ResEnc preset's network (``M``: ``ResidualEncoderUNet`` 32→320 features, 6 stages,
blocks 1-3-4-6-6-6, patch 128³, the network the host's baseline and most top teams trained; random weights, the
keys nnU-Net's trainer saves), then times on this machine:

* the teacher (:func:`nx46vx.nnunet.probability`): ``--windows`` sliding windows of the plans' patch, without and
  with mirroring over 3 axes; seconds per 320³ = seconds per window × the windows nnU-Net's step 0.5 lays over
  320³ (4 per axis at patch 128: 64), the crop, normalisation and blend being a small part at that size;
* the student started from it (``distill.init``): :func:`nx46vx.distill.train_step` at the plans' patch, batch 2.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from nx46vx import distill, nnunet
from nx46vx.config import DistillConfig
from nx46vx.patches import TrainVolume, foreground_sample, make_batch
from nx46vx.segment import normalised
from nx46vx.student import architecture
from nx46vx.synthetic import make_volume

PRESETS = {"M": {"width": 32, "depth": 5, "blocks": (1, 3, 4, 6, 6, 6), "patch": 128}, "S": {"width": 16, "depth": 4, "blocks": (1, 3, 4, 6, 6), "patch": 96}}


def model_folder(folder: Path, preset: dict) -> Path:
    """An nnU-Net v2 results folder (plans, dataset, fold_0/checkpoint_final.pth) of the preset's ResEnc network."""
    description = architecture("resenc", width=preset["width"], depth=preset["depth"], blocks=preset["blocks"])
    patch = [preset["patch"]] * 3
    plans = {"dataset_name": "Dataset001_Vesuvius", "plans_name": "nnUNetResEncUNetMPlans", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": {"patch_size": patch, "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
                                               "use_mask_for_norm": [False], "architecture": description}},
             "foreground_intensity_properties_per_channel": {"0": {"mean": 120.0, "std": 40.0, "percentile_00_5": 10.0, "percentile_99_5": 240.0}}}
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "surface": 1, "ignore": 2}, "file_ending": ".tif"}
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    network = nnunet.network_from_architecture(description, input_channels=1, heads=2)
    (folder / "fold_0").mkdir()
    torch.save({"network_weights": network.state_dict(), "init_args": {"configuration": "3d_fullres"}, "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 1}, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def seconds_per_window(model: nnunet.NnUNetModel, *, windows: int, mirror: bool, device: torch.device) -> float:
    """Seconds per window of :func:`nnunet.probability` on a volume ``windows`` patches long (step 0.5: 2·windows − 1 windows)."""
    p = model.patch[0]
    volume = np.random.default_rng(0).integers(1, 255, (p * windows, p, p)).astype(np.uint8)
    start = time.perf_counter()
    nnunet.probability(model, volume, mirror=mirror, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (2 * windows - 1)


def seconds_per_step(model: nnunet.NnUNetModel, preset: dict, *, steps: int, device: torch.device) -> float:
    """Seconds per optimiser step of a student started from ``model`` at its patch, batch 2 (after one untimed step)."""
    config = replace(DistillConfig(), arch="resenc", width=preset["width"], depth=preset["depth"], blocks=preset["blocks"], patch=preset["patch"], batch=2,
                     init="nnunet:bench", teachers=())
    state = distill.init_state(config, seed=0, device=device, init=model)
    state.schedule_steps = steps + 1
    vol = make_volume((preset["patch"] + 32,) * 3, np.random.default_rng(1), style="scroll")
    data = [TrainVolume(normalised(vol.image, intensity=state.intensity), vol.label, foreground_sample(vol.label, cap=20000, seed=0))]
    step = lambda s: distill.train_step(state, make_batch(lambda i: data[i], 1, s, seed=0, batch=2, patch=preset["patch"], positive_fraction=0.5, augmentations=config.augment), config)  # noqa: E731
    step(0)
    start = time.perf_counter()
    for s in range(1, steps + 1):
        step(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="M", choices=sorted(PRESETS))
    parser.add_argument("--windows", type=int, default=1, help="patches along the timed volume (2·n − 1 windows at step 0.5)")
    parser.add_argument("--steps", type=int, default=2, help="timed fine-tuning steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device, preset = torch.device(args.device), PRESETS[args.preset]
    model = nnunet.load_model(model_folder(Path(tempfile.mkdtemp(prefix="nx46vx-nnunet-")) / "model", preset))
    per_320 = int(np.ceil((320 - preset["patch"]) / (preset["patch"] * 0.5))) + 1
    print(f"ResEnc {args.preset} (patch {preset['patch']}³, {sum(p.numel() for p in model.network.parameters()) / 1e6:.1f} M parameters) on {device}, "
          f"torch threads {torch.get_num_threads()}; {per_320 ** 3} windows per 320³", flush=True)
    nnunet.probability(model, np.full(model.patch, 100, np.uint8), device=device)  # one-off allocations, untimed
    for mirror in (False, True):
        window_s = seconds_per_window(model, windows=args.windows, mirror=mirror, device=device)
        print(f"teacher{' (mirrored over 3 axes)' if mirror else ''}: {window_s:.2f} s per window, {window_s * per_320 ** 3 / 60:.1f} min per 320³", flush=True)
    print(f"student started from it: {seconds_per_step(model, preset, steps=args.steps, device=device):.2f} s per step (patch {preset['patch']}³, batch 2)", flush=True)


if __name__ == "__main__":
    main()
