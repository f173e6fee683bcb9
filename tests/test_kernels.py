"""The metric's and the tunnel repair's kernels compiled in a child process while the first phases run (nx46vx.runner.kernels)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import nx46vx
from nx46vx.runner import kernels
from nx46vx.runner.kernels import KernelCompilation, ready

from .conftest import FAST, events


class Events:
    """A stand-in for the run context: the events journaled."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def event(self, event: str, phase: str, data: dict[str, Any]) -> None:
        self.seen.append((event, phase, data))


def test_ready_says_whether_a_kernel_is_compiled_here_or_cached_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached kernel is ready in a process that has not compiled it; an uncached one is not; compiling makes it ready."""
    (tmp_path / "kernel_probe.py").write_text("import numba\n\n@numba.njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("kernel_probe")
    assert not ready(probe.twice) and not ready(probe.twice.py_func)  # not compiled; a plain function (numba's JIT off) is not either
    assert probe.twice(3) == 6
    assert ready(probe.twice)
    # another process finds it on disk (numba's cache beside the source) without compiling it
    code = "import kernel_probe; from nx46vx.runner.kernels import ready; print(ready(kernel_probe.twice), bool(kernel_probe.twice.signatures))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split() == ["True", "False"]
    (tmp_path / "kernel_probe.py").write_text("import numba\n\n@numba.njit(cache=True)\ndef twice(x):\n    return 2 * x + 0\n")
    # the source changed: the cached entry is not for it
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split() == ["False", "False"]


def test_no_child_starts_when_the_kernels_are_ready_or_no_interpreter_can(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "ready", lambda kernel: True)
    compilation = KernelCompilation.start()
    assert compilation.process is None
    ctx = Events()
    compilation.join(ctx, "distillation")
    compilation.join(ctx, "segmentation")  # once
    assert [(e, p, d["child"], d["returncode"]) for e, p, d in ctx.seen] == [("KERNELS_READY", "distillation", False, None)]
    monkeypatch.setattr(kernels, "ready", lambda kernel: False)
    monkeypatch.setattr(sys, "executable", "")  # an embedded interpreter: nothing to start a child with
    assert KernelCompilation.start().process is None


def test_a_child_that_fails_or_overruns_is_reported_and_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "ready", lambda kernel: False)
    monkeypatch.setattr(kernels, "CHILD_CODE", "import sys; sys.exit('no compiler here')")
    failing = KernelCompilation.start()
    ctx = Events()
    failing.join(ctx, "distillation")
    (_, _, data), = ctx.seen
    assert data["child"] is True and data["returncode"] == 1 and data["error"] == "no compiler here"
    monkeypatch.setattr(kernels, "CHILD_CODE", "import time; time.sleep(60)")
    slow = KernelCompilation.start()
    t0 = time.monotonic()
    slow.join(ctx, "distillation", timeout_s=0.5)
    assert time.monotonic() - t0 < 30
    assert slow.process is not None and slow.process.poll() is not None  # stopped, not left running
    assert ctx.seen[-1][2]["returncode"] is None and ctx.seen[-1][2]["error"] == "not done in 0.5 s"
    left = KernelCompilation.start()
    left.stop()  # the run ended before it was waited for
    assert left.process is not None and left.process.poll() is not None


def test_the_run_waits_for_the_child_before_the_students_first_step(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child runs beside discovery, features, search and the distillation's preparation (the window's price, the
    teachers' maps); the run waits for it before the student's first step and its first validation."""
    marker = tmp_path / "child-done"
    monkeypatch.setattr(kernels, "ready", lambda kernel: False)
    monkeypatch.setattr(kernels, "CHILD_CODE", f"import time, pathlib; time.sleep(1.0); pathlib.Path({str(marker)!r}).write_text('done')")
    nx46vx.run([demo_data], output=tmp_path / "out", profile="demo", overrides=FAST)
    journal = events(tmp_path / "out" / "journal.jsonl")
    ready_at = [i for i, e in enumerate(journal) if e["event"] == "KERNELS_READY"]
    assert len(ready_at) == 1
    record = journal[ready_at[0]]
    assert record["phase"] == "distillation" and record["data"]["child"] is True and record["data"]["returncode"] == 0
    assert record["data"]["child_s"] >= 1.0 and marker.read_text() == "done"  # waited for the child to end
    first = {name: min(i for i, e in enumerate(journal) if e["event"] == name) for name in ("DISTILLATION_INFERENCE", "DISTILLATION_SCHEDULE", "DISTILLATION_VALIDATION")}
    assert first["DISTILLATION_INFERENCE"] < ready_at[0] < min(first["DISTILLATION_SCHEDULE"], first["DISTILLATION_VALIDATION"])
    # a run whose distillation stops before its steps waits before the next phase
    monkeypatch.setattr(kernels, "CHILD_CODE", "import time; time.sleep(0.5)")
    nx46vx.run([demo_data], output=tmp_path / "off", profile="demo", overrides=FAST + ["distill.enabled=false"])
    journal = events(tmp_path / "off" / "journal.jsonl")
    assert [e["phase"] for e in journal if e["event"] == "KERNELS_READY"] == ["segmentation"]


def test_the_child_fills_numbas_cache(tmp_path: Path) -> None:
    """The child's code compiles the metric's and the repair's kernels into the cache a later process loads them from."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", kernels.CHILD_CODE], check=True, env=env, timeout=600)
    indexes = {path.name.split(".")[0] for path in tmp_path.rglob("*.nbi")}
    assert {"betti", "topology"} <= indexes, sorted(indexes)
    code = "from nx46vx import betti, topology; from nx46vx.runner.kernels import ready; print(ready(betti.ENTRY_KERNEL), ready(topology.ENTRY_KERNEL))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["True", "True"]
