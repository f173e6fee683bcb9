"""Distillation: real teachers are loaded and used, the student learns, and it fails loudly when it did not run."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import nx46vx
from nx46vx import distill
from nx46vx.config import AUGMENTATIONS, DistillConfig, SegmentConfig
from nx46vx.errors import DistillationNotExecuted
from nx46vx.patches import TrainVolume, foreground_sample, make_batch
from nx46vx.metric import betti_numbers, score_volume
from nx46vx.segment import PostParams, blend, normalised, plug_holes, plain_params, postprocess, postprocess_grid, short_grid, sliding_window, tune_postprocess, windows_per_pass
from nx46vx.synthetic import make_volume, write_tiff
from nx46vx.volumes import file_sha256

from .conftest import FAST, events

CPU = torch.device("cpu")
CFG = DistillConfig(arch="resenc", width=4, depth=2, blocks=(1, 1), patch=16, batch=2, steps=6, lr=1e-2, warmup_steps=2, teacher_weight=1.0)


class Bright(torch.nn.Module):
    """A fixed teacher: logits rise with intensity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 8.0 * (x - 0.5)


@pytest.fixture(scope="module")
def volumes() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [(f"{100 + i}", *(lambda v: (v.image, v.label))(make_volume((24, 24, 24), rng))) for i in range(2)]


def _train(volumes, teacher: distill.Teacher, steps: int = CFG.steps) -> tuple[list[float], dict]:
    vols = [TrainVolume(normalised(img), lab, foreground_sample(lab, cap=500, seed=0), distill.soft_target([teacher.predict(i, img)])) for i, img, lab in volumes]
    state = distill.init_state(CFG, seed=0, device=CPU)
    state.schedule_steps = steps
    batch = lambda s: make_batch(lambda i: vols[i], len(vols), s, seed=0, batch=CFG.batch, patch=CFG.patch, positive_fraction=0.5, augmentations=CFG.augment)  # noqa: E731
    losses = [distill.train_step(state, batch(s), CFG)["teacher"] for s in range(steps)]
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


def test_label_terms_ignore_unlabeled_voxels() -> None:
    logits = torch.zeros(1, 1, 4, 4, 4)
    label = torch.full((1, 1, 4, 4, 4), 2, dtype=torch.uint8)
    label[..., 0] = 1
    label[..., 1] = 0
    batch = {"label": label, "target": torch.full((1, 1, 4, 4, 4), 0.5), "covered": torch.tensor([True])}
    base = distill.losses([logits], batch, CFG, teacher_weight=0.0)
    changed = logits.clone()
    changed[..., 2:] = 5.0  # only where the label is 2
    after = distill.losses([changed], batch, CFG, teacher_weight=0.0)
    for term in ("dice", "bce", "total"):
        assert after[term] == base[term]
    assert distill.losses([changed], batch, CFG, teacher_weight=1.0)["total"] > after["total"]  # the teacher sees every voxel


