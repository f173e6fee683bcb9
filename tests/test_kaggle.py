"""The Kaggle workflow: the notebook runs top to bottom, the wheelhouse installs offline, publication."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

import nx46vx
from nx46vx.wheelhouse import DEFAULT_PACKAGES, build_wheelhouse

from .conftest import FAST, events

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


@pytest.mark.parametrize(
    ("environ", "profile"),
    [
        ({}, "kaggle-train"),
        ({"KAGGLE_IS_COMPETITION_RERUN": "True"}, "kaggle-submit"),
        ({"NX46VX_PROFILE": "demo"}, "demo"),
        ({"NX46VX_PROFILE": "demo", "KAGGLE_IS_COMPETITION_RERUN": "True"}, "demo"),
    ],
)
def test_notebook_picks_the_profile(environ: dict[str, str], profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cells = json.loads((ROOT / "notebooks" / "nx46vx_kaggle.ipynb").read_text())["cells"]
    [source] = ["".join(c["source"]) for c in cells if c["cell_type"] == "code" and "# nx46vx:profile:" in "".join(c["source"])]
    for name in ("NX46VX_PROFILE", "KAGGLE_IS_COMPETITION_RERUN", "NX46VX_DEMO"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    scope = {"os": os, "Path": Path}  # what the notebook's first cell imported
    exec(compile(source, "nx46vx_kaggle.ipynb", "exec"), scope)
    assert scope["PROFILE"] == profile


def test_wheelhouse_installs_offline(tmp_path: Path) -> None:
    wheels = build_wheelhouse(tmp_path / "wheels")
    names = {w.name.split("-")[0].replace("_", "-").lower() for w in wheels}
    assert names == {p.lower() for p in DEFAULT_PACKAGES}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    # Kaggle's image already has the scientific stack: the venv sees this machine's, and nothing from the network.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    # When this suite itself runs in a venv, --system-site-packages shows the base interpreter's site-packages, not
    # the running environment's: list the latter in a .pth file. Its lines are appended after the inner venv's own
    # site-packages, so the wheels installed below still win.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()
    (Path(purelib) / "_outer_site_packages.pth").write_text("".join(f"{d}\n" for d in site.getsitepackages()))
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
    assert "PUBLISH_OK" in [e["event"] for e in events(out / "journal.jsonl")]
    # without a handle, or under kaggle-submit, nothing is uploaded and the journal says why
    nx46vx.run([demo_data], output=tmp_path / "plain", profile="demo", overrides=FAST + cheap)
    skipped = [e["data"]["reason"] for e in events(tmp_path / "plain" / "journal.jsonl") if e["event"] == "PUBLISH_SKIPPED"]
    assert skipped == ["publish.model_handle is not set"]
    nx46vx.run([demo_data], output=tmp_path / "submit", profile="kaggle-submit", overrides=overrides)
    skipped = [e["data"]["reason"] for e in events(tmp_path / "submit" / "journal.jsonl") if e["event"] == "PUBLISH_SKIPPED"]
    assert skipped == ["never under kaggle-submit"]
    assert len(log.read_text().splitlines()) == 1
