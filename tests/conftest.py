from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nx46vx.synthetic import make_competition

SHAPES = ((40, 40, 40), (48, 40, 36), (36, 44, 40))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small competition-layout dataset with volumes of different shapes (read-only by convention)."""
    return make_competition(tmp_path_factory.mktemp("demo") / "data", n_train=6, n_test=2, shapes=SHAPES, seed=3)


# Small but complete: the full 135-candidate grid and 120 iterations on small samples.
FAST = ["distill.steps=30", "distill.checkpoint_every=10", "features.pool_per_class=3000", "search.samples_per_class=2000", "search.val_samples_per_class=2000", "search.max_epochs=2"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m nx46vx.cli`` in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k != "NX46VX_KILL_AT"}  # never inherit a crash point
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "nx46vx.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["run", "--input", str(data), "--output", str(out), "--profile", "demo"]
    for item in FAST:
        args += ["--set", item]
    return args + list(extra)
