"""One run per output folder: the ``flock`` on ``<output>/.nx46vx.lock`` (issue #13, point 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nx46vx
from nx46vx.errors import DataLayoutError, Nx46Error, OutputLockedError
from nx46vx.journal import verify
from nx46vx.runner.context import LOCK_NAME, OutputLock

from .conftest import FAST, run_args, run_cli

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows: a run there takes no lock")

# A run that is done in well under a second: one training volume, so no search and no distillation.
TINY = FAST + ["data.max_train_volumes=1"]
LOCKED = "another nx46vx run is using this output folder"


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_held_lock_fails_fast_and_writes_nothing(demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = OutputLock.acquire(out, run_id="holder")  # a second open file description conflicts, even in this process
    try:
        before = _tree(out)
        assert list(before) == [LOCK_NAME] and json.loads(before[LOCK_NAME])["pid"] == os.getpid()
        start = time.monotonic()
        with pytest.raises(OutputLockedError) as err:
            nx46vx.run([demo_data], output=out, profile="demo", overrides=TINY)
        assert time.monotonic() - start < 10
        assert isinstance(err.value, Nx46Error)
        message = str(err.value)
        assert LOCKED in message and f"pid {os.getpid()}" in message and str(out / LOCK_NAME) in message
        assert _tree(out) == before
        proc = run_cli(*run_args(demo_data, out))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"nx46vx: error: {LOCKED}" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert _tree(out) == before
    finally:
        holder.release()
    assert nx46vx.run([demo_data], output=out, profile="demo", overrides=TINY).status == "complete"


def test_a_lock_file_left_behind_does_not_block(demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # a process that takes the lock and is killed: its lock file stays, its lock goes with it
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "os.write(fd, ('{\"pid\": %d}\\n' % os.getpid()).encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            OutputLock.acquire(out)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (out / LOCK_NAME).is_file()
    result = nx46vx.run([demo_data], output=out, profile="demo", overrides=TINY)
    assert result.status == "complete"
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    OutputLock.acquire(out).release()  # released at the end of the run


def test_the_lock_is_released_when_a_run_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataLayoutError):
        nx46vx.run([tmp_path / "empty"], output=out, profile="demo", overrides=TINY)
    assert (out / LOCK_NAME).is_file()
    OutputLock.acquire(out).release()


def test_a_second_run_into_a_running_output_exits_at_once(demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # a few seconds of training after the journal opens: long enough to catch the first run mid-way
    slow = ["--set", "data.max_train_volumes=2", "--set", "search.max_epochs=1", "--set", "distill.steps=10"]
    env = {k: v for k, v in os.environ.items() if k not in ("NX46VX_KILL_AT", "NX46VX_VIRTUAL_CLOCK")}
    first = subprocess.Popen([sys.executable, "-m", "nx46vx.cli", *run_args(demo_data, out, *slow)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (out / "journal.jsonl").is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # frozen mid-run, still holding the lock: no race with its end
        try:
            assert first.poll() is None, "the first run ended before the second could start"
            second = run_cli(*run_args(demo_data, out))
            assert second.returncode == 2, second.stderr[-2000:]
            assert LOCKED in second.stderr and f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
            with pytest.raises(OutputLockedError, match=f"pid {first.pid}"):
                nx46vx.run([demo_data], output=out, profile="demo", overrides=TINY)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr[-2000:]
    assert json.loads(stdout)["status"] == "complete"
    assert not (out / "journals").exists()  # the second run never set the first one's journal aside
    report = verify(out / "journal.jsonl")
    assert report.ok and report.complete, report.message(out / "journal.jsonl")
