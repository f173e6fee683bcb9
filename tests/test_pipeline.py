"""End-to-end runs: CLI, any competition-layout folder, submission, journal, scoring, resume and the governor."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import orjson
import pytest
import tifffile

import nx46vx
from nx46vx.errors import OutputNotWritableError
from nx46vx.journal import verify

from .conftest import FAST, run_args, run_cli


def _masks(submission: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(submission) as zf:
        return {n: tifffile.imread(io.BytesIO(zf.read(n))) for n in sorted(zf.namelist())}


def _events(journal: Path) -> list[dict]:
    return [orjson.loads(line) for line in journal.read_bytes().splitlines()]


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
    assert (out / "results.zip").is_file() and (out / "postmortem.json").is_file()
    assert names.count("PHASE_START") == names.count("PHASE_END") == 6
    profile = json.loads((out / "RUN_PROFILE_SUMMARY.json").read_text())
    assert abs(sum(profile["phase_seconds"].values()) - profile["wall_s"]) <= 0.05 * profile["wall_s"]
    assert 0 < profile["shares"]["journal"] < 0.02
    assert profile["candidate_iterations"] == 2 * 135 * 120 and profile["candidates_per_s"] > 0
    post = json.loads((out / "postmortem.json").read_text())
    assert post["status"] == "complete" and post["bottleneck_phase"] in profile["phase_seconds"]
    assert all(v == 100.0 for k, v in post["phase_percent_done"].items() if k != "distillation")
    stats = json.loads((out / "GLOBAL_STATS.json").read_text())
    assert stats["files_processed"] == 6 + 2 and stats["materials"] > 0 and stats["anchored_voxels"] > 0
    assert stats["active_weights"]["total"]["end"] > 0 and len(stats["active_weights"]["per_candidate"]) == 135
    previews = sorted(p.name for p in (out / "previews").glob("*.png"))
    assert previews == sorted([n.replace(".tif", ".png") for n in masks] + ["training_curve.png"])
    roadmap = json.loads((out / "roadmap_realtime.json").read_text())
    assert roadmap["global_progress_percent"] == 100.0 and roadmap["train_progress_percent"] == 100.0
    assert "PROGRESS_INTEGRITY_ALERT" not in names
    with zipfile.ZipFile(out / "results.zip") as zf:
        assert "journal.jsonl" in zf.namelist() and any(n.startswith("checkpoints/ckpt-") for n in zf.namelist())


def test_score_cli_prints_json(reference: dict, demo_data: Path) -> None:
    proc = run_cli("score", "--truth", str(demo_data / "test_labels"), "--pred", str(reference["out"] / "submission.zip"))
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)
    assert set(scores) == {n[:-4] for n in reference["masks"]} | {"mean"}
    for vol_id, parts in scores.items():
        if vol_id != "mean":
            assert set(parts) == {"surface_dice", "voi_score", "topo_score", "score"}
    assert 0.5 < scores["mean"] <= 1.0


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


@pytest.mark.parametrize(
    "kill_at", ["FIT_ITER:57", "checkpoint_payload_written:9", "CANDIDATE_DONE:140", "DISTILLATION_LOSS_STEP:15", "submission_member_written:1"]
)
def test_kill_parity(kill_at: str, reference: dict, demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = run_cli(*run_args(demo_data, out), env={"NX46VX_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL
    assert (out / "journal.jsonl").is_file()
    if kill_at.startswith("FIT_ITER"):  # half-way through training: partial reports survive the kill
        roadmap = json.loads((out / "roadmap_realtime.json").read_text())
        assert 0 < roadmap["global_progress_percent"] < 100 and roadmap["phase"] == "search"
        stats = json.loads((out / "GLOBAL_STATS.json").read_text())
        assert stats["phase"] == "features" and stats["files_processed"] == 6
    resumed = run_cli(*run_args(demo_data, out))
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["resumed_from"] is not None
    assert result["model_digest"] == reference["result"]["model_digest"]
    masks = _masks(out / "submission.zip")
    assert masks.keys() == reference["masks"].keys()
    for name in masks:
        assert np.array_equal(masks[name], reference["masks"][name])
    previous = sorted((out / "journals").glob("journal-*.jsonl"))[-1]
    assert verify(out / "journal.jsonl", previous=previous).ok
    names = [e["event"] for e in _events(out / "journal.jsonl")]
    assert "RESUME_OK" in names and "PHASE_WEIGHT_CALIBRATION" in names


def test_attach_previous_output_or_results_zip(reference: dict, demo_data: Path, tmp_path: Path) -> None:
    run1 = tmp_path / "run1"
    killed = run_cli(*run_args(demo_data, run1), env={"NX46VX_KILL_AT": "FIT_ITER:150"})
    assert killed.returncode == -signal.SIGKILL
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


def _partial_run(demo_data: Path, out: Path, kill_at: str = "FIT_ITER:150") -> None:
    killed = run_cli(*run_args(demo_data, out), env={"NX46VX_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_newest_checkpoint_falls_back(damage: str, reference: dict, demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _partial_run(demo_data, out)
    ckpts = sorted((out / "checkpoints").glob("ckpt-*"))
    newest = ckpts[-1] / "search.pt"
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


@pytest.mark.parametrize("change,field", [("search.meta_neurons=8", "grid.meta_neurons"), ("features.hessian_sigma=2.0", "features.hessian_sigma")])
def test_incompatible_checkpoint_starts_fresh(change: str, field: str, demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _partial_run(demo_data, out, "FIT_ITER:30")
    proc = run_cli(*run_args(demo_data, out, "--set", change, "--set", "search.max_epochs=1"))
    assert proc.returncode == 0, proc.stderr
    events = _events(out / "journal.jsonl")
    incompatible = [e["data"] for e in events if e["event"] == "RESUME_INCOMPATIBLE"]
    assert incompatible and incompatible[0]["field"] == field
    assert "RESUME_OK" not in [e["event"] for e in events]


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


@pytest.mark.parametrize("budget", [20, 60, 120])
def test_governor_returns_inside_budget(budget: int, demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    overrides = FAST + [f"budget.total_s={budget}", "search.max_epochs=500", "search.patience=500", "progress.interval_s=5"]
    start = time.monotonic()
    result = nx46vx.run([demo_data], output=out, profile="demo", overrides=overrides)
    elapsed = time.monotonic() - start
    assert elapsed < budget
    assert result.status == "stopped_by_deadline"
    assert _masks(result.submission)
    events = _events(out / "journal.jsonl")
    names = [e["event"] for e in events]
    assert "PRETIMEOUT_FLUSH" in names
    # the reported global progress is the one computed from the cursor (full grid in one batch, 2 epochs… capped at 500)
    roadmap = json.loads((out / "roadmap_realtime.json").read_text())
    c = roadmap["cursor"]
    epoch_fraction = (c["candidate"] * 120 + c["iter"] * 135) / (135 * 120)
    train = (c["epoch"] + epoch_fraction) / 500
    w = roadmap["weights"]
    expected = (w["discovery"] + w["features"] + w["segmentation"] + w["packaging"] + w["search"] * train) / sum(w.values())
    assert roadmap["global_progress_percent"] == pytest.approx(100 * expected, abs=1e-4)
    assert roadmap["global_progress_percent"] < 100
    # progress never stalls while the cursor advances
    seen = [(e["data"]["cursor"], e["data"]["global_progress_percent"]) for e in events if e["event"] == "GLOBAL_PROGRESS_REALTIME" and e["data"]["phase"] == "search"]
    for (c1, g1), (c2, g2) in zip(seen, seen[1:]):
        if (c2["epoch"], c2["candidate"], c2["iter"]) > (c1["epoch"], c1["candidate"], c1["iter"]):
            assert g2 > g1
    assert "PROGRESS_INTEGRITY_ALERT" not in names
    if budget != 20:
        return
    # a later run continues from the flush checkpoint
    later = nx46vx.run([demo_data], output=out, profile="demo", overrides=FAST + ["search.max_epochs=500", "search.patience=500", "budget.total_s=12"])
    assert later.resumed_from is not None
    assert later.cursor != {"epoch": 0, "candidate": 0, "iter": 0}


def test_full_output_disk_fails_before_training(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nx46vx.pipeline as pipeline

    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OutputNotWritableError) as err:
        nx46vx.run([demo_data], output=tmp_path / "out", profile="demo")
    assert "nearly full" in str(err.value) and "got 1 MiB free" in str(err.value)
    assert not (tmp_path / "out" / "journal.jsonl").exists()


def test_inspect_verifies_a_checkpoint(reference: dict) -> None:
    ckpt = sorted((reference["out"] / "checkpoints").glob("ckpt-*"))[-1]
    proc = run_cli("inspect", str(ckpt))
    assert proc.returncode == 0 and "payload files match their SHA-512" in proc.stdout
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for key in ("ts_ns", "run_id", "version", "git_sha", "config_signature", "epoch", "candidate_index", "candidate_total", "iter", "max_iter",
                "best_metrics", "data_cursor", "rng", "merkle_prev", "merkle_curr", "tree_size", "sha512"):
        assert key in manifest, key
    (ckpt / "search.pt").write_bytes(b"damaged")
    proc = run_cli("inspect", str(ckpt))
    assert proc.returncode == 2 and "payload checksum mismatch" in proc.stderr


def test_segmenter_choice_respects_the_time_left(demo_data: Path, tmp_path: Path) -> None:
    """A segmenter whose measured cost would not fit the budget left is not chosen; the journal says why."""
    result = nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=FAST + ["budget.reserve_safety=1e9", "budget.total_s=3600"])
    choice = next(e["data"] for e in _events(tmp_path / "out" / "journal.jsonl") if e["event"] == "SEGMENTER_CHOICE")
    assert choice["predicted_test_seconds"]["student"] > choice["time_left_s"]
    assert "student" in choice["excluded_for_time"] and result.segmenter == choice["chosen"] == "intensity_baseline"
