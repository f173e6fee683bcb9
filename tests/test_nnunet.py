"""nnU-Net v2 model folders as teachers: built by nnunetv2 itself, predicted as its nnUNetPredictor predicts, never unpickled freely."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import nx46vx
from nx46vx import checkpoint as ckpt
from nx46vx import distill, nnunet, student
from nx46vx.config import DistillConfig, load_config
from nx46vx.errors import ModelFolderError
from nx46vx.metric import score_volume
from nx46vx.segment import PERCENTILE, plain_params, postprocess, sliding_window
from nx46vx.volumes import read_volume

from .conftest import FAST, assert_parity, events, masks, run_args, run_cli

nnunetv2 = pytest.importorskip("nnunetv2")

PATCH = [32, 32, 32]


def _plans(normalization: str) -> dict:
    """Tiny 3d_fullres plans in nnU-Net v2's layout (a 3-stage PlainConvUNet, patch 32)."""
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset001_Vesuvius", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [64, 64, 64], "image_reader_writer": "Tiff3DIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2, "patch_size": PATCH,
            "median_image_size_in_voxels": [64, 64, 64], "spacing": [1.0, 1.0, 1.0], "normalization_schemes": [normalization], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
            "resampling_fn_seg_kwargs": dict(resampling, is_seg=True, order=1), "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": dict(resampling, order=1),
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 3,
                                "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 255.0, "mean": 120.0, "median": 118.0, "min": 0.0, "percentile_00_5": 10.0,
                                                               "percentile_99_5": 240.0, "std": 40.0}},
    }