def test_networks_are_nnunets_own_with_deep_supervision() -> None:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    from nx46vx.student import architecture, build_network

    x = torch.randn(2, 1, 16, 16, 16)
    for arch, cls, sizes in (("resenc", ResidualEncoderUNet, [16, 8, 4]), ("plain", PlainConvUNet, [16])):  # deep supervision: ResEnc only
        network = build_network(arch, width=4, depth=3, blocks=(1, 2))
        outs = network.forward_all(x)
        assert [o.shape[-1] for o in outs] == sizes and outs[0].shape == (2, 1, 16, 16, 16)
        assert torch.equal(network(x), outs[0])
        assert type(network.unet) is cls  # nnU-Net's class itself: its state dict is an nnU-Net checkpoint's weights
        assert all(k.startswith("unet.") for k in network.state_dict())
    kwargs = architecture("resenc", width=32, depth=5, blocks=(1, 3, 4, 6, 6))["arch_kwargs"]
    assert kwargs["features_per_stage"] == [32, 64, 128, 256, 320, 320] and kwargs["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]  # nnU-Net's ResEnc M
    assert kwargs["n_conv_per_stage_decoder"] == [1] * 5 and kwargs["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    cpu = distill.resolve(DistillConfig(arch="auto", width=32, depth=4, patch=128, batch=2), CPU)
    assert (cpu.arch, cpu.width, cpu.depth, cpu.patch, cpu.batch) == ("plain", 16, 3, distill.CPU_PATCH, distill.CPU_BATCH) == ("plain", 16, 3, 32, 4)
    assert distill.resolve(DistillConfig(arch="auto", patch=16, batch=8), CPU).batch == 8  # at least CPU_BATCH patches a step, not at most
    assert distill.resolve(DistillConfig(arch="auto", patch=128, batch=2), torch.device("cuda")).batch == 2  # a GPU student is taken as set


def test_a_student_fed_the_ensembles_map_starts_as_that_map_and_learns_a_correction(volumes) -> None:
    from nx46vx.student import build_network, prior_logit

    x = torch.rand(2, 2, 16, 16, 16)
    for arch in ("plain", "resenc"):
        outs = build_network(arch, width=4, depth=2, blocks=(1, 1), prior=True).forward_all(x)
        assert torch.equal(outs[0], prior_logit(x[:, 1:2]))  # zero heads: the untrained student is the prior
    assert torch.equal(outs[1], prior_logit(torch.nn.functional.avg_pool3d(x[:, 1:2], 2)))  # the coarser head corrects the pooled prior
    # the prior moves with the image's geometry: equal to the target map before augmenting, equal after every augmentation
    maps = [np.random.default_rng(i).random(img.shape).astype(np.float32) for i, (_, img, _) in enumerate(volumes)]
    vols = [TrainVolume(normalised(img), lab, foreground_sample(lab, cap=100, seed=0), m, m) for (_, img, lab), m in zip(volumes, maps)]
    make = lambda step, prior: make_batch(lambda i: vols[i], 2, step, seed=3, batch=4, patch=16, positive_fraction=0.5, augmentations=AUGMENTATIONS, prior=prior)  # noqa: E731
    for step in range(6):
        batch, without = make(step, True), make(step, False)
        assert torch.equal(batch["prior"], batch["target"]) and "prior" not in without
        assert all(torch.equal(batch[k], without[k]) for k in without)  # the prior draws nothing: the other tensors are unchanged
    with pytest.raises(ValueError, match="no prior map"):
        make_batch(lambda i: TrainVolume(vols[i].image, vols[i].label, vols[i].foreground), 2, 0, seed=3, batch=2, patch=16, positive_fraction=0.5, augmentations=(), prior=True)
    # training feeds (image, prior); inference over sliding windows of an untrained student returns the prior
    cfg = DistillConfig(arch="plain", width=4, depth=2, patch=16, batch=4, steps=3, warmup_steps=1, teacher_input=True)
    state = distill.init_state(cfg, seed=0, device=CPU)
    head = state.network.net.heads[-1].weight.detach().clone()
    assert math.isfinite(distill.train_step(state, make(0, True), cfg)["total"]) and not torch.equal(state.network.net.heads[-1].weight, head)
    fresh = distill.init_state(cfg, seed=0, device=CPU).network.eval()
    image = volumes[0][1]
    prob = sliding_window(image, fresh, patch=16, overlap=0.5, flip_tta=True, prior=maps[0])
    np.testing.assert_allclose(prob, np.clip(maps[0], 1e-4, 1 - 1e-4), atol=1e-6)
    with pytest.raises(ValueError, match="prior of shape"):
        sliding_window(image, fresh, patch=16, prior=maps[0][:-1])
    assert not distill.resolve(replace(cfg, teachers=("tiff:x",)), CPU).teacher_input  # the prior is the ensemble's: no ensemble, no prior
    # and only where the ensemble's maps cover every training volume: the student never trains on a subset of them
    assert distill.resolve(cfg, CPU, train_volumes=cfg.teacher_volumes).teacher_input
    assert not distill.resolve(cfg, CPU, train_volumes=cfg.teacher_volumes + 1).teacher_input
    reason = distill.prior_off_reason(cfg, cfg.teacher_volumes + 1)
    assert reason == f"the ensemble's maps cover distill.teacher_volumes = {cfg.teacher_volumes} of {cfg.teacher_volumes + 1} training volumes"
    assert distill.prior_off_reason(cfg, cfg.teacher_volumes) is None


def test_lr_schedule_warms_up_then_follows_the_granted_steps() -> None:
    assert distill.lr_at(0, total=None, warmup=4, base=1.0) == 0.25
    assert distill.lr_at(10, total=None, warmup=4, base=1.0) == 1.0  # undecided: held at the peak
    assert distill.lr_at(4, total=104, warmup=4, base=1.0) == 1.0
    assert distill.lr_at(54, total=104, warmup=4, base=1.0) == pytest.approx(0.5)
    assert distill.lr_at(104, total=104, warmup=4, base=1.0) == pytest.approx(0.0)


def test_batches_are_a_function_of_seed_and_step_and_augmentations_switch(volumes) -> None:
    vols = [TrainVolume(normalised(img), lab, foreground_sample(lab, cap=100, seed=0)) for _, img, lab in volumes]
    get = lambda i: vols[i]  # noqa: E731
    a = make_batch(get, 2, 7, seed=1, batch=3, patch=16, positive_fraction=1.0, augmentations=AUGMENTATIONS)
    b = make_batch(get, 2, 7, seed=1, batch=3, patch=16, positive_fraction=1.0, augmentations=AUGMENTATIONS)
    plain = make_batch(get, 2, 7, seed=1, batch=3, patch=16, positive_fraction=1.0, augmentations=())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image"], plain["image"])
    assert (plain["label"][:, :, 8, 8, 8] == 1).all()  # positive patches are centred on a surface voxel
    assert set(torch.unique(a["label"]).tolist()) <= {0, 1, 2}
    skel = make_batch(get, 2, 7, seed=1, batch=3, patch=16, positive_fraction=1.0, augmentations=(), skeleton=True)["skeleton"]
    assert 0 < skel.sum() < (plain["label"] == 1).sum() and bool((plain["label"][skel > 0] == 1).all())  # thinner, inside the labels
    terms = distill.losses([torch.zeros_like(skel)], dict(plain, skeleton=skel), CFG, teacher_weight=0.0)
    assert float(terms["skeleton"]) == pytest.approx(0.5, abs=0.05)  # σ(0) = ½ on every skeleton voxel


def test_sliding_window_blends_to_the_whole_volume_result() -> None:
    vol = np.random.default_rng(0).integers(0, 255, (20, 27, 33), dtype=np.uint8)
    prob = sliding_window(vol, Bright(), patch=16, overlap=0.5)
    expected = torch.sigmoid(8.0 * (torch.from_numpy(normalised(vol)) - 0.5)).numpy()
    assert prob.shape == vol.shape and np.allclose(prob, expected, atol=1e-5)
    assert np.allclose(sliding_window(vol, Bright(), patch=16, flip_tta=True), expected, atol=1e-5)


def _whole_volume_blend(vol: np.ndarray, network: torch.nn.Module, patch: int, stride: int) -> np.ndarray:
    """Reference: every window of the edge-padded, normalised volume blended into whole-volume sums, one window at a time."""
    image = np.pad(normalised(vol), [(0, max(0, patch - s)) for s in vol.shape], mode="edge")
    starts = [sorted(set(list(range(0, s - patch, stride)) + [s - patch])) if s > patch else [0] for s in image.shape]
    t = np.arange(patch, dtype=np.float32) - (patch - 1) / 2
    g = np.exp(-0.5 * (t / (patch / 4)) ** 2)
    weights = torch.from_numpy(np.maximum(g[:, None, None] * g[None, :, None] * g[None, None, :], 1e-3).astype(np.float32))
    acc, norm = torch.zeros(image.shape), torch.zeros(image.shape)
    with torch.no_grad():
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    window = torch.from_numpy(image[z : z + patch, y : y + patch, x : x + patch].copy())[None, None]
                    acc[z : z + patch, y : y + patch, x : x + patch] += torch.sigmoid(network(window))[0, 0] * weights
                    norm[z : z + patch, y : y + patch, x : x + patch] += weights
    return (acc / norm).numpy()[: vol.shape[0], : vol.shape[1], : vol.shape[2]]


@pytest.mark.parametrize("shape, batch", [((70, 21, 19), 1), ((70, 21, 19), 5), ((41, 37, 33), 16), ((9, 30, 12), 2)])
def test_sliding_window_by_row_slabs_equals_whole_volume_sums(shape: tuple[int, ...], batch: int) -> None:
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(3, 1, 3, padding=1)).eval()
    vol = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
    prob = sliding_window(vol, network, patch=16, overlap=0.5, batch=batch)
    assert prob.shape == vol.shape and prob.dtype == np.float32 and prob.flags.c_contiguous
    np.testing.assert_allclose(prob, _whole_volume_blend(vol, network, 16, 8), rtol=0, atol=2e-6)


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


def _pierced_sheets() -> tuple[np.ndarray, np.ndarray]:
    """A probability map of two sheets (2 voxels thick, across the volume) pierced by a 2×2 and a 3×1 hole, and their truth; (z, y, x) 32³."""
    truth = np.zeros((32, 32, 32), np.uint8)
    truth[8:10] = truth[20:22] = 1
    prob = truth.astype(np.float32) * 0.9
    prob[:, 10:12, 10:12] *= 0.2  # straight through both sheets: a tunnel in each, enclosed in a z plane
    prob[:, 24:27, 5] *= 0.2
    return prob, truth


def test_plug_holes_fills_small_in_plane_holes_only() -> None:
    mask = np.zeros((9, 30, 30), bool)
    mask[4] = True
    mask[4, 5:7, 5:7] = False  # 4 voxels: plugged
    mask[4, 12:22, 12:22] = False  # 100 voxels: kept
    mask[4, 0:2, 20:22] = False  # a notch at the plane's edge is not enclosed: kept
    plugged = plug_holes(mask, 16)
    np.testing.assert_array_equal(plugged & ~mask, np.pad(np.ones((1, 2, 2), bool), ((4, 4), (5, 23), (5, 23))))
    assert plug_holes(mask, 100)[4, 12:22, 12:22].all() and not plug_holes(mask, 0)[4, 5:7, 5:7].any()
    np.testing.assert_array_equal(plug_holes(np.moveaxis(mask, 0, 2), 16), np.moveaxis(plugged, 0, 2))  # every axis alike
    between = np.zeros((12, 12, 12), bool)
    between[2] = between[9] = True  # the slab between two sheets is enclosed in none of the planes
    np.testing.assert_array_equal(plug_holes(between, 10**6), between)


def test_hole_plugging_removes_tunnels_and_the_tuning_keeps_it() -> None:
    prob, truth = _pierced_sheets()
    cfg = SegmentConfig(min_component_voxels=8, repair_tunnels=False)
    pierced = postprocess(prob, PostParams(high=0.5, low=0.5, min_component=8, fill_holes=True), cfg)[0]
    plugged = postprocess(prob, PostParams(high=0.5, low=0.5, min_component=8, fill_holes=True, plug_holes=32), cfg)[0]
    assert betti_numbers(pierced.astype(bool))[1] == 4 and betti_numbers(plugged.astype(bool))[1] == 0
    np.testing.assert_array_equal(plugged, truth)
    assert score_volume(plugged, truth).score > score_volume(pierced, truth).score + 0.1
    params, score, tried = tune_postprocess([(prob, truth)], cfg)
    assert params.plug_holes == cfg.plug_holes_voxels and score == score_volume(plugged, truth).score and tried == len(list(postprocess_grid(cfg)))
    assert all(p.plug_holes == 0 for p in postprocess_grid(SegmentConfig(plug_holes_voxels=0, repair_tunnels=False)))
    # with the tunnel repair (the default) the grid repairs instead of plugging, which is worth nearly as much here
    params, score, _ = tune_postprocess([(prob, truth)], SegmentConfig(min_component_voxels=8))
    assert params.repair_tunnels and score > score_volume(pierced, truth).score + 0.1



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
    assert len(steps) == 30 and {"total", "label", "dice", "bce", "teacher", "teacher_weight"} <= set(steps[0])
    validations = [e["data"] for e in journal if e["event"] == "DISTILLATION_VALIDATION"]
    assert [v["step"] for v in validations] == [0, 10, 20, 30] and all(0 <= v["score"] <= 1 for v in validations)
    assert [v["scored"] for v in validations] == ["prior", "network", "network", "network"]  # the demo's student starts as the ensemble
    end = next(e["data"] for e in journal if e["event"] == "DISTILLATION_END")
    assert end["teacher_coverage_percent"] == {"ensemble": 100.0, f"torchscript:{script}": 100.0}
    assert "student" in result.validation_scores
    report = next(e["data"] for e in journal if e["event"] == "VALIDATION_REPORT")
    assert set(report["teachers"]) == {"ensemble", f"torchscript:{script}"}  # an external teacher is reported: scored at the plain point
    assert report["tuned_points"][f"teacher:torchscript:{script}"] == 1 and report["teachers"]["ensemble"] == report["scores"]["ensemble"]
    with pytest.raises(DistillationNotExecuted, match="no TIFF maps"):
        nx46vx.run([demo_data], output=tmp_path / "missing", profile="demo", overrides=FAST + ['distill.teachers=["tiff:/nonexistent/preds"]'])
    # a missing teacher stops the run at discovery, after the baseline submission and before any search; the failing
    # phase still ends in the journal, with the error (the context is exception-safe)
    missing = events(tmp_path / "missing" / "journal.jsonl")
    failed = [e["data"] for e in missing if e["event"] == "PHASE_END"]
    assert len(failed) == 1 and failed[0]["error"].startswith("DistillationNotExecuted") and failed[0]["seconds"] >= 0
    assert [e["phase"] for e in missing if e["event"] == "PHASE_END"] == ["discovery"] and (tmp_path / "missing" / "submission.zip").is_file()
    assert [e["data"]["ok"] for e in missing if e["event"] == "MODEL_CHECK"] == [False]
    with pytest.raises(DistillationNotExecuted, match="failed to load"):  # and loading it, had discovery not checked it, fails the same way
        distill.load_teacher("tiff:/nonexistent/preds", roots=[], ensemble=None, ensemble_digest="", patch=16, device=CPU)
    # labels only, trained data-parallel by two processes started from inside run()
    labels_only = nx46vx.run([demo_data], output=tmp_path / "labels", profile="demo", overrides=FAST + ["distill.teachers=[]", "distill.steps=5", "distill.processes=2"])
    journal = events(tmp_path / "labels" / "journal.jsonl")
    start = next(e["data"] for e in journal if e["event"] == "DISTILLATION_START")
    assert start["teachers"] == [] and labels_only.status == "complete"
    parallel = next(e["data"] for e in journal if e["event"] == "DISTILLATION_PARALLEL")
    assert parallel["processes"] == 2 and parallel["backend"] == "gloo" and parallel["patches_per_process"] == 1
    steps = [e["data"] for e in journal if e["event"] == "DISTILLATION_LOSS_STEP"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5] and all(math.isfinite(s["total"]) for s in steps)
    assert not list((tmp_path / "labels" / "cache").glob(".ddp-*"))


def test_the_student_learns_thin_surfaces_on_scroll_data() -> None:
    """On the harder scroll-style volumes (thin labels in thick sheets) the label losses fall and the student separates surface from sheet."""
    rng = np.random.default_rng(7)
    vols = []
    for _ in range(2):
        v = make_volume((40, 40, 40), rng, style="scroll")
        vols.append(TrainVolume(normalised(v.image), v.label, foreground_sample(v.label, cap=2000, seed=0)))
    cfg = DistillConfig(arch="plain", width=8, depth=2, patch=24, batch=4, lr=3e-3, warmup_steps=5, teacher_weight=0.0, augment=("flip", "rot90"))
    state = distill.init_state(cfg, seed=0, device=CPU)
    state.schedule_steps = 60
    batch = lambda s: make_batch(lambda i: vols[i], 2, s, seed=0, batch=4, patch=24, positive_fraction=0.5, augmentations=cfg.augment)  # noqa: E731
    losses = [distill.train_step(state, batch(s), cfg)["label"] for s in range(60)]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    probe = make_batch(lambda i: vols[i], 2, 999, seed=1, batch=8, patch=24, positive_fraction=0.5, augmentations=())
    with torch.no_grad():
        prob = torch.sigmoid(distill.student_network(state)(probe["image"]))
    label = probe["label"]
    assert prob[label == 1].mean() > prob[label == 0].mean() + 0.2


def test_window_batch_is_a_setting_not_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The windows per pass come from ``segment.window_batch`` (default 0: one on a CPU, four on an accelerator), whatever
    memory is free at the moment."""
    from nx46vx import telemetry
    from nx46vx.config import load_config
    from nx46vx.errors import ConfigError

    seen: list[int] = []

    class Counting(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return x - 0.5

    vol = np.random.default_rng(2).integers(0, 255, (40, 40, 24), dtype=np.uint8)
    maps = []
    for free in (1 << 20, 1 << 40):
        monkeypatch.setattr(telemetry, "free_memory", lambda _device, free=free: free)
        monkeypatch.setattr("nx46vx.segment.free_memory", lambda _device, free=free: free, raising=False)
        seen.clear()
        maps.append(sliding_window(vol, Counting(), patch=16, overlap=0.5, batch=4))
        assert max(seen) == 4 and sum(seen) == 4 * 4 * 2, free  # 4 × 4 × 2 windows of 16 at stride 8, four per pass
    seen.clear()
    maps.append(sliding_window(vol, Counting(), patch=16, overlap=0.5))  # the default on a CPU: one window per pass
    assert seen == [1] * (4 * 4 * 2)
    assert np.array_equal(maps[0], maps[1]) and np.array_equal(maps[0], maps[2])
    for profile in ("demo", "kaggle-train", "kaggle-submit"):
        assert load_config(profile).segment.window_batch == 0, profile
    assert [windows_per_pass(0, torch.device(kind)) for kind in ("cpu", "cuda")] == [1, 4]
    assert windows_per_pass(2, torch.device("cuda")) == windows_per_pass(2, torch.device("cpu")) == 2
    assert load_config("demo", overrides=["segment.window_batch=2"]).segment.window_batch == 2
    with pytest.raises(ConfigError, match="segment.window_batch"):
        load_config("demo", overrides=["segment.window_batch=-1"])
    with pytest.raises(ValueError, match="0 \\(by device\\) or more"):
        sliding_window(vol, Counting(), patch=16, batch=-1)


def test_a_source_after_the_first_is_tuned_on_the_plain_point_and_the_leaders() -> None:
    prob, truth = _pierced_sheets()
    cfg = SegmentConfig(min_component_voxels=8)
    leader = PostParams(high=0.5, low=0.5, min_component=8, fill_holes=True, plug_holes=32)
    grid = short_grid(cfg, leader)
    assert grid == [plain_params(cfg), leader] and short_grid(cfg, plain_params(cfg)) == [plain_params(cfg)]
    params, score, tried = tune_postprocess([(prob, truth)], cfg, grid=grid)
    assert (params, tried) == (leader, 2) and score == score_volume(postprocess(prob, leader, cfg)[0], truth).score
    _, _, cut = tune_postprocess([(prob, truth)], cfg, grid=grid, keep_going=lambda _i: False)
    assert cut == 1  # the first point is always scored


def test_the_blend_is_the_mean_of_two_maps() -> None:
    student, ensemble = np.float32([[[0.2, 1.0]]]), np.float32([[[0.6, 0.0]]])
    out = blend(student, ensemble)
    assert out.dtype == np.float32 and np.allclose(out, [[[0.4, 0.5]]]) and np.allclose(student, [[[0.2, 1.0]]])  # inputs untouched


def test_a_cpu_student_predicts_in_windows_three_times_its_patch_unless_set() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert distill.window(distill.resolve(DistillConfig(arch="auto", patch=128), cpu)) == 96
    assert distill.window(distill.resolve(DistillConfig(arch="auto", patch=16), cpu)) == 48
    assert distill.window(distill.resolve(DistillConfig(arch="auto", patch=128, inference_patch=48), cpu)) == 48
    assert distill.window(distill.resolve(DistillConfig(arch="auto", patch=128), gpu)) == 128
    assert distill.window(distill.resolve(DistillConfig(arch="plain", patch=32), cpu)) == 32  # an explicit network is taken as set


def test_later_weights_within_the_margin_of_the_best_score_are_kept() -> None:
    """The schedule's later weights replace the kept ones unless they score more than LATER_WEIGHTS_MARGIN under the best
    score so far (measured from the best, so a slow decline does not drift); the weights of step 0 only when beaten."""
    state = distill.init_state(CFG, seed=0, device=CPU)
    margin = distill.LATER_WEIGHTS_MARGIN
    assert distill.keep_if_best(state, 0.80) == (True, True)  # step 0: the prior (or a start model)
    state.step = 100
    assert distill.keep_if_best(state, 0.80 - 1e-4) == (False, False)  # step 0's weights are replaced only when beaten
    assert distill.keep_if_best(state, 0.81) == (True, True) and state.best["step"] == 100
    state.step = 200
    assert distill.keep_if_best(state, 0.81 - margin / 2) == (False, True) and (state.best["step"], state.best["top"]) == (200, 0.81)
    state.step = 300
    assert distill.keep_if_best(state, 0.81 - margin * 0.9) == (False, True)  # within the margin of the best, not of the kept weights
    state.step = 400
    assert distill.keep_if_best(state, 0.81 - margin * 1.1) == (False, False) and state.best["step"] == 300
    assert torch.equal(distill.student_network(state).state_dict()[next(iter(state.best["weights"]))], next(iter(state.best["weights"].values())))


def test_precision_is_float16_on_a_gpu_bfloat16_on_a_cpu_that_computes_it_natively_else_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    from nx46vx import segment
    from nx46vx.config import load_config
    from nx46vx.errors import ConfigError

    assert isinstance(segment.native_bfloat16(), bool)  # this machine's answer, whichever it is
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(segment, "native_bfloat16", lambda native=native: native)
        assert segment.compute_dtype("auto", CPU) == expected
        assert segment.compute_dtype("auto", torch.device("cuda")) == torch.float16
        assert segment.compute_dtype("auto", torch.device("mps")) == torch.float32
        assert all(segment.compute_dtype("float32", torch.device(kind)) == torch.float32 for kind in ("cpu", "cuda", "mps"))
    for profile in ("demo", "kaggle-train", "kaggle-submit"):
        assert load_config(profile).distill.precision == "auto", profile
    with pytest.raises(ConfigError, match="distill.precision"):
        load_config("demo", overrides=["distill.precision=float16"])
    with pytest.raises(ValueError, match="precision must be one of"):
        segment.compute_dtype("bfloat16", CPU)


def test_a_bfloat16_student_trains_and_predicts_in_bfloat16_deterministically(monkeypatch: pytest.MonkeyPatch, volumes) -> None:
    """Under ``auto`` on a CPU with native bfloat16 the convolutions run in bfloat16 (other weights than float32's after
    the same steps, the same bits twice), the weights stay float32, no loss scaler; a window's map stays within bfloat16's
    rounding of float32's."""
    from nx46vx import segment

    monkeypatch.setattr(segment, "native_bfloat16", lambda: True)  # bfloat16 autocast runs (emulated) on any CPU
    data = [TrainVolume(normalised(image), label, foreground_sample(label, cap=500, seed=0)) for _, image, label in volumes]
    batches = [make_batch(lambda i: data[i], len(data), s, seed=0, batch=2, patch=16, positive_fraction=0.5, augmentations=()) for s in range(3)]
    weights = {}
    for name, precision in (("bf16", "auto"), ("bf16 again", "auto"), ("fp32", "float32")):
        cfg = replace(CFG, teacher_weight=0.0, precision=precision)
        state = distill.init_state(cfg, seed=0, device=CPU)
        assert state.scaler is None
        for batch in batches:
            terms = distill.train_step(state, batch, cfg)
            assert math.isfinite(terms["total"])
        weights[name] = torch.cat([p.detach().flatten() for p in state.network.parameters()])
        assert all(p.dtype == torch.float32 for p in state.network.parameters())
    assert torch.equal(weights["bf16"], weights["bf16 again"])
    assert not torch.equal(weights["bf16"], weights["fp32"])
    assert torch.allclose(weights["bf16"], weights["fp32"], atol=0.05)
    network = state.network.eval()
    image = volumes[0][1]
    maps = {dtype: sliding_window(image, network, patch=16, dtype=dtype) for dtype in (torch.bfloat16, torch.float32, None)}
    assert np.array_equal(maps[None], maps[torch.float32])  # a CPU's default: float32
    assert maps[torch.bfloat16].dtype == np.float32 and not np.array_equal(maps[torch.bfloat16], maps[torch.float32])
    assert np.abs(maps[torch.bfloat16] - maps[torch.float32]).max() < 0.05
