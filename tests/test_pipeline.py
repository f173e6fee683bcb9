"""End-to-end runs: CLI, any competition-layout folder, submission, journal, scoring, resume and the governor."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tifffile

import nx46vx
from nx46vx import checkpoint as ckpt
from nx46vx.errors import OutputNotWritableError
from nx46vx.journal import verify

from .conftest import FAST, assert_parity, events as _events, masks as _masks, run_args, run_cli


@pytest.fixture(scope="module")
def reference(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted run through the CLI; everything else compares with it."""
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = run_cli(*run_args(demo_data, out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    return {"out": out, "result": result, "masks": _masks(out / "submission.zip")}


def test_uninterrupted_run(reference: dict, demo_data: Path) -> None:
    out, result = reference["out"], reference["result"]
    assert result["status"] == "complete"
    assert verify(out / "journal.jsonl").ok
    masks = reference["masks"]
    test_ids = [line.split(",")[0] for line in (demo_data / "test.csv").read_text().splitlines()[1:]]
    assert sorted(masks) == sorted(f"{i}.tif" for i in test_ids)
    for name, mask in masks.items():
        assert mask.shape == tifffile.imread(demo_data / "test_images" / name).shape
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    names = [e["event"] for e in _events(out / "journal.jsonl")]
    for required in (
        "RUN_START", "DATASET_DISCOVERY", "FIT_ITER", "CANDIDATE_DONE", "EPOCH_DONE", "CHECKPOINT_WRITTEN", "MERKLE_ROOT",
        "DISTILLATION_START", "DISTILLATION_TEACHER_LOAD_BEGIN", "DISTILLATION_TEACHER_LOAD_END", "DISTILLATION_BATCH_BEGIN",
        "DISTILLATION_LOSS_STEP", "DISTILLATION_STUDENT_UPDATE", "DISTILLATION_BATCH_END", "DISTILLATION_CHECKPOINT_WRITTEN",
        "DISTILLATION_END", "VALIDATION_REPORT", "SEGMENTER_CHOICE", "SUBMISSION_WRITTEN", "RUN_END",
    ):
        assert required in names
    assert names.count("FIT_ITER") == 2 * 120  # two epochs of the full grid in one batch
    # the baseline's submission exists right after discovery, before any training; the trained one replaces it
    written = [e["data"] for e in _events(out / "journal.jsonl") if e["event"] == "SUBMISSION_WRITTEN"]
    assert [w["segmenter"] for w in written] == ["intensity_baseline", result["segmenter"]]
    assert names.index("SUBMISSION_WRITTEN") < names.index("FEATURES_READY")
    assert (out / "results.zip").is_file() and (out / "postmortem.json").is_file()
    # the reserve holds the tuning's scoring: its prior until the student's validations measure the metric
    budgets = {e["phase"]: e["data"] for e in _events(out / "journal.jsonl") if e["event"] == "TIME_BUDGET_STATE"}
    assert budgets["features"]["score_s_per_mvoxel"] == 0.5 and budgets["segmentation"]["score_s_per_mvoxel"] != 0.5
    # and each test mask's clean-up and checkpoint, once measured (the student's validations, the checkpoints before)
    assert budgets["features"]["cleanup_s_per_mvoxel"] == 0 and budgets["segmentation"]["cleanup_s_per_mvoxel"] > 0 and budgets["segmentation"]["checkpoint_s"] > 0
    assert names.count("PHASE_START") == names.count("PHASE_END") == 6
    profile = json.loads((out / "RUN_PROFILE_SUMMARY.json").read_text())
    assert abs(sum(profile["phase_seconds"].values()) - profile["wall_s"]) <= 0.05 * profile["wall_s"]
    assert 0 < profile["shares"]["journal"] < 0.02
    assert profile["candidate_iterations"] == 2 * 135 * 120 and profile["candidates_per_s"] > 0
    post = json.loads((out / "postmortem.json").read_text())
    assert post["status"] == "complete" and post["bottleneck_phase"] in profile["phase_seconds"]
    assert all(v == 100.0 for k, v in post["phase_percent_done"].items() if k != "distillation")
    stats = json.loads((out / "GLOBAL_STATS.json").read_text())
    reads = next(e["data"]["volume_reads"] for e in _events(out / "journal.jsonl") if e["event"] == "DISTILLATION_END")
    assert stats["files_processed"] == 6 + reads + 2 and reads == 4 and stats["materials"] > 0 and stats["anchored_voxels"] > 0
    assert stats["active_weights"]["total"]["end"] > 0 and len(stats["active_weights"]["per_candidate"]) == 135
    previews = sorted(p.name for p in (out / "previews").glob("*.png"))
    assert previews == sorted([n.replace(".tif", ".png") for n in masks] + ["training_curve.png"])
    roadmap = json.loads((out / "roadmap_realtime.json").read_text())
    assert roadmap["global_progress_percent"] == 100.0 and roadmap["train_progress_percent"] == 100.0
    assert "PROGRESS_INTEGRITY_ALERT" not in names
    with zipfile.ZipFile(out / "results.zip") as zf:
        assert "journal.jsonl" in zf.namelist()
        newest = sorted((out / "checkpoints").glob("ckpt-*"))[-1].name
        assert {n.split("/")[1] for n in zf.namelist() if n.startswith("checkpoints/")} == {newest}  # the older ones stay in the folder only
        kinds = {i.filename: i.compress_type for i in zf.infolist()}
        assert kinds["journal.jsonl"] == zipfile.ZIP_DEFLATED  # text deflates; tensors are stored (deflating GBs of them took minutes)
        assert {k for n, k in kinds.items() if n.endswith(".safetensors")} == {zipfile.ZIP_STORED}


def test_score_cli_prints_json(reference: dict, demo_data: Path) -> None:
    proc = run_cli("score", "--truth", str(demo_data / "test_labels"), "--pred", str(reference["out"] / "submission.zip"))
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)
    assert set(scores) == {n[:-4] for n in reference["masks"]} | {"mean"}
    for vol_id, parts in scores.items():
        if vol_id != "mean":
            assert set(parts) == {"surface_dice", "voi_score", "topo_score", "score", "topo_counts"}
    assert 0.5 < scores["mean"] <= 1.0
    # the official metric's numbers, rebuilt from the reference parts
    from .reference_metric import reference_score, require_reference_module

    module = require_reference_module()
    for name, mask in reference["masks"].items():
        expected, counts = reference_score(mask, tifffile.imread(demo_data / "test_labels" / name), module)
        got = scores[name[:-4]]
        assert [[c["matched"], c["pred"], c["truth"]] for c in got["topo_counts"].values()] == counts.tolist()
        assert all(got[k] == pytest.approx(v, abs=1e-9, rel=0) for k, v in expected.items())


def test_the_validation_report_is_the_official_metric(reference: dict, demo_data: Path) -> None:
    """The baseline's score in ``VALIDATION_REPORT`` equals the reference metric's on the same validation masks."""
    from nx46vx.config import load_config
    from nx46vx.segment import intensity_baseline

    from .reference_metric import reference_score, require_reference_module

    module = require_reference_module()
    report = next(e["data"] for e in _events(reference["out"] / "journal.jsonl") if e["event"] == "VALIDATION_REPORT")
    seg = load_config("demo", overrides=FAST).segment
    expected = []
    for vol_id in report["volumes"]:
        image = tifffile.imread(demo_data / "train_images" / f"{vol_id}.tif")
        labels = tifffile.imread(demo_data / "train_labels" / f"{vol_id}.tif")
        expected.append(reference_score(intensity_baseline(image, seg), labels, module)[0]["score"])
    assert report["scores"]["intensity_baseline"] == pytest.approx(float(np.mean(expected)), abs=1e-9, rel=0)


def test_foreign_layout_with_kaggle_nesting(tmp_path: Path) -> None:
    """A hand-made folder (not from nx46vx.synthetic) under the competitions/ mount works."""
    root = tmp_path / "input" / "competitions" / "vesuvius-challenge-surface-detection"
    for sub in ("train_images", "train_labels", "test_images"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, shape in enumerate([(20, 24, 22), (22, 20, 24), (24, 22, 20)]):
        label = np.zeros(shape, np.uint8)
        label[:, shape[1] // 2 : shape[1] // 2 + 2, :] = 1
        label[: shape[0] // 3] = 2
        image = np.clip(40 + 150 * (label == 1) + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
        tifffile.imwrite(root / "train_images" / f"{10 + i}.tif", image, compression="lzw")
        tifffile.imwrite(root / "train_labels" / f"{10 + i}.tif", label, compression="lzw")
        rows.append(f"{10 + i},1")
    tifffile.imwrite(root / "test_images" / "1407735.tif", rng.integers(0, 255, (18, 26, 21), dtype=np.uint8), compression="lzw")
    (root / "train.csv").write_text("id,scroll_id\n" + "\n".join(rows) + "\n")
    (root / "test.csv").write_text("id,scroll_id\n1407735,1\n")
    result = nx46vx.run([tmp_path / "input"], output=tmp_path / "out", profile="demo", overrides=FAST + ["search.max_epochs=1"])
    assert result.status == "complete"
    assert _masks(result.submission)["1407735.tif"].shape == (18, 26, 21)


def test_unwritable_output_fails_before_training(demo_data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputNotWritableError) as err:
        nx46vx.run([demo_data], output=blocker / "out", profile="demo")
    assert "expected a writable folder" in str(err.value)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(OutputNotWritableError):
            nx46vx.run([demo_data], output=ro, profile="demo")


# ----------------------------------------------------------------------------- kill parity and resume


def _kill_points(reference: dict, k: int) -> int:
    """The k-th of five seeded crash indices, over every crash point of the reference run (events and writes)."""
    n_events = len(_events(reference["out"] / "journal.jsonl"))
    return int(sorted(np.random.default_rng(46).choice(np.arange(3, n_events), size=5, replace=False))[k])


def _baseline_submission_holds(out: Path, demo_data: Path) -> None:
    """Once the baseline's SUBMISSION_WRITTEN is journaled, submission.zip is valid."""
    if "SUBMISSION_WRITTEN" not in [e["event"] for e in _events(out / "journal.jsonl")]:
        return
    from nx46vx.package import validate_submission

    shapes = {p.stem: tifffile.imread(p).shape for p in (demo_data / "test_images").glob("*.tif")}
    validate_submission(out / "submission.zip", shapes)


@pytest.mark.parametrize("k", range(5))
def test_kill_parity_at_seeded_points(k: int, reference: dict, demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kill_at = f"*:{_kill_points(reference, k)}"
    killed = run_cli(*run_args(demo_data, out), env={"NX46VX_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-2000:])
    _baseline_submission_holds(out, demo_data)
    resumed = run_cli(*run_args(demo_data, out))
    result = assert_parity(out, resumed, reference)
    previous = sorted((out / "journals").glob("journal-*.jsonl"))[-1]
    assert verify(out / "journal.jsonl", previous=previous).ok
    if result["resumed_from"] is not None:
        names = [e["event"] for e in _events(out / "journal.jsonl")]
        assert "RESUME_OK" in names and "PHASE_WEIGHT_CALIBRATION" in names


def _distillation_kill_point(reference: dict, where: str) -> tuple[str, int]:
    """``(NX46VX_KILL_AT, student steps finished at the kill)`` for a kill inside the student's training, around its step 20.

    ``step``: after the loss of step 17, before its update is journaled (the last checkpoint is step 10's);
    ``validation``: after step 20's validation scored, before its checkpoint holds the best weights;
    ``checkpoint``: step 20's checkpoint payload fsynced, before the rename that commits it.
    """
    if where == "step":
        return "DISTILLATION_LOSS_STEP:17", 17
    journal = _events(reference["out"] / "journal.jsonl")
    names = [e["event"] for e in journal]
    if where == "validation":
        validations = [e["data"]["step"] for e in journal if e["event"] == "DISTILLATION_VALIDATION"]
        return f"DISTILLATION_VALIDATION:{validations.index(20) + 1}", 20
    second = [i for i, name in enumerate(names) if name == "DISTILLATION_CHECKPOINT_WRITTEN"][1]
    return f"checkpoint_payload_written:{names[:second].count('CHECKPOINT_WRITTEN')}", 20


@pytest.mark.parametrize("where", ["step", "validation", "checkpoint"])
def test_kill_parity_inside_the_students_training(where: str, reference: dict, demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kill_at, steps_done = _distillation_kill_point(reference, where)
    killed = run_cli(*run_args(demo_data, out), env={"NX46VX_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-2000:])
    killed_names = [e["event"] for e in _events(out / "journal.jsonl")]
    assert killed_names.count("DISTILLATION_LOSS_STEP") == steps_done and "DISTILLATION_END" not in killed_names
    resumed = run_cli(*run_args(demo_data, out))
    assert_parity(out, resumed, reference)
    journal = _events(out / "journal.jsonl")
    names = [e["event"] for e in journal]
    assert verify(out / "journal.jsonl", previous=sorted((out / "journals").glob("journal-*.jsonl"))[-1]).ok
    # resumed from step 10's committed checkpoint: no search iteration again, the student's steps from 11 on
    assert "RESUME_OK" in names and "FIT_ITER" not in names
    assert next(e["data"]["step"] for e in journal if e["event"] == "DISTILLATION_BATCH_BEGIN") == 11


def test_kill_parity_mid_training_keeps_partial_reports(reference: dict, demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = run_cli(*run_args(demo_data, out), env={"NX46VX_KILL_AT": "FIT_ITER:57"})
    assert killed.returncode == -signal.SIGKILL
    roadmap = json.loads((out / "roadmap_realtime.json").read_text())
    assert 0 < roadmap["global_progress_percent"] < 100 and roadmap["phase"] == "search"
    stats = json.loads((out / "GLOBAL_STATS.json").read_text())
    assert stats["phase"] == "features" and stats["files_processed"] == 6
    _baseline_submission_holds(out, demo_data)
    result = assert_parity(out, run_cli(*run_args(demo_data, out)), reference)
    assert result["resumed_from"] is not None


# A budget whose time-driven decisions (the feature subset) are taken before the kill: a virtual clock makes
# both runs take the same ones, and the resumed run must replay them rather than decide again.
TIMED = ["--set", "budget.total_s=1000", "--set", "budget.margin_s=60", "--set", "budget.features_share=0.25", "--set", "budget.search_share=0.45"]
TIMED_CLOCK = "tick=0.001,features_volume=60"


def _replayed_after_a_kill(demo_data: Path, tmp_path: Path, extra: list[str], clock: str, kill_at: str) -> tuple[list[dict], list[dict]]:
    """A reference run under the virtual ``clock``, a run killed at ``kill_at`` under it, then resumed under a clock that costs
    nothing: parity holds only if the resumed session replays the killed one's time-driven decisions. Returns both journals."""
    ref_out = tmp_path / "ref"
    ref = run_cli(*run_args(demo_data, ref_out, *extra), env={"NX46VX_VIRTUAL_CLOCK": clock})
    assert ref.returncode == 0, ref.stderr
    reference = {"result": json.loads(ref.stdout), "masks": _masks(ref_out / "submission.zip")}
    out = tmp_path / "out"
    killed = run_cli(*run_args(demo_data, out, *extra), env={"NX46VX_VIRTUAL_CLOCK": clock, "NX46VX_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(*run_args(demo_data, out, *extra), env={"NX46VX_VIRTUAL_CLOCK": "tick=0.001"})
    assert_parity(out, resumed, reference)
    return _events(ref_out / "journal.jsonl"), _events(out / "journal.jsonl")


def test_kill_parity_after_time_driven_decisions(demo_data: Path, tmp_path: Path) -> None:
    ref, resumed = _replayed_after_a_kill(demo_data, tmp_path, TIMED, TIMED_CLOCK, "FIT_ITER:100")
    subset = [e["data"] for e in ref if e["event"] == "FEATURES_SUBSET"]
    assert subset and subset[0]["skipped"], "the budget must force a feature subset"
    replayed = [e["data"] for e in resumed if e["event"] == "FEATURES_SUBSET"]
    assert replayed and replayed[0]["replayed"] and replayed[0]["chosen"] == subset[0]["chosen"]


def test_the_teacher_maps_cut_for_time_are_replayed_after_a_kill(demo_data: Path, tmp_path: Path) -> None:
    """Teacher maps cost 300 virtual seconds a volume: half the student's subset fits; a resumed session replays that half."""
    ref, resumed = _replayed_after_a_kill(demo_data, tmp_path, [*TIMED, "--set", "distill.teacher_input=false"], "tick=0.001,teacher_volume=300",
                                          "DISTILLATION_LOSS_STEP:15")
    end = next(e["data"] for e in ref if e["event"] == "DISTILLATION_END")
    assert end["teacher_coverage_percent"] == {"ensemble": 50.0} and end["steps"] == 30  # 2 of 4 maps, then the whole schedule
    end = next(e["data"] for e in resumed if e["event"] == "DISTILLATION_END")
    assert end["teacher_coverage_percent"] == {"ensemble": 100.0}  # of the replayed subset: the same two volumes
    assert len(list((tmp_path / "out" / "cache" / "teachers").glob("*.npz"))) == 2


def test_a_student_whose_validation_cannot_fit_is_not_trained(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The student's inference is priced before its teachers' maps: when one validation outlasts the phase, nothing is computed for it."""
    from nx46vx.governor import VirtualClock
    from nx46vx.package import validate_submission
    from nx46vx.runner import schedule

    monkeypatch.setattr(schedule, "seconds_per_window", lambda *_a: 1000.0)  # a window far dearer than the budget
    out = tmp_path / "out"
    clock = VirtualClock(tick=0.001)
    result = nx46vx.run([demo_data], output=out, profile="demo", overrides=FAST + ["budget.total_s=600", "budget.margin_s=10"], clock=clock)
    events = _events(out / "journal.jsonl")
    names = [e["event"] for e in events]
    priced = next(e["data"] for e in events if e["event"] == "DISTILLATION_INFERENCE")
    skipped = next(e["data"] for e in events if e["event"] == "DISTILLATION_SKIPPED")
    assert priced["predicted_validation_s"] > priced["phase_time_left_s"] and skipped["reason"].startswith("time:")
    assert names.index("DISTILLATION_INFERENCE") < names.index("DISTILLATION_SKIPPED") and "DISTILLATION_BATCH_BEGIN" not in names
    assert not list((out / "cache" / "teachers").glob("*.npz"))  # no teacher map for a student that cannot train
    assert priced["reserve_s"] == 300.0  # the student's test inference is reserved (capped at half the budget) before any step
    assert result.segmenter != "student" and clock.now < 600
    validate_submission(result.submission, {p.stem: tifffile.imread(p).shape for p in (demo_data / "test_images").glob("*.tif")})


@pytest.fixture(scope="module")
def partial_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where outputs of runs killed at an event are kept, one per kill point, to be copied for each test (the runs are deterministic)."""
    return tmp_path_factory.mktemp("partial")


def _partial_run(demo_data: Path, out: Path, kill_at: str = "FIT_ITER:150", *, cache: Path | None = None) -> None:
    kept = cache / kill_at.replace(":", "-") if cache is not None else None
    if kept is not None and kept.is_dir():
        shutil.copytree(kept, out)
        return
    killed = run_cli(*run_args(demo_data, out), env={"NX46VX_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL
    if kept is not None:
        shutil.copytree(out, kept)


def test_attach_previous_output_or_results_zip(reference: dict, demo_data: Path, tmp_path: Path, partial_runs: Path) -> None:
    run1 = tmp_path / "run1"
    _partial_run(demo_data, run1, "FIT_ITER:150", cache=partial_runs)
    # attach the whole previous output folder
    run2 = tmp_path / "run2"
    proc = run_cli(*run_args(demo_data, run2, "--input", str(run1)))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model_digest"] == reference["result"]["model_digest"]
    assert run_cli("verify", str(run2 / "journal.jsonl"), "--previous", str(run1 / "journal.jsonl")).returncode == 0
    # attach only a results.zip built from run 1's folder
    only_zip = tmp_path / "attached"
    only_zip.mkdir()
    with zipfile.ZipFile(only_zip / "results.zip", "w") as zf:
        for f in sorted((run1 / "checkpoints").rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(run1).as_posix())
    run3 = tmp_path / "run3"
    proc = run_cli(*run_args(demo_data, run3, "--input", str(only_zip)))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model_digest"] == reference["result"]["model_digest"]
    ok = [e for e in _events(run3 / "journal.jsonl") if e["event"] == "RESUME_OK"]
    assert ok and ".attached" in ok[0]["data"]["checkpoint"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_newest_checkpoint_falls_back(damage: str, reference: dict, demo_data: Path, tmp_path: Path, partial_runs: Path) -> None:
    out = tmp_path / "out"
    _partial_run(demo_data, out, cache=partial_runs)
    ckpts = sorted((out / "checkpoints").glob("ckpt-*"))
    newest = ckpts[-1] / "search.safetensors"
    if damage == "flip":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0x01
        newest.write_bytes(bytes(data))
    elif damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:100])
    else:
        newest.unlink()
    proc = run_cli(*run_args(demo_data, out))
    assert proc.returncode == 0, proc.stderr
    events = _events(out / "journal.jsonl")
    corrupt = [e for e in events if e["event"] == "CHECKPOINT_CORRUPT"]
    resumed = [e for e in events if e["event"] == "RESUME_OK"]
    assert corrupt and corrupt[0]["data"]["checkpoint"].endswith(ckpts[-1].name)
    assert resumed and resumed[0]["data"]["checkpoint"].endswith(ckpts[-2].name)
    assert json.loads(proc.stdout)["model_digest"] == reference["result"]["model_digest"]


@pytest.mark.parametrize(
    "change,kept,field",
    [("search.meta_neurons=8", ["discovery", "features"], "search.grid.meta_neurons"), ("features.hessian_sigma=2.0", ["discovery"], "features.spec.hessian_sigma")],
)
def test_changed_setting_redoes_its_phase_and_later_ones(
    change: str, kept: list[str], field: str, demo_data: Path, tmp_path: Path, partial_runs: Path
) -> None:
    out = tmp_path / "out"
    _partial_run(demo_data, out, "FIT_ITER:30", cache=partial_runs)
    proc = run_cli(*run_args(demo_data, out, "--set", change, "--set", "search.max_epochs=1", "--set", "distill.enabled=false"))
    assert proc.returncode == 0, proc.stderr
    partial = [e["data"] for e in _events(out / "journal.jsonl") if e["event"] == "RESUME_PARTIAL"]
    assert partial and partial[0]["kept"] == kept and partial[0]["redone"][0] == ["discovery", "features", "search"][len(kept)]
    assert field in partial[0]["changed"] and partial[0]["changed"][field][0] != partial[0]["changed"][field][1]


def test_other_data_or_an_old_format_is_incompatible(demo_data: Path, tmp_path: Path, partial_runs: Path) -> None:
    out = tmp_path / "out"
    _partial_run(demo_data, out, "FIT_ITER:30", cache=partial_runs)
    other = tmp_path / "other"
    shutil.copytree(demo_data, other)
    first = sorted((other / "train_images").glob("*.tif"))[0]
    image = tifffile.imread(first)
    image[0, 0, :4] ^= 0xFF
    tifffile.imwrite(first, image, compression="lzw")
    quick = ("--set", "search.max_epochs=1", "--set", "search.max_iter=5", "--set", "distill.enabled=false")
    proc = run_cli(*run_args(other, out, *quick))
    assert proc.returncode == 0, proc.stderr
    found = [e["data"] for e in _events(out / "journal.jsonl") if e["event"] == "RESUME_INCOMPATIBLE"]
    assert found and found[0]["field"] == "discovery.data"
    assert "RESUME_OK" not in [e["event"] for e in _events(out / "journal.jsonl")]
    # a checkpoint of the previous format (pickled payloads) is never read
    old = tmp_path / "old"
    old_ckpt = old / "checkpoints" / "ckpt-00000000"
    old_ckpt.mkdir(parents=True)
    (old_ckpt / "search.pt").write_bytes(b"not read")
    import hashlib

    manifest = {"format": 1, "seq": 0, "ts_ns": 1, "sha512": {"search.pt": hashlib.sha512(b"not read").hexdigest()}}
    (old_ckpt / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli(*run_args(demo_data, tmp_path / "fresh", "--input", str(old), *quick))
    assert proc.returncode == 0, proc.stderr
    found = [e["data"] for e in _events(tmp_path / "fresh" / "journal.jsonl") if e["event"] == "RESUME_INCOMPATIBLE"]
    assert found and found[0]["field"] == "format" and found[0]["found"] == 1


def _copy_of(reference: dict, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    return out


def test_only_distill_changed_keeps_the_search(reference: dict, demo_data: Path, tmp_path: Path) -> None:
    out = _copy_of(reference, tmp_path)
    nx46vx.run([demo_data], output=out, profile="demo", overrides=FAST + ["distill.steps=20"])
    journal = _events(out / "journal.jsonl")
    names = [e["event"] for e in journal]
    partial = next(e["data"] for e in journal if e["event"] == "RESUME_PARTIAL")
    assert partial["kept"] == ["discovery", "features", "search"] and partial["changed"] == {"distillation.steps": [30, 20]}
    assert names.count("FIT_ITER") == 0 and names.count("FEATURES_READY") == 0
    assert names.count("DISTILLATION_LOSS_STEP") == 20


def test_only_segment_changed_keeps_all_training(reference: dict, demo_data: Path, tmp_path: Path) -> None:
    out = _copy_of(reference, tmp_path)
    result = nx46vx.run([demo_data], output=out, profile="demo", overrides=FAST + ["segment.min_component_voxels=8"])
    journal = _events(out / "journal.jsonl")
    names = [e["event"] for e in journal]
    partial = next(e["data"] for e in journal if e["event"] == "RESUME_PARTIAL")
    assert partial["kept"] == ["discovery", "features", "search", "distillation"] and partial["redone"] == ["segmentation", "packaging"]
    assert names.count("FIT_ITER") == names.count("DISTILLATION_LOSS_STEP") == names.count("FEATURES_READY") == 0
    assert result.model_digest == reference["result"]["model_digest"] and "VALIDATION_REPORT" in names
    # nothing changed: nothing is redone, not even the test volumes
    again = nx46vx.run([demo_data], output=out, profile="demo", overrides=FAST + ["segment.min_component_voxels=8"])
    names = [e["event"] for e in _events(out / "journal.jsonl")]
    assert "RESUME_PARTIAL" not in names and names.count("VOLUME_SEGMENTED") == 0 and "VALIDATION_REPORT" not in names
    assert again.model_digest == result.model_digest
    assert all(np.array_equal(a, b) for a, b in zip(_masks(again.submission).values(), _masks(result.submission).values()))
    # new test volumes (the scoring rerun's hidden set): only they are segmented, with the kept choice, and recorded
    extra = tmp_path / "data"
    shutil.copytree(demo_data, extra)
    first = sorted((extra / "test_images").glob("*.tif"))[0]
    for new_id in ("998", "999"):
        shutil.copy(first, extra / "test_images" / f"{new_id}.tif")
    (extra / "test.csv").write_text((extra / "test.csv").read_text() + "998,1\n999,1\n")
    nx46vx.run([extra], output=out, profile="demo", overrides=FAST + ["segment.min_component_voxels=8"])
    segmented = [e["data"]["id"] for e in _events(out / "journal.jsonl") if e["event"] == "VOLUME_SEGMENTED"]
    assert sorted(segmented) == ["998", "999"] and {"998.tif", "999.tif"} <= set(_masks(out / "submission.zip"))
    nx46vx.run([extra], output=out, profile="demo", overrides=FAST + ["segment.min_component_voxels=8"])
    assert "VOLUME_SEGMENTED" not in [e["event"] for e in _events(out / "journal.jsonl")]  # its mask was checkpointed


def test_attached_output_lends_its_feature_cache(reference: dict, demo_data: Path, tmp_path: Path) -> None:
    """A fresh output folder attached to a previous one computes no feature (its cache is reused after a checksum)."""
    result = nx46vx.run([demo_data, reference["out"]], output=tmp_path / "fresh", profile="demo",
                        overrides=FAST + ["search.max_iter=10", "search.max_epochs=1", "distill.enabled=false"])
    journal = _events(tmp_path / "fresh" / "journal.jsonl")
    ready = [e["data"] for e in journal if e["event"] == "FEATURES_READY"]
    assert len(ready) == 6 and {d["source"] for d in ready} == {"attached"}
    end = next(e["data"] for e in journal if e["event"] == "PHASE_END" and e["phase"] == "features")
    assert end["computed"] == 0 and end["attached_hits"] == 6
    assert result.status == "complete"
    assert len(list((tmp_path / "fresh" / "cache" / "features").glob("*.npz"))) == 6  # copied for the next session


def test_sigterm_stops_gracefully(demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = run_args(demo_data, out, "--set", "search.max_epochs=200", "--set", "search.patience=200")
    proc = subprocess.Popen([sys.executable, "-m", "nx46vx.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = out / "journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (journal.is_file() and b"FIT_ITER" in journal.read_bytes()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["status"] == "stopped_by_signal"
    assert (out / "submission.zip").is_file()
    names = [e["event"] for e in _events(journal)]
    assert "PRETIMEOUT_FLUSH" in names and names[-1] == "RUN_END"
    assert verify(journal).ok


@pytest.mark.parametrize("budget", [60, 200])
def test_governor_returns_inside_budget(budget: int, demo_data: Path, tmp_path: Path) -> None:
    """The governor's virtual clock stands in for real time: every reading costs 50 ms, deterministic."""
    from nx46vx.governor import VirtualClock

    out = tmp_path / "out"
    overrides = FAST + [f"budget.total_s={budget}", "budget.margin_s=5", "search.max_epochs=500", "search.patience=500", "progress.interval_s=5"]
    clock = VirtualClock(tick=0.05)
    result = nx46vx.run([demo_data], output=out, profile="demo", overrides=overrides, clock=clock)
    assert clock.now < budget
    assert result.status == "stopped_by_deadline"
    assert _masks(result.submission)
    events = _events(out / "journal.jsonl")
    names = [e["event"] for e in events]
    assert "PRETIMEOUT_FLUSH" in names
    shares = {e["phase"]: e["data"]["phase_share"] for e in events if e["event"] == "TIME_BUDGET_STATE" and e["data"].get("phase_share") is not None}
    assert shares == {"features": 0.1, "search": 0.1, "distillation": pytest.approx(0.8)}  # the demo profile's shares
    # the reported global progress is the one computed from the cursor (full grid in one batch, 2 epochs… capped at 500)
    roadmap = json.loads((out / "roadmap_realtime.json").read_text())
    c = roadmap["cursor"]
    epoch_fraction = (c["candidate"] * 120 + c["iter"] * 135) / (135 * 120)
    train = (c["epoch"] + epoch_fraction) / 500
    w = roadmap["weights"]
    expected = (w["discovery"] + w["features"] + w["segmentation"] + w["packaging"] + w["search"] * train + w["distillation"] * roadmap["phase_percent"]["distillation"] / 100) / sum(w.values())
    assert roadmap["global_progress_percent"] == pytest.approx(100 * expected, abs=1e-4)
    assert roadmap["global_progress_percent"] < 100
    # progress never stalls while the cursor advances
    seen = [(e["data"]["cursor"], e["data"]["global_progress_percent"]) for e in events if e["event"] == "GLOBAL_PROGRESS_REALTIME" and e["data"]["phase"] == "search"]
    for (c1, g1), (c2, g2) in zip(seen, seen[1:]):
        if (c2["epoch"], c2["candidate"], c2["iter"]) > (c1["epoch"], c1["candidate"], c1["iter"]):
            assert g2 > g1
    assert "PROGRESS_INTEGRITY_ALERT" not in names
    if budget != 60:
        return
    # a later session continues from the flush checkpoint
    later = nx46vx.run([demo_data], output=out, profile="demo", overrides=overrides, clock=VirtualClock(tick=0.05))
    assert later.resumed_from is not None
    assert (later.cursor["epoch"], later.cursor["candidate"], later.cursor["iter"]) > (c["epoch"], c["candidate"], c["iter"])


def test_the_schedule_is_revised_once_on_the_steps_after_the_warm_up(demo_data: Path, tmp_path: Path) -> None:
    """Warm-up steps cost 3 s, later ones 1 s: five steps after the layout the schedule is laid out again on them (about
    three times as many steps), the revision is stored by a checkpoint at once, and the revised schedule is trained to its end."""
    from nx46vx.governor import VirtualClock

    class QuickeningClock(VirtualClock):
        def charge(self, point: str) -> None:
            super().charge(point)
            self.steps = getattr(self, "steps", 0) + (point == "distill_step")
            if self.steps == 5:  # the warm-up's steps
                self.costs["distill_step"] = 1.0

    clock = QuickeningClock(tick=0.001, costs={"distill_step": 3.0})
    overrides = FAST + ["distill.steps=0", "distill.val_every=1000", "budget.total_s=300", "budget.margin_s=5", "search.max_epochs=1"]
    nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=overrides, clock=clock)
    events = [e for e in _events(tmp_path / "out" / "journal.jsonl") if e["phase"] == "distillation"]
    laid_out, revised = [e["data"] for e in events if e["event"] == "DISTILLATION_SCHEDULE"]
    assert (laid_out["reason"], revised["reason"]) == ("budget", "revised")
    assert laid_out["seconds_per_step"] == pytest.approx(3.0, abs=0.05) and revised["seconds_per_step"] == pytest.approx(1.0, abs=0.05)
    assert revised["schedule_steps"] > 2 * laid_out["schedule_steps"]
    names = [e["event"] for e in events]
    at = names.index("DISTILLATION_SCHEDULE", names.index("DISTILLATION_SCHEDULE") + 1)
    written = next(e["data"]["step"] for e in events[at:] if e["event"] == "DISTILLATION_CHECKPOINT_WRITTEN")
    steps_before = [e["data"]["step"] for e in events[:at] if e["event"] == "DISTILLATION_BATCH_END"]
    assert written == steps_before[-1] == 10  # the decision is stored with the step it was made after
    end = next(e["data"] for e in events if e["event"] == "DISTILLATION_END")
    assert (end["steps"], end["schedule_steps"], end["stopped"]) == (revised["schedule_steps"], revised["schedule_steps"], None)
    saved = ckpt.load_payload(ckpt.latest_committed(tmp_path / "out" / "checkpoints"), "distillation")
    assert saved["student"]["schedule_steps"] == revised["schedule_steps"]


def test_the_agreement_probe_after_the_last_step_is_set_aside(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The student's agreement with its teacher is probed before its first step and after its last: timed at 15 s the first
    time, the second probe is planned for like the last validation, and the segmentation starts within the training deadline."""
    from nx46vx import distill
    from nx46vx.governor import VirtualClock

    clock = VirtualClock(tick=0.001, costs={"distill_step": 1.0})
    agreement = distill.agreement

    def slow(student, probe, **options):  # type: ignore[no-untyped-def]
        clock.now += 15.0
        return agreement(student, probe, **options)

    monkeypatch.setattr(distill, "agreement", slow)
    overrides = FAST + ["distill.steps=0", "distill.val_every=1000", "budget.total_s=300", "budget.margin_s=5", "search.max_epochs=1"]
    nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=overrides, clock=clock)
    events = _events(tmp_path / "out" / "journal.jsonl")
    end = next(e["data"] for e in events if e["event"] == "DISTILLATION_END")
    assert end["agreement_probe_s"] >= 15.0 and end["agreement_after"] is not None and end["stopped"] is None
    segmentation = next(e["data"] for e in events if e["event"] == "TIME_BUDGET_STATE" and e["phase"] == "segmentation")
    assert segmentation["elapsed_s"] <= segmentation["training_deadline_s"]


def _dear_price(price: Callable[..., Any], *, test_s: float) -> Callable[..., Any]:
    """:func:`~nx46vx.runner.schedule.price_inference` with the student's window priced so that its test volumes take ``test_s``."""

    def dear(ctx, state, student, cfg, val_shapes):  # type: ignore[no-untyped-def]
        priced = price(ctx, state, student, cfg, val_shapes)
        return dataclasses.replace(priced, window_s=test_s / max(1, priced.test_windows), test_s_per_voxel=test_s / max(1, state.test_voxels))

    return dear


def test_a_window_timed_cheaper_before_the_schedule_replaces_the_price_before_training(demo_data: Path, tmp_path: Path,
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The student's test inference is priced at 40 s before it trains (a slow spell); its window timed again when the schedule
    is laid out costs what it does: the lower price replaces it in the reserve before the schedule is laid out on it, which
    then fills the time without an extension."""
    import importlib

    from nx46vx.governor import VirtualClock

    distillation = importlib.import_module("nx46vx.runner.phases.distillation")
    monkeypatch.setattr(distillation, "price_inference", _dear_price(distillation.price_inference, test_s=40.0))
    clock = VirtualClock(tick=0.001, costs={"distill_step": 1.0})
    overrides = FAST + ["distill.steps=0", "distill.val_every=1000", "budget.total_s=300", "budget.margin_s=5", "search.max_epochs=1"]
    nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=overrides, clock=clock)
    events = [e for e in _events(tmp_path / "out" / "journal.jsonl") if e["phase"] == "distillation"]
    names = [e["event"] for e in events]
    priced = next(e["data"] for e in events if e["event"] == "DISTILLATION_INFERENCE")
    retimed = next(e["data"] for e in events if e["event"] == "DISTILLATION_INFERENCE_RETIMED")
    assert priced["predicted_test_s"] == pytest.approx(40.0) and retimed["seconds_per_window"] < retimed["held_seconds_per_window"]
    assert retimed["reserve_s"] < priced["reserve_s"] - 40.0  # 40 s × the 1.3 safety, less the few the re-timed window costs
    assert names.index("DISTILLATION_INFERENCE_RETIMED") < names.index("DISTILLATION_SCHEDULE")  # laid out on the lower price
    schedules = [e["data"] for e in events if e["event"] == "DISTILLATION_SCHEDULE"]
    assert [s["reason"] for s in schedules] == ["budget", "revised"]
    end = next(e["data"] for e in events if e["event"] == "DISTILLATION_END")
    assert (end["steps"], end["schedule_steps"], end["stopped"]) == (schedules[-1]["schedule_steps"],) * 2 + (None,)
    assert schedules[0]["time_left_s"] > priced["phase_time_left_s"] + 40.0  # the time the dear price held went to the steps


def test_the_schedule_is_extended_when_a_validation_shrinks_the_reserve(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The student's test inference is priced at 40 s before it trains, and its window timed again before the schedule is
    laid out is no cheaper (a slow spell): the schedule is laid out short. Its first validation measures the inference
    anew, the price is replaced, the reserve shrinks, and the schedule is extended over the time it frees; the extension is
    stored by a checkpoint at once and trained to its end, and the segmenter choice prices the student as last measured."""
    import importlib

    from nx46vx.governor import VirtualClock

    distillation = importlib.import_module("nx46vx.runner.phases.distillation")
    monkeypatch.setattr(distillation, "price_inference", _dear_price(distillation.price_inference, test_s=40.0))
    monkeypatch.setattr(distillation, "seconds_per_window", lambda *_a, **_k: math.inf)
    clock = VirtualClock(tick=0.001, costs={"distill_step": 1.0})
    overrides = FAST + ["distill.steps=0", "distill.val_every=20", "budget.total_s=300", "budget.margin_s=5", "search.max_epochs=1"]
    nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=overrides, clock=clock)
    events = [e for e in _events(tmp_path / "out" / "journal.jsonl") if e["phase"] == "distillation"]
    assert next(e["data"] for e in events if e["event"] == "DISTILLATION_INFERENCE")["predicted_test_s"] == pytest.approx(40.0)
    schedules = [e["data"] for e in events if e["event"] == "DISTILLATION_SCHEDULE"]
    assert [s["reason"] for s in schedules][:3] == ["budget", "revised", "extended"] and {s["reason"] for s in schedules[3:]} <= {"extended"}
    assert schedules[2]["schedule_steps"] > schedules[1]["schedule_steps"] + 20  # the 40 s price × 1.3 safety, at 1 s a step
    names = [e["event"] for e in events]
    at = len(names) - 1 - names[::-1].index("DISTILLATION_SCHEDULE")
    assert names[at - 1] == "DISTILLATION_VALIDATION"  # extended on what a validation measured
    written = next(e["data"]["step"] for e in events[at:] if e["event"] == "DISTILLATION_CHECKPOINT_WRITTEN")
    assert written == events[at - 1]["data"]["step"]  # the decision is stored with the step it was made after
    end = next(e["data"] for e in events if e["event"] == "DISTILLATION_END")
    assert (end["steps"], end["schedule_steps"], end["stopped"]) == (schedules[-1]["schedule_steps"],) * 2 + (None,)
    choice = next(e["data"] for e in _events(tmp_path / "out" / "journal.jsonl") if e["event"] == "SEGMENTER_CHOICE")
    assert choice["excluded_for_time"] == [] and choice["predicted_test_seconds"]["student"] < 1.0  # priced as last measured


def test_the_metrics_compilation_does_not_price_the_metric(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first run on a machine compiles the metric's kernels at their first call (~14 s on 2 cores): here 60 s of the
    virtual clock. The metric and a validation are priced by their work alone, so the reserve stays small and the
    schedule fills the budget (priced by its compilation, the metric cost 100x its work, the reserve took most of a
    600 s run, and the student trained 400 steps instead of 1200)."""
    from nx46vx import betti
    from nx46vx.governor import VirtualClock

    clock = VirtualClock(tick=0.001, costs={"distill_step": 1.0})
    kernel, calls = betti._tile_counts, []

    def first_call_compiles(f, g):  # type: ignore[no-untyped-def]
        clock.now += 60.0 * (not calls)
        calls.append(f.shape)
        return kernel(f, g)

    monkeypatch.setattr(betti, "_tile_counts", first_call_compiles)
    overrides = FAST + ["distill.steps=0", "distill.val_every=1000", "budget.total_s=600", "budget.margin_s=5", "search.max_epochs=1"]
    nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=overrides, clock=clock)
    events = _events(tmp_path / "out" / "journal.jsonl")
    schedule = next(e["data"] for e in events if e["event"] == "DISTILLATION_SCHEDULE" and e["data"]["reason"] == "budget")
    segmentation = next(e["data"] for e in events if e["event"] == "TIME_BUDGET_STATE" and e["phase"] == "segmentation")
    end = next(e["data"] for e in events if e["event"] == "DISTILLATION_END")
    assert calls and schedule["seconds_per_validation"] < 5.0 and segmentation["score_s_per_mvoxel"] < 5.0
    assert end["stopped"] is None and end["steps"] > 300, (schedule, segmentation, end)


def test_an_overrunning_student_schedule_stops_with_its_last_weights_validated(demo_data: Path, tmp_path: Path) -> None:
    """Steps get 4x dearer after the schedule is laid out: the loop stops early, and the weights it trained last are scored."""
    from nx46vx.governor import VirtualClock

    class SlowingClock(VirtualClock):
        def charge(self, point: str) -> None:
            super().charge(point)
            self.steps = getattr(self, "steps", 0) + (point == "distill_step")
            if self.steps == 10:  # after the 5 warm-up steps, the schedule and its revision 5 steps later
                self.costs["distill_step"] = 4.0

    clock = SlowingClock(tick=0.001, costs={"distill_step": 1.0})
    overrides = FAST + ["distill.steps=0", "distill.val_every=1000", "budget.total_s=300", "budget.margin_s=5", "search.max_epochs=1"]
    result = nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=overrides, clock=clock)
    assert clock.now < 300 and _masks(result.submission)
    events = [e for e in _events(tmp_path / "out" / "journal.jsonl") if e["phase"] == "distillation"]
    names = [e["event"] for e in events]
    schedule = [e["data"] for e in events if e["event"] == "DISTILLATION_SCHEDULE"][-1]
    flush = names.index("PRETIMEOUT_FLUSH")
    stopped_at = events[flush]["data"]["distill_step"]
    assert schedule["reason"] == "revised" and 10 < stopped_at < schedule["schedule_steps"]  # the schedule was not finished
    assert names[flush - 1] == "DISTILLATION_VALIDATION" and events[flush - 1]["data"]["step"] == stopped_at
    end = next(e["data"] for e in events if e["event"] == "DISTILLATION_END")
    assert end["steps"] == stopped_at and end["stopped"] == "phase_share"


def test_a_stop_after_a_slow_validation_refits_the_schedule_when_the_next_one_frees_the_time(demo_data: Path, tmp_path: Path,
                                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """One validation late in the schedule, in a slow spell (its inference 10 s a volume more), prices the student's test
    volumes dear: the reserve grows and the deadline stops the steps before the schedule's end. The stop's own validation
    re-measures the inference, the reserve shrinks, and the schedule is laid out again from that step over the time it
    frees (stored by a checkpoint at once); the steps go on to the new end instead of stopping there."""
    import importlib

    from nx46vx.governor import VirtualClock

    distillation = importlib.import_module("nx46vx.runner.phases.distillation")
    window, validations, slow = distillation.sliding_window, [], []
    clock = VirtualClock(tick=0.001, costs={"distill_step": 1.0})

    def slow_once(volume, *args, **kwargs):  # type: ignore[no-untyped-def]
        validations.append(clock.now)
        if clock.now >= 290.0 and len(slow) < 2:  # both volumes of the first validation after 290 s (of a ~390 s schedule)
            slow.append(clock.now)
            clock.now += 10.0
        return window(volume, *args, **kwargs)

    monkeypatch.setattr(distillation, "sliding_window", slow_once)
    overrides = FAST + ["distill.steps=0", "distill.val_every=20", "budget.total_s=400", "budget.margin_s=5", "search.max_epochs=1"]
    result = nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=overrides, clock=clock)
    assert clock.now < 400 and _masks(result.submission)
    events = [e for e in _events(tmp_path / "out" / "journal.jsonl") if e["phase"] == "distillation"]
    names = [e["event"] for e in events]
    steps = [e["data"]["step"] for e in events if e["event"] == "DISTILLATION_VALIDATION" and e["data"]["scored"] == "network"]
    assert len(slow) == 2 and len(validations) == 2 * len(steps)  # the two volumes of one validation were slow
    schedules = [e["data"] for e in events if e["event"] == "DISTILLATION_SCHEDULE"]
    assert "refitted" in [s["reason"] for s in schedules] and "PRETIMEOUT_FLUSH" not in names, [s["reason"] for s in schedules]
    at = names.index("DISTILLATION_SCHEDULE", next(i for i, e in enumerate(events) if e["event"] == "DISTILLATION_SCHEDULE" and e["data"]["reason"] == "refitted") - 1)
    assert names[at - 1] == "DISTILLATION_VALIDATION"  # refitted on what the stop's validation measured
    assert names[at + 1] == "DISTILLATION_CHECKPOINT_WRITTEN" and events[at + 1]["data"]["step"] == events[at - 1]["data"]["step"]
    end = next(e["data"] for e in events if e["event"] == "DISTILLATION_END")
    assert (end["steps"], end["schedule_steps"], end["stopped"]) == (schedules[-1]["schedule_steps"],) * 2 + (None,)


def test_the_segmenter_choice_reuses_the_students_validation_maps(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The best weights' maps from the last validation are what the choice tunes on: the student runs only on the test volumes."""
    import nx46vx.runner.sources as sources
    from nx46vx.segment import postprocess_grid

    calls: list[tuple[int, ...]] = []
    original = sources.sliding_window
    monkeypatch.setattr(sources, "sliding_window", lambda vol, *a, **k: calls.append(vol.shape) or original(vol, *a, **k))
    result = nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=FAST + ["search.max_epochs=1", "segment.method=student", "distill.teacher_input=false"])
    events = _events(tmp_path / "out" / "journal.jsonl")
    best = [e["data"] for e in events if e["event"] == "DISTILLATION_VALIDATION" and e["data"]["kept"]][-1]
    report = next(e["data"] for e in events if e["event"] == "VALIDATION_REPORT")
    assert best["scored"] == "network" and report["params"]["student"] and result.segmenter == "student"
    assert len(calls) == len(list((demo_data / "test_images").glob("*.tif")))  # none on the validation volumes
    assert report["tuned_points"]["student"] == len(list(postprocess_grid(nx46vx.RunConfig().segment))) == 8 and report["scores"]["student"] >= best["score"]  # the plain point is on the grid


def test_many_volumes_under_a_tiny_budget_get_a_feature_subset(tmp_path: Path) -> None:
    """Features cost far more than the budget grants: a seeded subset is used and the run still ends inside its budget."""
    from nx46vx.governor import VirtualClock
    from nx46vx.package import validate_submission
    from nx46vx.synthetic import make_competition

    data = make_competition(tmp_path / "data", n_train=16, n_test=2, shapes=((24, 24, 24),), seed=5)
    clock = VirtualClock(tick=0.001, costs={"features_volume": 30.0})
    overrides = FAST + ["budget.total_s=400", "budget.margin_s=10", "search.max_epochs=1", "distill.steps=5", "output.quota_gb=0.000001"]
    result = nx46vx.run([data], output=tmp_path / "out", profile="demo", overrides=overrides, clock=clock)
    assert clock.now < 400
    journal = _events(tmp_path / "out" / "journal.jsonl")
    subset = next(e["data"] for e in journal if e["event"] == "FEATURES_SUBSET")
    assert subset["skipped"] and len(subset["chosen"]) + len(subset["skipped"]) == 16 and subset["predicted_skipped_s"] > 0
    computed = [e for e in journal if e["event"] == "FEATURES_READY"]
    assert len(computed) == len(subset["chosen"]) < 16
    shapes = {p.stem: tifffile.imread(p).shape for p in (data / "test_images").glob("*.tif")}
    validate_submission(result.submission, shapes)
    assert any(e["event"] == "OUTPUT_QUOTA" for e in journal)  # the tiny quota refused the cache writes, and the run went on
    # the demo's prior-fed student needs the ensemble's map of every training volume: 4 maps for more volumes, so image only, on all of them
    start = next(e["data"] for e in journal if e["event"] == "DISTILLATION_START")
    assert start["teacher_input"] is False and start["teacher_input_off"].startswith("the ensemble's maps cover distill.teacher_volumes = 4 of ")


def test_full_output_disk_fails_before_training(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nx46vx.runner.context as context

    monkeypatch.setattr(context.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OutputNotWritableError) as err:
        nx46vx.run([demo_data], output=tmp_path / "out", profile="demo")
    assert "nearly full" in str(err.value) and "got 1 MiB free" in str(err.value)
    assert not (tmp_path / "out" / "journal.jsonl").exists()


def test_inspect_verifies_a_checkpoint(reference: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sorted((reference["out"] / "checkpoints").glob("ckpt-*"))[-1], ckpt)  # damaged below: a copy
    proc = run_cli("inspect", str(ckpt))
    assert proc.returncode == 0 and "payload files match their SHA-512" in proc.stdout
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for key in ("ts_ns", "run_id", "version", "git_sha", "config_signature", "epoch", "candidate_index", "candidate_total", "iter", "max_iter",
                "best_metrics", "data_cursor", "rng", "merkle_prev", "merkle_curr", "tree_size", "sha512"):
        assert key in manifest, key
    (ckpt / "search.safetensors").write_bytes(b"damaged")
    proc = run_cli("inspect", str(ckpt))
    assert proc.returncode == 2 and "payload checksum mismatch" in proc.stderr


def test_predict_outside_a_run_and_exported_probabilities(reference: dict, demo_data: Path, tmp_path: Path) -> None:
    from nx46vx.errors import CheckpointError, ConfigError, ModelFolderError

    image = sorted((demo_data / "test_images").glob("*.tif"))[0]
    prediction = nx46vx.predict(image, model=reference["out"])
    assert prediction.probability.shape == prediction.mask.shape == tifffile.imread(image).shape
    assert prediction.probability.dtype == np.float32 and 0 <= prediction.probability.min() and prediction.probability.max() <= 1
    assert set(np.unique(prediction.mask)) <= {0, 1}
    again = nx46vx.predict(tifffile.imread(image), model=sorted((reference["out"] / "checkpoints").glob("ckpt-*"))[-1])
    assert np.array_equal(again.probability, prediction.probability)
    with pytest.raises(CheckpointError):
        nx46vx.predict(image, model=tmp_path)
    # the student's maps as uint8 TIFFs beside the submission (only segmentation is redone)
    out = _copy_of(reference, tmp_path)
    nx46vx.run([demo_data], output=out, profile="demo", overrides=FAST + ["segment.method=student", "segment.export_probabilities=true"])
    exported = sorted((out / "probabilities").glob("*.tif"))
    assert [p.name for p in exported] == sorted(p.name for p in (demo_data / "test_images").glob("*.tif"))
    prob = tifffile.imread(exported[0])
    assert prob.dtype == np.uint8 and prob.shape == tifffile.imread(demo_data / "test_images" / exported[0].name).shape and prob.max() > 0
    # the demo's student takes the search ensemble's map as a second input: predict() rebuilds that map from the checkpoint alone
    saved = ckpt.load_payload(ckpt.latest_committed(out / "checkpoints"), "distillation")
    assert saved["network"]["teacher_input"] is True and saved["prior"]["thetas"].shape[0] == saved["network"]["ensemble_k"]
    outside = nx46vx.predict(demo_data / "test_images" / exported[0].name, model=out)
    with pytest.raises(ModelFolderError, match="second input"):  # an nnU-Net model has one input channel
        nx46vx.export_nnunet(out, tmp_path / "nnunet")
    with pytest.raises(ConfigError, match="inference"):
        nx46vx.predict(image, model=out, inference="monai")
    assert np.abs(np.round(outside.probability * 255).astype(int) - prob.astype(int)).max() <= 1
    # the run's post-processing (its tuned parameters, its segment settings): the submitted mask, bit for bit
    submitted = _masks(out / "submission.zip")[exported[0].name]
    assert outside.mask.any() and np.array_equal(outside.mask, submitted)
    first = next(e["data"] for e in _events(reference["out"] / "journal.jsonl") if e["event"] == "DISTILLATION_VALIDATION")
    assert (first["step"], first["scored"], first["improved"], first["kept"]) == (0, "prior", True, True)  # the untrained student is the ensemble: the score to beat


def test_the_blend_is_the_mean_of_the_students_and_the_ensembles_maps(reference: dict, demo_data: Path, tmp_path: Path) -> None:
    """The blend and the student are validated and tuned on the whole grid (the linear models on the leader's point); chosen, the blend segments
    the test volumes with the mean of the student's map and the search ensemble's."""
    from nx46vx.config import FeatureConfig
    from nx46vx.segment import postprocess_grid, probability

    events = _events(reference["out"] / "journal.jsonl")
    report = next(e["data"] for e in events if e["event"] == "VALIDATION_REPORT")
    grid = len(list(postprocess_grid(nx46vx.RunConfig().segment)))
    assert report["tuned_points"]["blend"] == report["tuned_points"]["student"] == grid and "blend" in report["scores"]
    assert all(1 <= report["tuned_points"][name] <= 2 for name in ("ensemble", "search_model"))  # the plain point and the leader's
    out = _copy_of(reference, tmp_path)
    nx46vx.run([demo_data], output=out, profile="demo", overrides=FAST + ["segment.method=blend", "segment.export_probabilities=true"])
    choice = next(e["data"] for e in _events(out / "journal.jsonl") if e["event"] == "SEGMENTER_CHOICE")
    assert choice["chosen"] == "blend" and choice["params"] == report["params"]["blend"]
    saved = ckpt.load_payload(ckpt.latest_committed(out / "checkpoints"), "distillation")
    ensemble = saved["prior"]  # the demo's student corrects the ensemble: the checkpoint holds it
    for path in sorted((demo_data / "test_images").glob("*.tif")):
        student = nx46vx.predict(path, model=out).probability
        image = tifffile.imread(path)
        mean = (student + probability(image, ensemble["thetas"], np.asarray(ensemble["mean"]), np.asarray(ensemble["std"]), FeatureConfig(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in ensemble["features"].items()}))) / 2
        exported = tifffile.imread(out / "probabilities" / path.name).astype(int)
        assert np.abs(np.round(mean * 255).astype(int) - exported).max() <= 1


def test_the_reserve_holds_the_blends_test_volumes(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blend segments with the student and the ensemble: whenever the student's test volumes are priced into the reserve,
    so are the blend's, at the student's cost plus the ensemble's measured on its validation maps; with the student as the
    only segmenter allowed, the student's alone."""
    from nx46vx.governor import Governor, VirtualClock

    priced: list[tuple[str, float]] = []
    measured = Governor.measured_volume_cost

    def record(self: Governor, seconds_per_voxel: float, test_voxels: int, *, source: str) -> None:
        priced.append((source, seconds_per_voxel))
        measured(self, seconds_per_voxel, test_voxels, source=source)

    monkeypatch.setattr(Governor, "measured_volume_cost", record)
    overrides = FAST + ["distill.teacher_input=false", "budget.total_s=100000"]
    clock = VirtualClock(tick=0.001, costs={"validation_volume": 2.0, "distill_step": 1.0})
    nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=overrides, clock=clock)
    val_ids = next(e["data"] for e in _events(tmp_path / "out" / "journal.jsonl") if e["event"] == "DATASET_DISCOVERY")["split"]["val_ids"]
    val_voxels = sum(tifffile.imread(demo_data / "train_images" / f"{i}.tif").size for i in val_ids)
    student = [s for source, s in priced if source == "student"]
    blend = [s for source, s in priced if source == "blend"]
    assert len(student) >= 3 and len(blend) == len(student) - 1  # the price before the ensemble's maps, then every measurement
    ensemble_s = [b - s for s, b in zip(student[1:], blend)]
    assert ensemble_s == pytest.approx([ensemble_s[0]] * len(ensemble_s))  # measured once, on its validation maps
    assert ensemble_s[0] == pytest.approx(2.0 * len(val_ids) / val_voxels, rel=0.05)  # 2 s a validation volume (+ the clock's ticks)
    priced.clear()
    nx46vx.run([demo_data], output=tmp_path / "student", profile="demo", overrides=overrides + ["segment.method=student"], clock=VirtualClock(tick=0.001))
    assert {source for source, _ in priced} == {"features", "student"}


def test_the_segmenter_choice_prices_the_students_test_volumes_per_window(demo_data: Path, tmp_path: Path) -> None:
    """With flip TTA the segmenter choice computes the student's validation maps anew, at 8 passes a window; a validation volume
    smaller than a window still pays a whole one. Its test volumes are priced as the distillation priced them (its windows over
    the test volumes, flips included, at the latest seconds per window), not by that validation's seconds per voxel."""
    from nx46vx.governor import VirtualClock

    overrides = FAST + ["distill.teacher_input=false", "budget.total_s=100000", "segment.flip_tta=true", "segment.repair_tunnels=false",
                        "segment.method=student", "budget.reserve_safety=1.5"]
    clock = VirtualClock(tick=0.001, costs={"validation_volume": 50.0})  # a student map of a validation volume: 50 s
    nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=overrides, clock=clock)
    events = _events(tmp_path / "out" / "journal.jsonl")
    priced = next(e["data"] for e in events if e["event"] == "DISTILLATION_END")["test_s_per_voxel"]  # at the last validation's seconds per window
    choice = next(e["data"] for e in events if e["event"] == "SEGMENTER_CHOICE")
    assert choice["chosen"] == "student" and choice["excluded_for_time"] == []
    test_paths = list((demo_data / "test_images").glob("*.tif"))
    test_voxels = sum(tifffile.imread(path).size for path in test_paths)
    # past the inference each test volume pays its mask's clean-up and a checkpoint, as last measured when the choice is made
    budget = next(e["data"] for e in events if e["event"] == "TIME_BUDGET_STATE" and e["phase"] == "segmentation")
    finishing = budget["cleanup_s_per_mvoxel"] / 1e6 + budget["checkpoint_s"] * len(test_paths) / test_voxels
    assert priced > 0 and finishing > 0 and choice["seconds_per_voxel"]["student"] == pytest.approx(priced + finishing, rel=1e-4)
    assert choice["predicted_test_seconds"]["student"] == pytest.approx((priced + finishing) * test_voxels * 1.5, rel=1e-4)
    val_ids = next(e["data"] for e in events if e["event"] == "DATASET_DISCOVERY")["split"]["val_ids"]
    val_voxels = sum(tifffile.imread(demo_data / "train_images" / f"{i}.tif").size for i in val_ids)
    assert choice["seconds_per_voxel"]["student"] < 50.0 * len(val_ids) / val_voxels / 100  # far under the validation's measure


def test_segmenter_choice_respects_the_time_left(demo_data: Path, tmp_path: Path) -> None:
    """A segmenter whose measured cost would not fit the budget left is not chosen; the journal says why."""
    result = nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=FAST + ["budget.reserve_safety=1e9", "budget.total_s=3600"])
    choice = next(e["data"] for e in _events(tmp_path / "out" / "journal.jsonl") if e["event"] == "SEGMENTER_CHOICE")
    assert choice["predicted_test_seconds"]["student"] > choice["time_left_s"]
    assert "student" in choice["excluded_for_time"] and result.segmenter == choice["chosen"] == "intensity_baseline"
    # a source whose validation maps alone would leave no time for its test volumes stops after its first map (the ensemble's
    # and the student's maps are distillation's); the teachers' report is tuned only while the dearest source fits (one point)
    assert choice["validation_cut_for_time"] == ["blend", "search_model"] and "search_model" not in choice["validation_scores"]
    report = next(e["data"] for e in _events(tmp_path / "out" / "journal.jsonl") if e["event"] == "VALIDATION_REPORT")
    assert report["tuned_points"] == {"ensemble": 1, "student": 1}
    # the trained student's exclusion is a planning failure, and the journal names it
    failure = next(e["data"] for e in _events(tmp_path / "out" / "journal.jsonl") if e["event"] == "PLANNING_FAILURE")
    assert failure["excluded"] == ["student", "blend"] and failure["predicted_test_seconds"]["student"] == choice["predicted_test_seconds"]["student"]


class _CreatesAFile:
    """Unpickling this object creates ``path``: what a malicious checkpoint payload would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


def test_planted_pickle_checkpoint_is_refused_and_never_unpickled(reference: dict, demo_data: Path, tmp_path: Path) -> None:
    import hashlib
    import pickle

    marker = tmp_path / "pwned"
    evil = pickle.dumps(_CreatesAFile(marker))
    pickle.loads(evil)  # the payload is live: loading it once creates the marker
    assert marker.exists()
    marker.unlink()
    planted = tmp_path / "attached" / "checkpoints"
    # a current-format checkpoint whose signatures match this run, payloads replaced by the pickle, checksums recomputed
    newest = planted / "ckpt-99999999"
    shutil.copytree(sorted((reference["out"] / "checkpoints").glob("ckpt-*"))[-1], newest)
    manifest = json.loads((newest / "manifest.json").read_text())
    for name in ("discovery.json", "search.safetensors", "run.json"):
        (newest / name).write_bytes(evil)
        manifest["sha512"][name] = hashlib.sha512(evil).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    # and an old-format (torch pickle) checkpoint with a valid checksum list beside it
    old = planted / "ckpt-99999998"
    old.mkdir()
    (old / "run.pt").write_bytes(evil)
    (old / "manifest.json").write_text(json.dumps({"format": 1, "sha512": {"run.pt": hashlib.sha512(evil).hexdigest()}}))
    out = tmp_path / "out"
    proc = run_cli(*run_args(demo_data, out, "--input", str(tmp_path / "attached"), "--set", "search.max_epochs=1", "--set", "distill.enabled=false"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()  # nothing was unpickled
    journal = _events(out / "journal.jsonl")
    corrupt = [e["data"] for e in journal if e["event"] == "CHECKPOINT_CORRUPT" and "ckpt-99999999" in e["data"]["checkpoint"]]
    assert corrupt and "payload is malformed" in corrupt[0]["error"]
    old_format = [e["data"] for e in journal if e["event"] == "RESUME_INCOMPATIBLE" and "ckpt-99999998" in e["data"]["checkpoint"]]
    assert old_format and old_format[0]["field"] == "format" and old_format[0]["found"] == 1
    assert json.loads(proc.stdout)["status"] == "complete"


def test_read_only_checkpoints_folder_fails_at_the_start(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nx46vx.runner.context as context

    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    real_probe = context.probe_writable

    def read_only_checkpoints(folder: Path) -> None:  # root ignores permission bits: inject the refusal
        if folder.name == "checkpoints":
            raise PermissionError(13, "Permission denied", str(folder))
        real_probe(folder)

    monkeypatch.setattr(context, "probe_writable", read_only_checkpoints)
    with pytest.raises(OutputNotWritableError) as err:
        nx46vx.run([demo_data], output=out, profile="demo")
    assert "checkpoints" in str(err.value) and "Permission denied" in str(err.value)
    assert not (out / "journal.jsonl").exists() and not (out / "cache").exists()  # before any work


def test_a_checkpoint_that_cannot_be_written_is_a_named_error(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nx46vx.checkpoint as checkpoint

    def disk_gone(*_args: object, **_kwargs: object) -> Path:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(checkpoint, "write_checkpoint", disk_gone)
    with pytest.raises(OutputNotWritableError) as err:
        nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=["data.max_train_volumes=1"])
    assert "cannot write a checkpoint" in str(err.value) and "Read-only file system" in str(err.value)
    assert (tmp_path / "out" / "submission.zip").exists()  # the baseline submission came first


def test_raising_max_epochs_after_the_search_ended_continues_it(demo_data: Path, tmp_path: Path) -> None:
    quick = ("--set", "distill.enabled=false", "--set", "search.max_iter=20")
    first = run_cli(*run_args(demo_data, tmp_path / "out", *quick, "--set", "search.max_epochs=1"))
    assert first.returncode == 0, first.stderr[-2000:]
    more = run_cli(*run_args(demo_data, tmp_path / "out", *quick, "--set", "search.max_epochs=2"))
    assert more.returncode == 0, more.stderr[-2000:]
    journal = _events(tmp_path / "out" / "journal.jsonl")
    extended = [e["data"] for e in journal if e["event"] == "SEARCH_EXTENDED"]
    assert extended == [{"epochs_done": 1, "max_epochs": 2, "stagnation": 0, "patience": extended[0]["patience"]}]
    assert [e["data"]["epoch"] for e in journal if e["event"] == "EPOCH_DONE"] == [1]  # only the new epoch ran
    direct = run_cli(*run_args(demo_data, tmp_path / "direct", *quick, "--set", "search.max_epochs=2"))
    assert json.loads(more.stdout)["model_digest"] == json.loads(direct.stdout)["model_digest"]  # as if it had never stopped


def test_baseline_masks_follow_a_changed_test_image_and_their_settings(demo_data: Path, tmp_path: Path) -> None:
    """A test volume rewritten under the same id, or a changed ``min_component_voxels``, gets a fresh baseline mask."""
    from nx46vx.config import load_config
    from nx46vx.segment import intensity_baseline

    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(demo_data, data)
    first = run_cli(*run_args(data, out), env={"NX46VX_KILL_AT": "CHECKPOINT_WRITTEN:1"})
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    test = sorted((data / "test_images").glob("*.tif"))[0]
    image = tifffile.imread(test)
    changed = np.ascontiguousarray(image[:, ::-1])  # the same shape, other content
    tifffile.imwrite(test, changed)
    from scipy import ndimage

    from nx46vx.metric import CONN26

    sizes = np.bincount(ndimage.label(intensity_baseline(changed, load_config("demo", overrides=FAST).segment), CONN26)[0].ravel())[1:]
    assert sizes.size >= 2
    submitted = []
    for extra in ([], ["--set", f"segment.min_component_voxels={sizes.max()}"]):  # keeps only the largest component
        again = run_cli(*run_args(data, out, *extra), env={"NX46VX_KILL_AT": "SUBMISSION_WRITTEN:1"})
        assert again.returncode == -signal.SIGKILL, again.stderr[-2000:]
        seg = load_config("demo", overrides=FAST + [x for x in extra if x != "--set"]).segment
        submitted.append(_masks(out / "submission.zip")[test.name])
        assert np.array_equal(submitted[-1], intensity_baseline(changed, seg)), extra
    assert not np.array_equal(*submitted)  # the setting matters on this volume
