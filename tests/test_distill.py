"""Distillation: real teachers are loaded and used, the student learns, and it fails loudly when it did not run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import nx46vx
from nx46vx import distill
from nx46vx.config import DistillConfig, SegmentConfig
from nx46vx.errors import DistillationNotExecuted
from nx46vx.segment import PostParams, normalised, postprocess, sliding_window
from nx46vx.synthetic import make_volume, write_tiff
from nx46vx.volumes import file_sha256

from .conftest import FAST, events

CPU = torch.device("cpu")
CFG = DistillConfig(width=4, depth=1, patch=16, batch=2, steps=6, lr=1e-2)


class Bright(torch.nn.Module):
    """A fixed teacher: logits rise with intensity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 8.0 * (x - 0.5)


@pytest.fixture(scope="module")
def volumes() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [(f"{100 + i}", *(lambda v: (v.image, v.label))(make_volume((24, 24, 24), rng))) for i in range(2)]


def _train(volumes, teacher: distill.Teacher, steps: int = CFG.steps) -> tuple[list[float], dict]:
    vols = [distill.DistillVolume(i, normalised(img), lab, distill.soft_target([teacher.predict(i, img)])) for i, img, lab in volumes]
    state = distill.init_state(CFG, seed=0, device=CPU)
    losses = [distill.train_step(state, distill.sample_batch(vols, s, CFG, seed=0), CFG)["teacher"] for s in range(steps)]
    return losses, distill.state_dict(state)["student"]


def test_torchscript_and_tiff_teachers_are_loaded_and_change_the_student(volumes, tmp_path: Path) -> None:
    script = tmp_path / "teacher.pt"
    torch.jit.script(Bright()).save(str(script))
    ts = distill.load_teacher(f"torchscript:{script}", roots=[], ensemble=None, ensemble_digest="", patch=16, device=CPU)
    assert ts.sha256 == file_sha256(script)
    prob = ts.predict("100", volumes[0][1])
    assert prob.shape == volumes[0][1].shape and 0 <= prob.min() and prob.max() <= 1
    assert np.corrcoef(prob.ravel(), volumes[0][1].ravel())[0, 1] > 0.9  # really the scripted network's output

    folder = tmp_path / "preds"
    folder.mkdir()
    for vol_id, image, _ in volumes:
        write_tiff(folder / f"{vol_id}.tif", (255 - image).astype(np.uint8))  # an inverted "prediction"
    tiff = distill.load_teacher(f"tiff:{folder}", roots=[], ensemble=None, ensemble_digest="", patch=16, device=CPU)
    assert np.allclose(tiff.predict("100", volumes[0][1]), (255 - volumes[0][1]) / 255.0)
    assert tiff.predict("999", volumes[0][1]) is None  # no file: the volume is not covered

    loss_ts, student_ts = _train(volumes, ts)
    loss_tiff, student_tiff = _train(volumes, tiff)
    assert loss_ts != loss_tiff
    assert any(not torch.equal(student_ts[k], student_tiff[k]) for k in student_ts)
    # the same teacher twice gives the same student, bit for bit
    again, student_again = _train(volumes, ts)
    assert again == loss_ts and all(torch.equal(student_ts[k], student_again[k]) for k in student_ts)


def test_python_teacher(volumes) -> None:
    teacher = distill.load_teacher("python:numpy:zeros_like", roots=[], ensemble=None, ensemble_digest="", patch=16, device=CPU)
    assert teacher.predict("x", volumes[0][1]).max() == 0.0


@pytest.mark.parametrize("spec", ["tiff:/nonexistent/teachers", "torchscript:/nonexistent/model.pt", "python:no_such_module_xyz:f", "ensemble", "keras:/x"])
def test_missing_teacher_is_an_error(spec: str) -> None:
    with pytest.raises(DistillationNotExecuted):
        distill.load_teacher(spec, roots=[], ensemble=None, ensemble_digest="", patch=16, device=CPU)


