"""Settings are validated when loaded: every numeric setting has a range, every enum its values, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from nx46vx.cli import main
from nx46vx.config import CHOICES, FREE_TEXT, RANGES, RunConfig, load_config, settings
from nx46vx.errors import ConfigError


def test_every_setting_has_a_range_or_its_allowed_values() -> None:
    missing = []
    for key, value in settings(RunConfig()).items():
        values = value if isinstance(value, tuple) else (value,)
        if isinstance(value, bool) or key in FREE_TEXT:
            continue
        if all(isinstance(v, (int, float)) for v in values) and key not in RANGES:
            missing.append(key)
        if all(isinstance(v, str) for v in values) and key not in CHOICES:
            missing.append(key)
    assert not missing, f"settings without validation: {missing}"
    for profile in ("default", "demo", "kaggle-train", "kaggle-submit"):
        load_config(profile)  # the shipped profiles hold


BAD = [
    ("distill.patch=0", "distill.patch", ">= 2"),
    ("distill.patch=36", "distill.patch", "multiple of 2**depth"),
    ("distill.inference_patch=100", "distill.inference_patch", "0 or a positive multiple of 2**depth = 8"),
    ("distill.batch=0", "distill.batch", ">= 1"),
    ("search.block_rows=0", "search.block_rows", ">= 1"),
    ("search.device=tpu", "search.device", "cuda:<index>"),
    ("features.device=gpu0", "features.device", "auto, cpu"),
    ("distill.arch=unet3000", "distill.arch", "resenc"),
    ("distill.normalization=CTNormalization", "distill.normalization", "ZScoreNormalization"),
    ("segment.method=magic", "segment.method", "baseline"),
    ("search.l1=[0.001,-0.5]", "search.l1", "for every value"),
    ("features.entropy_window=4", "features.entropy_window", "odd"),
    ("features.smooth_sigma=0", "features.smooth_sigma", "> 0"),
    ("segment.overlap=1.0", "segment.overlap", "< 1"),
    ("budget.total_s=-5", "budget.total_s", ">= 0"),
    ("budget.reserve_safety=0.5", "budget.reserve_safety", ">= 1"),
    ("distill.teachers=['nonsense']", "distill.teachers", "torchscript:<path>"),
    ("distill.augment=['flip','warp']", "distill.augment", "names from"),
    ("distill.lr=nan", "distill.lr", "> 0"),
    ("seed=-1", "seed", ">= 0"),
]


@pytest.mark.parametrize(("override", "key", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_setting_names_key_expected_and_found(override: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("demo", overrides=[override])
    message = str(info.value)
    assert f"invalid setting {key}" in message and expected in message and "got" in message


def test_bad_setting_stops_the_cli_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["run", "--input", str(tmp_path / "nothing-here"), "--output", str(out), "--profile", "demo", "--set", "distill.batch=0"])
    captured = capsys.readouterr()
    assert code != 0
    assert "invalid setting distill.batch" in captured.err + captured.out
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()  # nothing was created: the settings were refused before discovery


def test_debug_shows_the_traceback_of_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--set", "distill.batch=0"]
    assert main(["--debug", *args]) == 2
    assert "Traceback" in capsys.readouterr().err
