"""Shared fixtures and helpers: demo data, the fast settings, CLI runs, journal and submission readers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import orjson
import pytest
import tifffile

from nx46vx.synthetic import make_competition

SHAPES = ((40, 40, 40), (48, 40, 36), (36, 44, 40))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small competition-layout dataset with volumes of different shapes (read-only by convention)."""
    return make_competition(tmp_path_factory.mktemp("demo") / "data", n_train=6, n_test=2, shapes=SHAPES, seed=3)


# Small but complete: the full 135-candidate grid and 120 iterations on small samples, a tiny student for a fixed
# number of steps, no time budget (a test that wants one sets it after these).
FAST = [
    "distill.steps=30", "distill.checkpoint_every=10", "distill.width=4", "distill.depth=2", "distill.patch=16", "distill.batch=2", "distill.inference_patch=24", "distill.val_every=10",
    "distill.warmup_steps=5", "features.pool_per_class=3000", "search.samples_per_class=2000", "search.val_samples_per_class=2000",
    "search.max_epochs=2", "budget.total_s=0",
]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m nx46vx.cli`` in a subprocess (never inheriting a crash point or a virtual clock)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("NX46VX_KILL_AT", "NX46VX_VIRTUAL_CLOCK")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "nx46vx.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    """``nx46vx run`` arguments for the demo profile with :data:`FAST`, then ``extra``."""
    args = ["run", "--input", str(data), "--output", str(out), "--profile", "demo"]
    for item in FAST:
        args += ["--set", item]
    return args + list(extra)


def events(journal: Path) -> list[dict]:
    """Every record of a journal, parsed."""
    return [orjson.loads(line) for line in journal.read_bytes().splitlines()]


def names(journal: Path) -> list[str]:
    """The event names of a journal, in order."""
    return [e["event"] for e in events(journal)]


def masks(submission: Path) -> dict[str, np.ndarray]:
    """``{member name: mask}`` of a submission zip."""
    with zipfile.ZipFile(submission) as zf:
        return {n: tifffile.imread(io.BytesIO(zf.read(n))) for n in sorted(zf.namelist())}


def assert_parity(out: Path, proc: subprocess.CompletedProcess[str], reference: dict) -> dict:
    """A finished CLI run whose model digest and submission masks equal ``reference``'s (``result``, ``masks``); returns its result."""
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["model_digest"] == reference["result"]["model_digest"]
    got = masks(out / "submission.zip")
    assert got.keys() == reference["masks"].keys()
    for name in got:
        assert np.array_equal(got[name], reference["masks"][name]), name
    return result