def test_label_term_ignores_unlabeled_voxels() -> None:
    logits = torch.zeros(1, 1, 4, 4, 4)
    label = torch.full((1, 1, 4, 4, 4), 2, dtype=torch.uint8)
    label[..., 0] = 1
    batch = {"label": label, "target": torch.full((1, 1, 4, 4, 4), 0.5), "covered": torch.tensor([True])}
    base = distill.losses(logits, batch, CFG)["label"]
    changed = logits.clone()
    changed[..., 1:] = 5.0  # only where the label is 2
    assert distill.losses(changed, batch, CFG)["label"] == base


def test_sliding_window_blends_to_the_whole_volume_result() -> None:
    vol = np.random.default_rng(0).integers(0, 255, (20, 27, 33), dtype=np.uint8)
    prob = sliding_window(vol, Bright(), patch=16, overlap=0.5)
    expected = torch.sigmoid(8.0 * (torch.from_numpy(normalised(vol)) - 0.5)).numpy()
    assert prob.shape == vol.shape and np.allclose(prob, expected, atol=1e-5)
    assert np.allclose(sliding_window(vol, Bright(), patch=16, flip_tta=True), expected, atol=1e-5)


def test_postprocess_hysteresis_and_fallback() -> None:
    prob = np.zeros((20, 20, 20), np.float32)
    prob[5:7] = 0.6
    prob[5, 5, 5] = 0.95
    cfg = SegmentConfig()
    mask, info = postprocess(prob, PostParams(high=0.9, low=0.5, min_component=1, fill_holes=False), cfg)
    assert mask[5:7].all() and mask.sum() == 800 and not info["fallback"]
    weak = prob * 0.5  # nothing above high: hysteresis keeps nothing, the percentile fallback keeps the top 5 %
    mask, info = postprocess(weak, PostParams(high=0.9, low=0.5, min_component=1, fill_holes=False), cfg)
    assert info["fallback"] and info["hysteresis_ratio"] == 0.0 and mask.sum() > 0



def test_pipeline_with_external_teachers_and_failures(demo_data: Path, tmp_path: Path) -> None:
    script = tmp_path / "teacher.pt"
    torch.jit.script(Bright()).save(str(script))
    teachers = f'distill.teachers=["ensemble", "torchscript:{script}"]'
    result = nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=FAST + [teachers])
    journal = events(tmp_path / "out" / "journal.jsonl")
    loads = [e["data"] for e in journal if e["event"] == "DISTILLATION_TEACHER_LOAD_END"]
    assert [d["teacher"] for d in loads] == ["ensemble", f"torchscript:{script}"] and all(d["ok"] for d in loads)
    assert loads[1]["sha256"] == file_sha256(script)
    steps = [e["data"] for e in journal if e["event"] == "DISTILLATION_LOSS_STEP"]
    assert len(steps) == 30 and {"total", "label", "teacher"} <= set(steps[0])
    end = next(e["data"] for e in journal if e["event"] == "DISTILLATION_END")
    assert end["teacher_coverage_percent"] == {"ensemble": 100.0, f"torchscript:{script}": 100.0}
    assert "student" in result.validation_scores
    with pytest.raises(DistillationNotExecuted, match="failed to load"):
        nx46vx.run([demo_data], output=tmp_path / "missing", profile="demo", overrides=FAST + ['distill.teachers=["tiff:/nonexistent/preds"]'])
    with pytest.raises(DistillationNotExecuted, match="no optimiser step ran"):
        nx46vx.run([demo_data], output=tmp_path / "zero", profile="demo", overrides=FAST + ["distill.steps=0"])


def test_student_beats_the_baseline_on_demo(tmp_path: Path) -> None:
    from nx46vx.synthetic import make_competition

    data = make_competition(tmp_path / "data", seed=0)
    result = nx46vx.run([data], output=tmp_path / "out", profile="demo")
    scores = result.validation_scores
    assert scores["student"] > scores["intensity_baseline"], scores
    (tmp_path / "scores.json").write_text(json.dumps(scores))
