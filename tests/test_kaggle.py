"""The Kaggle workflow: the notebook runs top to bottom, the wheelhouse installs offline, publication."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

import nx46vx
from nx46vx.wheelhouse import DEFAULT_PACKAGES, build_wheelhouse

from .conftest import FAST

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_runs_on_demo_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("NX46VX_DEMO", "1")
    monkeypatch.setenv("NX46VX_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("NX46VX_SET", ";".join(FAST))
    nb = nbformat.read(ROOT / "notebooks" / "nx46vx_kaggle.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "status complete, global progress 100.0 %" in outputs
    assert "OK " in outputs and "Merkle roots verified" in outputs
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3  # two test volumes and the training curve
    assert (tmp_path / "out" / "submission.zip").is_file()


def test_wheelhouse_installs_offline(tmp_path: Path) -> None:
    wheels = build_wheelhouse(tmp_path / "wheels")
    names = {w.name.split("-")[0].replace("_", "-").lower() for w in wheels}
    assert names == {p.lower() for p in DEFAULT_PACKAGES}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    # Kaggle's image already has the scientific stack: the venv sees this machine's, and nothing from the network.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(tmp_path / "wheels"), "--ignore-installed", "--no-deps", *map(str, wheels)],
        check=True,
        env=env,
    )
    where = subprocess.run(
        [str(python), "-c", "import nx46vx, orjson, tifffile, imagecodecs, pynvml; print(nx46vx.__file__); print(orjson.__file__)"],
        check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
    ).stdout.split()
    assert all(str(venv) in w for w in where)
    help_text = subprocess.run([str(venv / "bin" / "nx46vx"), "--help"], check=True, capture_output=True, text=True, env=env, cwd=tmp_path).stdout
    assert "wheelhouse" in help_text


def _events(journal: Path) -> list[dict]:
    return [orjson.loads(line) for line in journal.read_bytes().splitlines()]


def test_publication_with_a_stand_in_kagglehub(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = tmp_path / "stand_in"
    stand_in.mkdir()
    log = tmp_path / "uploads.json"
    (stand_in / "kagglehub.py").write_text(
        "import json, os\n"
        "def model_upload(handle, local_model_dir, license_name=None, version_notes=''):\n"
        f"    open({str(log)!r}, 'a').write(json.dumps([handle, local_model_dir, sorted(os.listdir(local_model_dir))]) + '\\n')\n"
    )
    monkeypatch.syspath_prepend(str(stand_in))
    monkeypatch.delitem(sys.modules, "kagglehub", raising=False)
    out = tmp_path / "out"
    cheap = ["distill.enabled=false", "search.max_epochs=1"]  # publication does not depend on them
    overrides = FAST + ["publish.model_handle=me/nx46vx/pyTorch/default"] + cheap
    nx46vx.run([demo_data], output=out, profile="demo", overrides=overrides)
    uploads = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(uploads) == 1 and uploads[0][0] == "me/nx46vx/pyTorch/default"
    assert Path(uploads[0][1]).parent == out / "checkpoints" and "manifest.json" in uploads[0][2]
    assert "PUBLISH_OK" in [e["event"] for e in _events(out / "journal.jsonl")]
    # without a handle, or under kaggle-submit, nothing is uploaded and the journal says why
    nx46vx.run([demo_data], output=tmp_path / "plain", profile="demo", overrides=FAST + cheap)
    skipped = [e["data"]["reason"] for e in _events(tmp_path / "plain" / "journal.jsonl") if e["event"] == "PUBLISH_SKIPPED"]
    assert skipped == ["publish.model_handle is not set"]
    nx46vx.run([demo_data], output=tmp_path / "submit", profile="kaggle-submit", overrides=overrides)
    skipped = [e["data"]["reason"] for e in _events(tmp_path / "submit" / "journal.jsonl") if e["event"] == "PUBLISH_SKIPPED"]
    assert skipped == ["never under kaggle-submit"]
    assert len(log.read_text().splitlines()) == 1