def make_model_folder(folder: Path, *, normalization: str = "ZScoreNormalization", folds: int = 1, extra: dict | None = None, head_scale: float = 1.0) -> Path:
    """A trained-model folder as nnU-Net v2 writes it: plans, dataset (label 2 = ignore), and per fold the checkpoint its trainer saves.

    The network comes from nnunetv2's own ``get_network_from_plans`` (random weights, a different seed per fold), the
    checkpoint has every key ``nnUNetTrainer.save_checkpoint`` writes, its training log holding numpy scalars.
    ``head_scale`` multiplies the output layers (a confident map: few voxels near a threshold).
    """
    from nnunetv2.training.logging.nnunet_logger import LocalLogger
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = _plans(normalization)
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "surface": 1, "ignore": 2}, "numTraining": 4, "file_ending": ".tif"}
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    manager = PlansManager(plans)
    config, labels = manager.get_configuration("3d_fullres"), manager.get_label_manager(dataset)
    for fold in range(folds):
        torch.manual_seed(fold)
        network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs, config.network_arch_init_kwargs_req_import, 1,
                                         labels.num_segmentation_heads, deep_supervision=True)
        with torch.no_grad():
            for layer in network.decoder.seg_layers:
                layer.weight *= head_scale
        optimizer = torch.optim.SGD(network.parameters(), 0.01, momentum=0.99, nesterov=True)
        log = LocalLogger()
        for key, value in (("mean_fg_dice", np.float64(0.4)), ("ema_fg_dice", np.float64(0.4)), ("dice_per_class_or_region", [np.float64(0.4)]),
                           ("train_losses", np.float32(-0.2)), ("lrs", 0.01), ("epoch_start_timestamps", 1.7e9)):
            log.log(key, value, 0)
        checkpoint = {"network_weights": network.state_dict(), "optimizer_state": optimizer.state_dict(), "grad_scaler_state": None, "logging": log.get_checkpoint(),
                      "_best_ema": np.float64(0.4), "current_epoch": 1,
                      "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold, "dataset_json": dataset, "device": torch.device("cpu")},
                      "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2), **(extra or {})}
        (folder / f"fold_{fold}").mkdir()
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def _volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Random intensities with zero slabs at two borders (nnU-Net crops to the nonzero region)."""
    volume = np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)
    volume[:3] = 0
    volume[:, :, -5:] = 0
    return volume


def _reference(folder: Path, volume: np.ndarray, *, folds: tuple[int | str, ...], mirror: bool) -> np.ndarray:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror, perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds, checkpoint_name="checkpoint_final.pth")
    _, probs = predictor.predict_single_npy_array(volume[None].astype(np.float32), {"spacing": [1.0, 1.0, 1.0]}, None, None, True)
    return probs[1]


@pytest.mark.parametrize(("normalization", "folds", "mirror"), [("ZScoreNormalization", 1, True), ("CTNormalization", 2, False)])
def test_the_teacher_map_is_nnunetpredictors(normalization: str, folds: int, mirror: bool, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model", normalization=normalization, folds=folds)
    volume = _volume((36, 41, 30))  # smaller than two patches, cropped on two axes, padded on none
    model = nnunet.load_model(folder)
    ours = nnunet.probability(model, volume, mirror=mirror)
    theirs = _reference(folder, volume, folds=tuple(range(folds)), mirror=mirror)
    assert ours.shape == volume.shape and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-4
    assert ours[:3].max() == 0.0 and 0.0 < ours[5:, :, :-6].min()  # outside the nonzero crop: no surface
    assert model.mirror_axes == (0, 1, 2) and model.heads == 2 and len(model.folds) == folds  # label 2 is nnU-Net's ignore label: no head


def test_a_volume_smaller_than_the_patch_is_padded_as_nnunet_pads_it(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    volume = _volume((20, 33, 27), seed=1)
    theirs = _reference(folder, volume, folds=(0,), mirror=False)
    assert np.abs(nnunet.probability(nnunet.load_model(folder), volume) - theirs).max() < 1e-4


class _CreatesAFile:
    """Unpickling this object creates ``path``: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


def test_a_checkpoint_holding_another_object_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    folder = make_model_folder(tmp_path / "model", extra={"trainer_state": _CreatesAFile(planted)})
    with pytest.raises(ModelFolderError, match="refused") as err:
        nnunet.load_model(folder)
    assert err.value.found == "the global io.open" and err.value.path.endswith("checkpoint_final.pth")
    assert not planted.exists()


def test_a_planted_teacher_folder_stops_the_run_at_discovery_before_any_search(demo_data: Path, tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    make_model_folder(tmp_path / "attached" / "model", extra={"trainer_state": _CreatesAFile(planted)})
    with pytest.raises(ModelFolderError, match="refused"):
        nx46vx.run([demo_data, tmp_path / "attached"], output=tmp_path / "out", profile="demo", overrides=FAST + ['distill.teachers=["ensemble", "nnunet:model"]'])
    journal = events(tmp_path / "out" / "journal.jsonl")
    checks = [e["data"] for e in journal if e["event"] == "MODEL_CHECK"]
    assert [(c["role"], c["spec"], c["ok"]) for c in checks] == [("teacher", "nnunet:model", False)] and "the global io.open" in checks[0]["error"]
    assert {e["phase"] for e in journal if e["event"] == "PHASE_END"} == {"discovery"} and not planted.exists()
    assert (tmp_path / "out" / "submission.zip").is_file()  # the baseline submission was written before the check


@pytest.mark.parametrize(("key", "value", "message"), [
    ("network_class_name", "subprocess.Popen", "network this package does not build"),
    ("conv_op", "os.system", "operation outside the allowed ones"),
])
def test_plans_naming_other_code_are_refused(key: str, value: str, message: str, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    (arch if key in arch else arch["arch_kwargs"])[key] = value
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelFolderError, match=message) as err:
        nnunet.load_model(folder)
    assert err.value.found == value


def test_an_empty_or_resampling_folder_is_a_named_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "plans.json").write_text("{}")
    (tmp_path / "empty" / "dataset.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="no trained fold"):
        nnunet.load_model(tmp_path / "empty")
    folder = make_model_folder(tmp_path / "model")
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = [2.0, 1.0, 1.0]
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelFolderError, match="resampling"):
        nnunet.load_model(folder)


def test_an_nnunet_folder_teaches_the_student(demo_data: Path, tmp_path: Path) -> None:
    make_model_folder(tmp_path / "attached" / "Dataset001_Vesuvius" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    spec = "nnunet:Dataset001_Vesuvius/nnUNetTrainer__nnUNetPlans__3d_fullres"  # relative to an input root, as on Kaggle
    result = nx46vx.run([demo_data, tmp_path / "attached"], output=tmp_path / "out", profile="demo",
                        overrides=FAST + [f'distill.teachers=["ensemble", "{spec}"]', "search.max_epochs=1"])
    journal = events(tmp_path / "out" / "journal.jsonl")
    loaded = [e["data"] for e in journal if e["event"] == "DISTILLATION_TEACHER_LOAD_END"]
    assert [d["teacher"] for d in loaded] == ["ensemble", spec] and all(d["ok"] for d in loaded)
    checked = [e for e in journal if e["event"] == "MODEL_CHECK"]  # at discovery: the folder was checked before any search
    assert [(e["phase"], e["data"]["spec"], e["data"]["ok"]) for e in checked] == [("discovery", spec, True)]
    end = next(e["data"] for e in journal if e["event"] == "DISTILLATION_END")
    assert end["teacher_coverage_percent"][spec] == 100.0 and end["steps"] == 30
    report = next(e["data"] for e in journal if e["event"] == "VALIDATION_REPORT")
    assert 0.0 <= report["teachers"][spec] <= 1.0 and result.status == "complete"
    assert len(list((tmp_path / "out" / "cache" / "teachers").glob("*.npz"))) == 2 * 4  # both teachers' maps of the 4 training volumes


# ----------------------------------------------------------------------------- a student started from an nnU-Net model

# the student settings whose network is the test plans' (PlainConvUNet, 8-16-32 features, 2 convolutions per stage)
MATCHING = DistillConfig(arch="plain", width=8, depth=2, patch=32, init="nnunet:model", teachers=())


@pytest.mark.parametrize("normalization", ["ZScoreNormalization", "CTNormalization"])
def test_a_student_started_from_a_folder_predicts_the_models_map(normalization: str, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model", normalization=normalization, folds=2)
    model = nnunet.load_initial(folder / "fold_1")  # a named fold; the folder alone starts from its first
    assert model.fold_names == ("1",) and nnunet.load_initial(folder).fold_names == ("0",)
    student = distill.init_state(MATCHING, seed=0, device=torch.device("cpu"), init=model)
    assert student.intensity == nnunet.input_intensity(model) and student.intensity.scheme == normalization
    volume = np.random.default_rng(2).integers(1, 255, (32, 32, 32)).astype(np.uint8)  # one window, no zero border to crop
    ours = sliding_window(volume, student.network.eval(), patch=32, intensity=student.intensity)
    differs = np.abs(ours - nnunet.probability(model, volume))
    # nnU-Net accumulates its logits in float16: within a window's outer 4 voxels its Gaussian weight underflows and
    # its map is coarse (nnUNetPredictor's own, which nnunet.probability matches); inside, they agree to float16
    assert differs[4:-4, 4:-4, 4:-4].max() < 2e-3 and differs.mean() < 2e-3
    # the other fold, and a student of other settings, are other networks
    assert np.abs(ours - nnunet.probability(nnunet.load_initial(folder), volume)).max() > 0.05
    with pytest.raises(ModelFolderError, match="does not match the student's settings") as err:
        distill.init_state(replace(MATCHING, width=4), seed=0, device=torch.device("cpu"), init=model)
    assert err.value.expected == {"features_per_stage": [4, 8, 16]} and err.value.found == {"features_per_stage": [8, 16, 32]}
    assert err.value.hint == "set distill.arch = plain, distill.width = 8, distill.depth = 2"
    with pytest.raises(ModelFolderError, match="network_class_name"):
        distill.init_state(replace(MATCHING, arch="resenc"), seed=0, device=torch.device("cpu"), init=model)


def _models_validation_score(model: nnunet.NnUNetModel, data: Path, journal: list[dict], overrides: list[str]) -> float:
    """The model's own score on the volumes the student is validated on (the run's first ``distill.val_volumes`` kept ones)."""
    config = load_config("demo", overrides=overrides)
    split = next(e["data"]["split"] for e in journal if e["event"] == "DATASET_DISCOVERY")
    excluded = {e["data"]["id"] for e in journal if e["event"] == "VALIDATION_EXCLUDED"}
    kept = [v for v in split["val_ids"][: config.segment.validation_volumes] if v not in excluded][: config.distill.val_volumes]
    seg, scores = config.segment, []
    for vol_id in kept:
        image, label = read_volume(data / "train_images" / f"{vol_id}.tif"), read_volume(data / "train_labels" / f"{vol_id}.tif")
        scores.append(score_volume(postprocess(nnunet.probability(model, image), plain_params(seg), seg)[0], label).score)
    return float(np.mean(scores))


def test_a_student_fine_tuned_from_a_folder_starts_at_its_score_and_resumes_bit_for_bit(demo_data: Path, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "attached" / "model", head_scale=30.0)  # confident: few voxels near the threshold
    settings = ["distill.init=nnunet:model", "distill.teachers=[]", "distill.arch=plain", "distill.width=8", "distill.depth=2", "distill.patch=32", "distill.inference_patch=0"]
    extra = ["--input", str(tmp_path / "attached")] + [arg for item in settings for arg in ("--set", item)]
    ref = run_cli(*run_args(demo_data, tmp_path / "ref", *extra))
    assert ref.returncode == 0, ref.stderr
    journal = events(tmp_path / "ref" / "journal.jsonl")
    start = next(e["data"] for e in journal if e["event"] == "DISTILLATION_START")
    assert start["init"] == "nnunet:model" and start["teacher_input"] is False  # the demo's prior input is off: one input channel
    model = nnunet.load_initial(folder)
    init = next(e["data"] for e in journal if e["event"] == "DISTILLATION_INIT")
    assert (init["fold"], init["sha256"], init["normalization"]) == ("0", model.sha256, "ZScoreNormalization")
    checked = [(e["data"]["role"], e["data"]["ok"]) for e in journal if e["event"] == "MODEL_CHECK"]
    assert checked == [("init", True)]
    # step 0 is the model itself: the student starts at the model's own validation score (up to the coarse float16
    # map nnU-Net's own inference makes at window borders, which on these 36-48 voxel volumes are a large share)
    first = next(e["data"] for e in journal if e["event"] == "DISTILLATION_VALIDATION")
    assert first["step"] == 0 and first["scored"] == "network"
    assert abs(first["score"] - _models_validation_score(model, demo_data, journal, FAST + settings)) < 0.02
    # killed mid-fine-tune, resumed: the same student and masks, bit for bit
    reference = {"result": json.loads(ref.stdout), "masks": masks(tmp_path / "ref" / "submission.zip")}
    killed = run_cli(*run_args(demo_data, tmp_path / "out", *extra), env={"NX46VX_KILL_AT": "DISTILLATION_LOSS_STEP:15"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert_parity(tmp_path / "out", run_cli(*run_args(demo_data, tmp_path / "out", *extra)), reference)
    resumed = events(tmp_path / "out" / "journal.jsonl")
    assert next(e["data"]["step"] for e in resumed if e["event"] == "DISTILLATION_BATCH_BEGIN") == 11  # from step 10's checkpoint


def test_a_start_whose_network_differs_from_the_students_stops_the_run_at_discovery(demo_data: Path, tmp_path: Path) -> None:
    make_model_folder(tmp_path / "attached" / "model")
    overrides = FAST + ["distill.init=nnunet:model", "distill.teachers=[]", "distill.arch=plain", "distill.width=4", "distill.depth=2"]
    with pytest.raises(ModelFolderError, match="does not match the student's settings"):
        nx46vx.run([demo_data, tmp_path / "attached"], output=tmp_path / "out", profile="demo", overrides=overrides)
    journal = events(tmp_path / "out" / "journal.jsonl")
    checks = [e["data"] for e in journal if e["event"] == "MODEL_CHECK"]
    assert [(c["role"], c["ok"]) for c in checks] == [("init", False)] and "distill.width = 8" in checks[0]["error"]
    assert {e["phase"] for e in journal if e["event"] == "PHASE_END"} == {"discovery"} and (tmp_path / "out" / "submission.zip").is_file()


# ----------------------------------------------------------------------------- the student out: an nnU-Net folder


def test_an_exported_student_predicts_with_nnunetpredictor_as_predict_does(demo_data: Path, tmp_path: Path) -> None:
    settings = ["distill.teacher_input=false", "distill.normalization=ZScoreNormalization", "distill.inference_patch=0"]  # nnU-Net predicts at the training patch
    proc = run_cli(*run_args(demo_data, tmp_path / "out", *[arg for item in settings for arg in ("--set", item)]))
    assert proc.returncode == 0, proc.stderr
    exported = run_cli("export-nnunet", str(tmp_path / "out"), str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr
    folder = tmp_path / "exported"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == ["dataset.json", "fold_all", "fold_all/checkpoint_final.pth", "plans.json"]
    path = sorted((demo_data / "test_images").glob("*.tif"))[0]
    image, label = read_volume(path), read_volume(demo_data / "test_labels" / path.name)
    ours = nx46vx.predict(image, model=tmp_path / "out", inference="nnunet", flip_tta=True, overlap=0.5)
    theirs = _reference(folder, image, folds=("all",), mirror=True)
    assert np.abs(ours.probability - theirs).max() < 1e-4
    # the student the run segments with: its own inference blends probabilities rather than logits, with a wider
    # Gaussian (measured: 0.010 mean difference, scores 0.7345 vs 0.7328)
    own = nx46vx.predict(image, model=tmp_path / "out", flip_tta=True, overlap=0.5)
    assert np.abs(own.probability - ours.probability).mean() < 0.03
    assert abs(score_volume(own.mask, label).score - score_volume(ours.mask, label).score) < 0.01
    # the folder is also a start: a student of the same settings started from it is the run's student, weight for weight
    saved = ckpt.load_payload(ckpt.latest_committed(tmp_path / "out" / "checkpoints"), "distillation")
    config = DistillConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["network"].items()})
    model = nnunet.load_initial(folder)
    assert (model.fold_names, model.normalization, model.mirror_axes, model.patch) == (("all",), "ZScoreNormalization", (0, 1, 2), (config.patch,) * 3)
    started = distill.init_state(replace(config, init="nnunet:exported"), seed=1, device=torch.device("cpu"), init=model)
    trained = saved["student"]["best"]["weights"] if saved["student"].get("best") else saved["student"]["student"]
    assert all(torch.equal(value, trained[key]) for key, value in started.network.state_dict().items())
    # an earlier export is replaced; any other folder (here the run's output) is refused, left as it was
    again = run_cli("export-nnunet", str(tmp_path / "out"), str(folder))
    assert again.returncode == 0, again.stderr
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    refused = run_cli("export-nnunet", str(tmp_path / "out"), str(tmp_path / "out"))
    assert refused.returncode != 0 and "not an nnU-Net model folder" in refused.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_a_student_nnunet_cannot_normalise_is_not_exported_and_a_named_scheme_must_be_the_starts(tmp_path: Path) -> None:
    description = student.architecture("plain", width=4, depth=2, blocks=(1,))
    weights = student.nnunet_weights(student.build_network("plain", width=4, depth=2, blocks=(1,)))
    assert all(weights[k].shape[0] == 2 and not weights[k][0].any() for k in weights if k.startswith("decoder.seg_layers."))  # background = 0
    percentile = nnunet.model_of(description, weights, patch=(16, 16, 16), intensity=PERCENTILE, folder=tmp_path)
    with pytest.raises(ModelFolderError, match="no scheme") as err:
        nnunet.write_folder(tmp_path / "exported", percentile)
    assert err.value.found == "percentile" and "distill.normalization" in err.value.hint and not list(tmp_path.iterdir())
    model = nnunet.load_model(make_model_folder(tmp_path / "model"))
    with pytest.raises(ModelFolderError, match="distill.normalization differs") as err:
        distill.student_intensity(replace(MATCHING, normalization="RescaleTo01Normalization"), model)
    assert (err.value.expected, err.value.found) == ("RescaleTo01Normalization", "ZScoreNormalization")
    assert distill.student_intensity(replace(MATCHING, normalization="ZScoreNormalization"), model) == nnunet.input_intensity(model)
