"""Runner parts on their own: RNG restore, the governor's shares and virtual clock, the segmenter choice, the quota, logging."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nx46vx.config import BudgetConfig
from nx46vx.governor import Governor, VirtualClock
from nx46vx.payload import pack, unpack
from nx46vx.runner.checkpointer import restore_rng, rng_states
from nx46vx.runner.context import install_log_handler
from nx46vx.runner.quota import OutputQuota
from nx46vx.segment import BASELINE, ENSEMBLE, STUDENT, choose_segmenter
from nx46vx.walk import walk_folders


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.random()), torch.rand(3).tolist()


def test_rng_restore_brings_every_generator_back() -> None:
    saved = unpack(*pack(rng_states()))  # as a checkpoint stores and reloads it
    expected = _draws()
    _draws()  # the generators move on
    assert _draws() != expected
    restore_rng(saved)
    assert _draws() == expected  # fails if restoring were a no-op


def test_phase_shares_and_deadlines_follow_the_budget() -> None:
    clock = VirtualClock(tick=0.0, costs={"features_volume": 10.0})
    governor = Governor(BudgetConfig(total_s=1000, margin_s=100, reserve_per_volume_s=50, reserve_safety=2.0), n_test=1, clock=clock)
    window = 1000 - 50 - 100  # the margin is at most a twentieth of the budget
    assert governor.training_deadline() == window
    assert governor.phase_deadline("features") == pytest.approx(0.25 * window)
    assert governor.phase_deadline("search") == pytest.approx(0.70 * window)
    assert governor.phase_deadline("distillation") == pytest.approx(window)
    for _ in range(22):
        governor.account("features_volume")
    assert clock.now == 220.0 and governor.phase_should_stop("features") and not governor.phase_should_stop("search")
    assert governor.stop_reason is None  # a phase's share is not a stop of the run
    unlimited = Governor(BudgetConfig(), n_test=1, clock=clock)
    assert unlimited.phase_deadline("features") == float("inf") and not unlimited.phase_should_stop("search")


def test_time_the_features_leave_goes_to_the_student_not_the_search() -> None:
    clock = VirtualClock(tick=0.0, costs={"features_volume": 10.0})
    governor = Governor(BudgetConfig(total_s=1000, margin_s=50, reserve_per_volume_s=50, reserve_safety=2.0), n_test=1, clock=clock)
    window = 850
    governor.enter("features")
    for _ in range(5):
        governor.account("features_volume")
    governor.enter("search")  # at 50 s, 150 s before the features' deadline
    assert governor.phase_deadline("search") == pytest.approx(50 + 0.45 * window)  # its own share, not 0.70 of the window
    assert governor.phase_deadline("distillation") == pytest.approx(window)
    governor.enter("features")  # entered again: its share still counts from the first entry
    assert governor.phase_deadline("features") == pytest.approx(0.25 * window)


def test_segmenter_choice_is_pure_and_respects_time() -> None:
    names = [BASELINE, ENSEMBLE, STUDENT]
    scores = {BASELINE: 0.6, ENSEMBLE: 0.7, STUDENT: 0.8}
    cost = {BASELINE: 1e-9, ENSEMBLE: 1e-7, STUDENT: 1e-5}
    fast = choose_segmenter(names, scores, cost, test_voxels=10**6, safety=2.0, time_left=float("inf"))
    assert fast.chosen == STUDENT and fast.excluded_for_time == []
    tight = choose_segmenter(names, scores, cost, test_voxels=10**6, safety=2.0, time_left=1.0)
    assert tight.chosen == ENSEMBLE and tight.excluded_for_time == [STUDENT]
    assert tight.predicted_test_seconds[STUDENT] == pytest.approx(20.0)
    none_fit = choose_segmenter(names, scores, cost, test_voxels=10**6, safety=2.0, time_left=0.0)
    assert none_fit.chosen == BASELINE
    tie = choose_segmenter(names, {}, {}, test_voxels=1, safety=1.0, time_left=1.0)
    assert tie.chosen == STUDENT  # no validation: the more trained model


def test_the_segmenter_choice_prefers_a_repairing_segmenter_within_the_margin() -> None:
    """A kaggle-train bench run: the blend's tuning left the tunnels and scored 0.8425 on validation, the student's repaired
    them and scored 0.8403 (0.787 against the blend's 0.781 on the test volumes): the student is chosen. Further than
    REPAIR_MARGIN, or too dear for the time left, the repairing segmenter is not; a segmenter earlier in the preference
    order that leaves the tunnels does not replace a repairing one, however close."""
    from nx46vx.segment import BLEND, REPAIR_MARGIN

    names = [BASELINE, ENSEMBLE, BLEND, STUDENT]
    scores = {BASELINE: 0.64, ENSEMBLE: 0.73, BLEND: 0.8425, STUDENT: 0.8403}
    cost = {STUDENT: 1e-6, BLEND: 1e-7, ENSEMBLE: 1e-8}
    choose = lambda scores, repaired, time_left=float("inf"): choose_segmenter(  # noqa: E731
        names, scores, cost, test_voxels=10**6, safety=1.0, time_left=time_left, repaired=repaired).chosen
    assert choose(scores, [STUDENT]) == STUDENT
    assert choose({**scores, STUDENT: 0.8425 - REPAIR_MARGIN - 1e-6}, [STUDENT]) == BLEND
    assert choose({**scores, STUDENT: 0.5}, [STUDENT, ENSEMBLE]) == BLEND  # the ensemble is further than the margin
    assert choose({**scores, STUDENT: 0.5, ENSEMBLE: 0.8403}, [ENSEMBLE]) == ENSEMBLE  # the blend, closer and preferred, leaves the tunnels
    assert choose(scores, [STUDENT], time_left=0.5) == BLEND  # the student's 1 s does not fit
    moved = choose_segmenter(names, scores, cost, test_voxels=10**6, safety=1.0, time_left=float("inf"), repaired=[STUDENT])
    assert (moved.chosen, moved.best_scored) == (STUDENT, BLEND)  # the journal says the margin moved the choice
    assert choose_segmenter(names, {**scores, STUDENT: 0.5}, cost, test_voxels=10**6, safety=1.0, time_left=float("inf"), repaired=[]).best_scored is None


def test_the_segmenter_choice_prefers_the_student_over_a_blend_within_the_margin() -> None:
    """The reference bench's kaggle-train seed 0 run: the blend 0.9016 on validation, the student 0.8951, both repairing
    (0.798 against the student's 0.818 on the test volumes): the student is chosen, and the journal names the blend as the
    best-scoring one. Further than PREFERENCE_MARGIN the blend is chosen; among the others the first in preference order wins."""
    from nx46vx.segment import BLEND, PREFERENCE_MARGIN, SEARCH_MODEL

    names = [BASELINE, SEARCH_MODEL, ENSEMBLE, BLEND, STUDENT]
    scores = {BASELINE: 0.59, SEARCH_MODEL: 0.694, ENSEMBLE: 0.746, BLEND: 0.9016, STUDENT: 0.8951}
    repaired = [BLEND, STUDENT, ENSEMBLE]
    choose = lambda scores, time_left=float("inf"): choose_segmenter(  # noqa: E731
        names, scores, {STUDENT: 1e-6, BLEND: 1.1e-6}, test_voxels=10**6, safety=1.0, time_left=time_left, repaired=repaired)
    moved = choose(scores)
    assert (moved.chosen, moved.best_scored) == (STUDENT, BLEND)
    assert choose({**scores, STUDENT: 0.9016 - PREFERENCE_MARGIN - 1e-6}).chosen == BLEND
    assert (choose(scores, time_left=1.05).chosen, choose(scores, time_left=1.05).best_scored) == (STUDENT, None)  # the blend's 1.1 s does not fit
    assert choose(scores, time_left=0.5).chosen == ENSEMBLE  # nor the student's 1 s
    assert choose({**scores, STUDENT: 0.5, BLEND: 0.75}).chosen == BLEND  # within the margin of the ensemble's 0.746: the blend is preferred
    assert choose({**scores, STUDENT: 0.5, BLEND: 0.7, SEARCH_MODEL: 0.76}).chosen == SEARCH_MODEL  # the ensemble is further than both margins


def test_quota_counts_writes_and_refuses_past_the_limit(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"0" * 1000)
    quota = OutputQuota(tmp_path, 3000 / (1 << 30))
    assert quota.used == 1000 and quota.allow(1500) and quota.used == 2500
    assert not quota.allow(600) and quota.refused == 1 and quota.used == 2500


def test_walker_is_breadth_first_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for sub in ("b/deep/deeper", "a", ".hidden/x", "b/checkpoints/ckpt-1"):
        (tmp_path / sub).mkdir(parents=True)
    seen = [p.relative_to(tmp_path).as_posix() for p in walk_folders([tmp_path], depth=2, prune=lambda p: p.name == "checkpoints")]
    assert seen == [".", "a", "b", "b/checkpoints", "b/deep"]


def test_run_installs_a_log_handler_only_when_nothing_would_show(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("nx46vx")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    handler = install_log_handler()
    assert handler is not None and logger.level == logging.INFO
    logger.info("phase search 12.5 %%")
    assert "nx46vx" in capsys.readouterr().err
    assert install_log_handler() is None  # one is enough
    logger.removeHandler(handler)


def test_checkpoint_links_the_files_of_finished_phases(tmp_path: Path) -> None:
    """A finished phase is not serialised again: its files are hard links to the previous checkpoint's, checksums intact."""
    from nx46vx import checkpoint as ckpt
    from nx46vx.journal import Journal
    from nx46vx.runner.context import RunContext
    from nx46vx.runner.state import RunState
    from nx46vx.config import RunConfig

    class Done:
        name, done = "frozen", True
        calls = 0

        def signature(self, config):  # noqa: ANN001, ANN201
            return {}

        def state_dict(self):  # noqa: ANN201
            Done.calls += 1
            return {"weights": torch.arange(1000, dtype=torch.float32)}

    class Live(Done):
        name, done = "live", False

    ctx = RunContext(RunConfig(), output=tmp_path, input_roots=None, resume="never", phases=[Done(), Live()])
    ctx.reporter.state = RunState()
    ctx.journal = Journal(tmp_path / "journal.jsonl", run_id="t")
    first, second = ctx.checkpointer.write("a"), ctx.checkpointer.write("b")
    assert Done.calls == 3  # frozen once, live twice
    assert (first / "frozen.safetensors").stat().st_ino == (second / "frozen.safetensors").stat().st_ino
    assert (first / "live.safetensors").stat().st_ino != (second / "live.safetensors").stat().st_ino
    assert ckpt.is_committed(second) and torch.equal(ckpt.load_payload(second, "frozen")["weights"], torch.arange(1000, dtype=torch.float32))
    ctx.close()


def test_validation_threshold_is_in_the_signatures_of_the_phases_that_validate() -> None:
    from dataclasses import replace

    from nx46vx.config import load_config
    from nx46vx.runner import phases

    config = load_config("demo")
    changed = replace(config, data=replace(config.data, min_val_surface_voxels=config.data.min_val_surface_voxels + 1))
    differ = [p.name for p in phases() if p.signature(config) != p.signature(changed)]
    assert differ == ["distillation", "segmentation"]  # not discovery, features or search


def test_the_reserve_counts_the_metrics_cost_over_the_tuning_grid() -> None:
    """The post-processing tuning scores every grid point on every validation volume: the reserve keeps time for it."""
    budget = BudgetConfig(total_s=100_000, reserve_per_volume_s=50, reserve_safety=2.0, score_s_per_mvoxel=0.5)
    governor = Governor(budget, n_test=3, clock=VirtualClock(tick=0.0))
    governor.n_val = 2
    assert governor.reserve() == pytest.approx(50 * 5 * 2.0)
    governor.tuning_voxels = 2 * 320**3 * 20  # two 320³ validation volumes, 20 grid points
    assert governor.reserve() == pytest.approx((50 * 5 + 0.5 * 2 * 320**3 * 20 / 1e6) * 2.0)
    governor.measured_score_cost(0.1 / 1e6)  # the first measurement replaces the prior
    assert governor.score_s_per_voxel == pytest.approx(0.1 / 1e6)
    governor.measured_score_cost(0.05 / 1e6)  # the latest replaces it (the student's validations come last)
    assert governor.score_s_per_voxel == pytest.approx(0.05 / 1e6)
    assert governor.state()["score_s_per_mvoxel"] == pytest.approx(0.05)
    governor.measured_score_cost(0.0)  # no measurement
    assert governor.score_s_per_voxel == pytest.approx(0.05 / 1e6)


def test_the_reserve_counts_the_tunnel_repair_on_validation_and_test_voxels() -> None:
    """Every repairing grid point and every test volume pays the repair: the reserve keeps time for it at the configured
    guess until it is measured, then at the latest measured cost."""
    budget = BudgetConfig(total_s=100_000, reserve_per_volume_s=50, reserve_safety=2.0, score_s_per_mvoxel=0.0, repair_s_per_mvoxel=0.6)
    governor = Governor(budget, n_test=3, clock=VirtualClock(tick=0.0))
    assert governor.reserve() == pytest.approx(50 * 3 * 2.0)
    governor.repair_voxels = 10**6 * 9 + 3 * 10**6  # nine repairing points on one Mvoxel of validation, three Mvoxels of test
    assert governor.reserve() == pytest.approx((50 * 3 + 0.6 * 12) * 2.0)
    governor.measured_repair_cost(0.3 / 1e6)
    governor.measured_repair_cost(0.2 / 1e6)
    assert governor.reserve() == pytest.approx((50 * 3 + 0.2 * 12) * 2.0) and governor.state()["repair_s_per_mvoxel"] == pytest.approx(0.2)


def test_the_reserve_and_the_test_price_count_each_masks_cleanup_and_checkpoint() -> None:
    """Past its inference and tunnel repair every test volume pays its mask's clean-up and the checkpoint written after it: the
    reserve and the segmentation phase's price of the test volumes keep time for both, as last measured (nothing before)."""
    from types import SimpleNamespace

    from nx46vx.config import SegmentConfig
    from nx46vx.runner.phases.segmentation import SegmentationPhase

    budget = BudgetConfig(total_s=100_000, reserve_per_volume_s=50, reserve_safety=2.0, score_s_per_mvoxel=0.0, repair_s_per_mvoxel=0.6)
    governor = Governor(budget, n_test=3, clock=VirtualClock(tick=0.0))
    governor.test_voxels = 3 * 10**6
    assert governor.finishing_seconds(governor.test_voxels, 3) == 0.0 and governor.reserve() == pytest.approx(50 * 3 * 2.0)
    governor.measured_cleanup_cost(0.1 / 1e6)
    governor.measured_checkpoint_cost(0.4)
    governor.measured_checkpoint_cost(0.25)  # the latest replaces it (a checkpoint after a finished phase links its files)
    assert governor.finishing_seconds(governor.test_voxels, 3) == pytest.approx(0.1 * 3 + 0.25 * 3)
    assert governor.reserve() == pytest.approx((50 * 3 + 1.05) * 2.0)
    assert governor.state()["cleanup_s_per_mvoxel"] == pytest.approx(0.1) and governor.state()["checkpoint_s"] == pytest.approx(0.25)
    ctx = SimpleNamespace(governor=governor, config=SimpleNamespace(segment=SegmentConfig(), budget=budget))
    # a source at 1 µs a voxel: its inference, the repair the grid may choose (on by default), the clean-up and the checkpoints
    assert SegmentationPhase._test_seconds(ctx, SimpleNamespace(test_voxels=3 * 10**6), 1e-6) == pytest.approx(((1.0 + 0.6) * 3 + 1.05) * 2.0)
    ctx.config.segment = SegmentConfig(repair_tunnels=False)
    assert SegmentationPhase._test_seconds(ctx, SimpleNamespace(test_voxels=3 * 10**6), 1e-6) == pytest.approx((1.0 * 3 + 1.05) * 2.0)


def test_the_reserve_keeps_the_dearest_segmenters_latest_price() -> None:
    """Each segmenter's latest measured cost replaces its last one (a price taken during a hiccup does not stay); the reserve
    is sized by the dearest of them, and by the configured guess only until a first measurement."""
    budget = BudgetConfig(total_s=100_000, reserve_per_volume_s=50, reserve_safety=2.0, score_s_per_mvoxel=0.0, repair_s_per_mvoxel=0.0)
    governor = Governor(budget, n_test=2, clock=VirtualClock(tick=0.0))
    assert governor.reserve() == pytest.approx(50 * 2 * 2.0)
    voxels = 2 * 10**6  # two test volumes of one Mvoxel
    governor.measured_volume_cost(1e-6, voxels, source="features")
    assert governor.per_volume_s == pytest.approx(1.0)
    governor.measured_volume_cost(8e-6, voxels, source="student")  # priced during a hiccup
    assert governor.per_volume_s == pytest.approx(8.0)
    governor.measured_volume_cost(3e-6, voxels, source="student")  # its validation measures it anew
    assert governor.per_volume_s == pytest.approx(3.0) and governor.reserve() == pytest.approx(3.0 * 2 * 2.0)
    governor.measured_volume_cost(0.5e-6, voxels, source="student")  # now cheaper than the features: the dearest counts
    assert governor.per_volume_s == pytest.approx(1.0)
    governor.measured_volume_cost(0.0, voxels, source="features")  # no measurement
    assert governor.per_volume_s == pytest.approx(1.0)


def test_a_search_without_a_finished_fit_teaches_nothing() -> None:
    """The ensemble teacher (and the prior it feeds) is dropped, with the reason, while no candidate has finished a fit."""
    from types import SimpleNamespace

    from nx46vx.config import load_config
    from nx46vx.runner.sources import probability_sources, student_config, unusable_ensemble

    config = load_config("demo")
    ctx = SimpleNamespace(config=config, distill_device=torch.device("cpu"), device=torch.device("cpu"))
    state = SimpleNamespace(search=SimpleNamespace(evaluated=False, epoch=0, stage="iterating"), train_pairs=[object()] * 2, student=None)
    assert ENSEMBLE in config.distill.teachers and config.distill.teacher_input
    assert unusable_ensemble(state) == "no search candidate has finished a fit"
    cfg = student_config(ctx, state)
    assert ENSEMBLE not in cfg.teachers and not cfg.teacher_input
    assert probability_sources(ctx, state) == {}
    state.search.evaluated = True
    cfg = student_config(ctx, state)
    assert ENSEMBLE in cfg.teachers and cfg.teacher_input
    assert unusable_ensemble(SimpleNamespace(search=None)) == "no search ran"


def test_quota_counts_every_thread_s_writes(tmp_path: Path) -> None:
    """Loader threads ask the quota at once: every byte it allowed is counted, none over the limit."""
    from concurrent.futures import ThreadPoolExecutor

    quota = OutputQuota(tmp_path, 1000 / (1 << 30))
    with ThreadPoolExecutor(8) as pool:
        allowed = list(pool.map(lambda _i: quota.allow(7), range(4000)))
    assert sum(allowed) == 1000 // 7 and quota.used == 7 * sum(allowed) and quota.refused == 4000 - sum(allowed)


def test_results_zip_members_leaving_the_folder_or_links_are_not_extracted(tmp_path: Path) -> None:
    import stat
    import zipfile

    from nx46vx.checkpoint import extract_results_zip

    import hashlib

    archive = tmp_path / "results.zip"
    sibling = hashlib.sha256(str(archive.resolve()).encode()).hexdigest()[:16] + "-beside"  # shares the folder's name as a prefix
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("checkpoints/ckpt-000001/manifest.json", "{}")
        zf.writestr("checkpoints/../../escaped.txt", "x")
        zf.writestr(f"checkpoints/../../{sibling}/escaped.txt", "x")
        link = zipfile.ZipInfo("checkpoints/ckpt-000001/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    target = extract_results_zip(archive, tmp_path / "unpacked")
    assert target is not None and (target / "checkpoints/ckpt-000001/manifest.json").is_file()
    assert not (target / "checkpoints/ckpt-000001/link").exists() and not list(tmp_path.rglob("escaped.txt"))


def test_every_random_stream_has_its_own_id() -> None:
    """The registry's stream ids are distinct: two purposes never share a generator."""
    from nx46vx import streams

    ids = {name: value for name, value in vars(streams).items() if name.isupper() and name not in ("POOL_KEY_HEX_DIGITS", "PROBE_SEED_OFFSET")}
    assert len(ids) == 9 and len(set(ids.values())) == len(ids)
    assert streams.generator(5, streams.SPLIT).integers(1 << 30) == np.random.default_rng([5, 4]).integers(1 << 30)  # ids are what old checkpoints replay


def test_pruning_reads_no_checkpoint_back_and_keeps_the_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write prunes by age without hashing the kept checkpoints again (O(new bytes)); the one just written always stays."""
    from nx46vx import checkpoint as ckpt

    def no_rehash(path):  # noqa: ANN001, ANN202
        raise AssertionError(f"pruning re-read {path}")

    monkeypatch.setattr(ckpt, "sha512_file", no_rehash)
    folder = tmp_path / "checkpoints"
    (folder / "ckpt-00000000").mkdir(parents=True)  # an older, uncommitted leftover: pruned like any old one
    for seq in range(1, 6):
        ckpt.write_checkpoint(folder, seq, {"a.json": f"{seq}".encode()}, {"ts_ns": seq}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["ckpt-00000004", "ckpt-00000005"]
    monkeypatch.undo()
    assert all(ckpt.is_committed(p) for p in ckpt.list_checkpoints(folder))


def _zip_context(tmp_path: Path, *, total_s: float) -> "object":
    from nx46vx.config import load_config
    from nx46vx.journal import Journal
    from nx46vx.runner.context import RunContext
    from nx46vx.runner.state import RunState

    class Live:
        name, done = "live", False

        def signature(self, config):  # noqa: ANN001, ANN201
            return {}

        def state_dict(self):  # noqa: ANN201
            return {"weights": torch.zeros(50_000)}

    config = load_config(overrides=[f"budget.total_s={total_s}"])
    ctx = RunContext(config, output=tmp_path, input_roots=None, resume="never", phases=[Live()], clock=VirtualClock())
    ctx.reporter.state = RunState()
    ctx.journal = Journal(tmp_path / "journal.jsonl", run_id="t")
    (tmp_path / "submission.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    return ctx


def test_results_zip_holds_only_the_newest_checkpoint(tmp_path: Path) -> None:
    import zipfile

    from nx46vx.runner.phases.packaging import results_zip_plan
    from nx46vx.package import write_results_zip

    ctx = _zip_context(tmp_path, total_s=0)
    written = [ctx.checkpointer.write(r) for r in "abc"]
    members = results_zip_plan(ctx)
    assert members is not None and f"checkpoints/{written[-1].name}" in members
    write_results_zip(tmp_path / "results.zip", tmp_path, members)
    with zipfile.ZipFile(tmp_path / "results.zip") as zf:
        folders = {n.split("/")[1] for n in zf.namelist() if n.startswith("checkpoints/")}
        assert folders == {written[-1].name} and "submission.zip" in zf.namelist()
    assert len(list((tmp_path / "checkpoints").glob("ckpt-*"))) == ctx.config.checkpoint.keep_last  # the older ones stay in the folder
    ctx.close()


def test_results_zip_that_does_not_fit_the_time_left_is_skipped_and_journaled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import orjson

    from nx46vx.runner.phases.packaging import results_zip_plan

    ctx = _zip_context(tmp_path, total_s=100)
    ctx.checkpointer.write("a")
    (tmp_path / "results.zip").write_bytes(b"an older session's archive")
    monkeypatch.setattr(ctx.checkpointer, "write_rate", lambda: 1000.0)  # bytes per second: 200 kB need minutes
    assert results_zip_plan(ctx) is None
    assert not (tmp_path / "results.zip").exists()  # never an archive older than the folder beside it
    ctx.journal.close()
    events = [orjson.loads(line) for line in (tmp_path / "journal.jsonl").read_bytes().splitlines()]
    decision = next(e["data"] for e in events if e["event"] == "RESULTS_ZIP")
    assert decision["written"] is False and decision["reason"] == "time" and decision["predicted_s"] > decision["time_left_s"]
    monkeypatch.setattr(ctx.checkpointer, "write_rate", lambda: 1e9)
    ctx.quota.limit = ctx.quota.used  # the folder is full: the copy is what gives way
    ctx.journal = None
    assert results_zip_plan(ctx) is None and ctx._pending[-1][2]["reason"] == "output quota"
    ctx.close()


def test_a_run_folders_own_results_zip_is_not_unpacked_again(tmp_path: Path) -> None:
    """Auto-resume reads a run folder's checkpoints once; an archive is unpacked only when it is all there is."""
    import zipfile

    from nx46vx import checkpoint as ckpt

    run = tmp_path / "run"
    written = ckpt.write_checkpoint(run / "checkpoints", 1, {"a.json": b"1"}, {"ts_ns": 1}, keep_last=1)
    with zipfile.ZipFile(run / "results.zip", "w") as zf:
        for f in written.iterdir():
            zf.write(f, f.relative_to(run).as_posix())
    unpack = tmp_path / "unpacked"
    assert [f.path for f in ckpt.find_checkpoints([run], unpack_into=unpack)] == [written]
    assert not unpack.exists()
    alone = tmp_path / "alone"
    alone.mkdir()
    (run / "results.zip").rename(alone / "results.zip")
    found = ckpt.find_checkpoints([alone], unpack_into=unpack)
    assert len(found) == 1 and found[0].path.is_relative_to(unpack) and ckpt.is_committed(found[0].path)


def test_the_quota_counts_a_hard_linked_file_once(tmp_path: Path) -> None:
    """Checkpoints share a finished phase's files by hard links: the tally counts the bytes on disk, not the links."""
    import os

    from nx46vx.runner.quota import folder_bytes

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "weights").write_bytes(bytes(10_000))
    os.link(tmp_path / "a" / "weights", tmp_path / "b" / "weights")
    (tmp_path / "b" / "other").write_bytes(bytes(100))
    assert folder_bytes(tmp_path) == 10_100 and OutputQuota(tmp_path, 1.0).used == 10_100


def test_the_schedule_spreads_its_validations_evenly_up_to_its_end() -> None:
    """A validation costs 30 steps: they are spaced to take at most 15 % of the time, and evenly, the last one at the schedule's end."""
    from types import SimpleNamespace

    from nx46vx.config import DistillConfig
    from nx46vx.runner.schedule import StepCosts, lay_out_schedule

    clock = VirtualClock()
    governor = Governor(BudgetConfig(total_s=2000.0, margin_s=0.0, features_share=0.0, search_share=0.0), n_test=1, clock=clock)
    governor.enter("distillation")
    journal: list[tuple[str, dict]] = []
    ctx = SimpleNamespace(governor=governor, event=lambda name, _phase, data: journal.append((name, data)))
    student = SimpleNamespace(step=10, schedule_steps=None, val_every=None, val_from=0)
    cfg = DistillConfig(steps=0, warmup_steps=10, val_every=10, checkpoint_every=10**6)
    costs = StepCosts(started=0.0, steps=10, durations=[1.0] * 10, validation=30.0)
    measured: list[bool] = []
    lay_out_schedule(ctx, "distillation", student, cfg, costs, measure=lambda: measured.append(True))
    left = governor.phase_time_left("distillation")
    assert measured == [True] and journal[-1][0] == "DISTILLATION_SCHEDULE"
    total, every = student.schedule_steps, student.val_every
    validations = total // every + (total % every != 0)  # every val_every steps, and after the last one
    assert every >= math.ceil(30.0 / (0.15 * 1.0))  # at most 15 % of the training time
    assert total % every == 0 or total % every >= every // 2  # no validation a few steps before the final one
    # every step and validation fits the time left, and no whole further validation interval would
    assert (total - 10) * 1.0 + validations * 30.0 <= left < (total - 10 + every) * 1.0 + (validations + 1) * 30.0


def test_the_schedule_is_extended_only_when_more_steps_fit() -> None:
    """:func:`extend_schedule` lengthens a schedule this session laid out on its budget when the time left fits more steps;
    never shortens one, never while the revision is due, never a restored or finished one."""
    from types import SimpleNamespace

    from nx46vx.runner.schedule import StepCosts, extend_schedule

    governor = Governor(BudgetConfig(total_s=1000, margin_s=0, reserve_per_volume_s=100, reserve_safety=1.0, features_share=0.0, search_share=0.0),
                        n_test=1, clock=VirtualClock(tick=0.0))
    governor.enter("distillation")
    events: list[tuple] = []
    ctx = SimpleNamespace(governor=governor, event=lambda *args: events.append(args))
    cfg = SimpleNamespace(val_every=100, checkpoint_every=100)
    student = SimpleNamespace(step=100, schedule_steps=960, val_every=100, val_from=0)
    costs = StepCosts(0.0, validation=0.0, checkpoint=0.0, durations=[1.0] * 100, budgeted=True)
    # 900 s left at 1 s a step, 3 % of it spare: 873 more steps fit, 13 more than planned (under 2 % of the schedule)
    assert not extend_schedule(ctx, "distillation", student, cfg, costs) and not events
    student.schedule_steps = 900
    assert extend_schedule(ctx, "distillation", student, cfg, costs)
    assert student.schedule_steps == 973 and events[-1][2]["reason"] == "extended"
    extended = student.schedule_steps
    governor.measured_volume_cost(300 / 1e6, 10**6, source="student")  # the reserve grows: never shorter
    assert not extend_schedule(ctx, "distillation", student, cfg, costs) and student.schedule_steps == extended
    governor.measured_volume_cost(1 / 1e6, 10**6, source="student")
    for changed in (dict(budgeted=False), dict(laid_out=5)):  # a restored schedule, a revision due
        assert not extend_schedule(ctx, "distillation", student, cfg, StepCosts(0.0, durations=[1.0] * 100, **changed))
    student.step = student.schedule_steps  # finished
    assert not extend_schedule(ctx, "distillation", student, cfg, costs)


def test_a_refitted_schedule_may_be_shorter_and_needs_room_for_a_few_steps() -> None:
    """:func:`refit_schedule` lays a schedule out again from this step over the time left, shorter than planned too (its
    learning rate then anneals to the new end); never when fewer than :data:`EXTEND_MIN_SHARE` of it (two steps at least)
    fit, never a restored schedule or one whose revision is due."""
    from types import SimpleNamespace

    from nx46vx.runner.schedule import EXTEND_MIN_SHARE, StepCosts, refit_schedule

    clock = VirtualClock(tick=0.0)
    governor = Governor(BudgetConfig(total_s=1000, margin_s=0, reserve_per_volume_s=100, reserve_safety=1.0, features_share=0.0, search_share=0.0),
                        n_test=1, clock=clock)
    governor.enter("distillation")
    clock.now = 700.0
    events: list[tuple] = []
    ctx = SimpleNamespace(governor=governor, event=lambda *args: events.append(args))
    cfg = SimpleNamespace(val_every=100, checkpoint_every=10**6)
    student = SimpleNamespace(step=700, schedule_steps=960, val_every=100, val_from=0)
    costs = StepCosts(0.0, validation=0.0, checkpoint=0.0, durations=[1.0] * 700, budgeted=True)
    for changed in (dict(budgeted=False), dict(laid_out=5)):  # a restored schedule, a revision due
        assert not refit_schedule(ctx, "distillation", student, cfg, dataclasses.replace(costs, **changed))
    assert not events
    # 200 s left at 1 s a step, 3 % of it spare: 194 more steps, 66 fewer than planned
    assert refit_schedule(ctx, "distillation", student, cfg, costs)
    assert student.schedule_steps == 894 and student.val_from == 700 and events[-1][2]["reason"] == "refitted"
    # the least worth going on for: 2 % of 894 steps (17.88); 17 s left fit 16 steps, 19 s 18 (the deadline is at 900 s)
    assert EXTEND_MIN_SHARE == 0.02
    clock.now = student.step = 883
    assert not refit_schedule(ctx, "distillation", student, cfg, costs) and student.schedule_steps == 894
    clock.now = student.step = 881
    assert refit_schedule(ctx, "distillation", student, cfg, costs) and student.schedule_steps == 881 + 18
    # the closing work after the last step (the agreement probe) is set aside like the last validation: 5 s, 5 steps fewer
    clock.now = student.step = 700
    assert refit_schedule(ctx, "distillation", student, cfg, dataclasses.replace(costs, closing=5.0)) and student.schedule_steps == 894 - 5


def test_an_extended_schedule_spreads_its_validations_from_the_step_it_was_extended_at() -> None:
    """The validation that triggered an extension is the origin of the new spacing: the next one is a whole interval later
    (not at the next multiple of the new spacing), the last one at the new end, all of them within the time left; the
    origin is stored with the schedule."""
    from types import SimpleNamespace

    from nx46vx import distill
    from nx46vx.runner.schedule import StepCosts, extend_schedule

    clock = VirtualClock(tick=0.0)
    governor = Governor(BudgetConfig(total_s=1000, margin_s=0, reserve_per_volume_s=100, reserve_safety=1.0, features_share=0.0, search_share=0.0),
                        n_test=1, clock=clock)
    governor.enter("distillation")
    clock.now = 281.0
    ctx = SimpleNamespace(governor=governor, event=lambda *args: None)
    cfg = SimpleNamespace(val_every=10, checkpoint_every=10**6)
    network = torch.nn.Linear(1, 1)
    student = distill.DistillState(network, torch.optim.AdamW(network.parameters()), None, step=281, schedule_steps=520, val_every=281)
    costs = StepCosts(0.0, validation=20.0, checkpoint=0.0, durations=[1.0] * 281, budgeted=True)
    assert distill.validates_after(student, 281, default_every=cfg.val_every)  # the validation before the extension
    assert extend_schedule(ctx, "distillation", student, cfg, costs)
    total, every = student.schedule_steps, student.val_every
    assert student.val_from == 281 and every >= math.ceil(20.0 / (0.15 * 1.0)) and total > 520
    after = [s for s in range(282, total + 1) if distill.validates_after(student, s, default_every=cfg.val_every)]
    assert after[0] == 281 + every and after[-1] == total and (total - 281) % every == 0  # evenly spread up to the end
    assert (total - 281) * 1.0 + len(after) * 20.0 <= 0.97 * governor.phase_time_left("distillation")
    assert distill.state_dict(student)["val_from"] == 281


def test_settling_the_prefetcher_waits_for_the_batches_under_way() -> None:
    """A validation times what sizes the reserve: :meth:`Prefetcher.settle` returns only once no batch is being made, and the
    batches it waited for are the ones :meth:`Prefetcher.get` then returns (made once each)."""
    import time

    from nx46vx.runner.training_data import Prefetcher

    made: list[int] = []

    def make(step: int) -> dict[str, torch.Tensor]:
        time.sleep(0.02)
        made.append(step)
        return {"step": torch.tensor(step)}

    batches = Prefetcher(make, workers=2)
    try:
        assert int(batches.get(0)["step"]) == 0  # submits steps 0..4
        batches.settle()
        assert sorted(made) == [0, 1, 2, 3, 4]
        assert [int(batches.get(step)["step"]) for step in (1, 2)] == [1, 2] and sorted(made)[:5] == [0, 1, 2, 3, 4]
    finally:
        batches.close()
