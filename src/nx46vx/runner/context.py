"""``RunContext``: the services every phase uses — journal, governor, progress, checkpointer, reports.

``with ctx.phase(name):`` opens a phase (``PHASE_START``, its budget, a log line)
and closes it (``PHASE_END`` with its seconds, ``GLOBAL_STATS.json``, a progress
report, ``HEALTH``, a journal sync), whatever happens inside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

from ..config import RunConfig
from ..errors import OutputLockedError, OutputNotWritableError
from ..features import resolve_device
from ..governor import TRAINING_PHASES, Governor
from ..journal import ChainLink, Journal
from ..progress import Progress
from ..telemetry import boot_info, health
from .checkpointer import Checkpointer
from .quota import OutputQuota
from .reporter import Reporter

if TYPE_CHECKING:
    from .kernels import KernelCompilation
    from .phases.base import Phase
    from .state import RunState

log = logging.getLogger("nx46vx")

MIN_FREE_BYTES = 64 << 20


#: Folders a run writes into; those a previous run left in the output are probed too (a read-only ``checkpoints/``
#: must stop the run at its start, not at its first checkpoint hours later).
WRITTEN_FOLDERS = (".", "checkpoints", "cache", "cache/features", "cache/foreground", "masks", "journals", "previews", "probabilities")


def probe_writable(folder: Path) -> None:
    """Write, fsync and remove a 4 KiB file in ``folder``; raises OSError when that fails."""
    probe = folder / f".nx46vx-probe-{os.getpid()}"
    with open(probe, "wb") as handle:
        handle.write(b"0" * 4096)
        handle.flush()
        os.fsync(handle.fileno())
    probe.unlink()


def check_output_writable(output: Path) -> None:
    """Fail before any work when the output folder (or a folder of it the run writes into) cannot hold the run's files."""
    for name in WRITTEN_FOLDERS:
        folder = output / name
        try:
            if name == ".":
                folder.mkdir(parents=True, exist_ok=True)
            elif not folder.is_dir():
                continue
            probe_writable(folder)
        except OSError as exc:
            raise OutputNotWritableError("output folder is not writable", path=folder, expected="a writable folder", found=str(exc)) from None
    free = shutil.disk_usage(output).free
    if free < MIN_FREE_BYTES:
        raise OutputNotWritableError(
            "output folder is nearly full", path=output, expected=f">= {MIN_FREE_BYTES >> 20} MiB free", found=f"{free >> 20} MiB free"
        )


LOCK_NAME = ".nx46vx.lock"


class OutputLock:
    """One run per output folder: an exclusive ``flock`` on ``<output>/.nx46vx.lock`` held for the whole run.

    The kernel drops the lock when its holder exits, however it dies, so a lock file
    left behind by a killed run blocks nothing: only a live holder does. The file is
    never deleted (unlinking a lock file lets two runs lock two different files) and
    holds the holder's pid, host and run id for the message a second run shows. On a
    platform without ``fcntl`` (Windows) there is no lock.

    Use :meth:`acquire`; :meth:`release` is idempotent.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, output: Path, *, run_id: str = "") -> "OutputLock":
        """Create ``output`` if needed and lock it, or raise :class:`OutputLockedError` at once when another run holds it.

        Raises
        ------
        OutputLockedError
            Another live process holds the lock.
        OutputNotWritableError
            The folder or its lock file cannot be created.

        A file system without ``flock`` (some network mounts) gets no lock and a warning.
        """
        path = output / LOCK_NAME
        if fcntl is None:
            log.debug("no fcntl on this platform: %s is not locked against a second run", output)
            return cls(path, -1)
        try:
            output.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputNotWritableError("output folder is not writable", path=output, expected="a writable folder", found=str(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _lock_holder(fd)
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise OutputLockedError(
                    "another nx46vx run is using this output folder", path=output, expected="no other run writing into it",
                    found=f"a live run holding {path} ({holder})", hint="wait for that run to finish, or pass another --output",
                ) from None
            log.warning("the file system refuses flock (%s): %s is not locked against a second run", exc, output)
            return cls(path, -1)
        with contextlib.suppress(OSError):  # who holds it is for the message of a second run only
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id}).encode() + b"\n")
        return cls(path, fd)

    def release(self) -> None:
        """Unlock and close (the file stays: see the class docstring)."""
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


def _lock_holder(fd: int) -> str:
    """``pid …`` of the run holding a lock file, as it wrote it (it may not have yet)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid, host = info.get("pid"), info.get("host")
    except (OSError, ValueError, AttributeError):
        pid = host = None
    if pid is None:
        return "pid not written yet"
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def install_log_handler() -> logging.Handler | None:
    """Give the ``nx46vx`` logger a stderr handler at INFO when nothing would show its lines.

    Progress bars hide themselves off a terminal (a notebook's batch log, a redirected
    run), so the runner's concise log lines are what a user sees there.
    """
    if log.handlers or logging.getLogger().handlers:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nx46vx %(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


class RunContext:
    """Services of one ``run()`` call; phases reach everything outside :class:`RunState` through it.

    Parameters
    ----------
    config : RunConfig
    output : Path
        The output folder.
    input_roots : sequence of Path or None
        Folders to search for data and previous runs (None: every folder under ``/kaggle/input``).
    resume : str
        ``auto``, ``never`` or a path.
    phases : sequence of Phase
        The phases of this run, in order (the checkpointer saves and restores each).
    clock : callable
        Monotonic clock of the governor (a :class:`~nx46vx.governor.VirtualClock` in tests).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        output: Path,
        input_roots: Sequence[Path] | None,
        resume: str,
        phases: Sequence["Phase"],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.output = output
        self.input_roots = input_roots
        self.resume = resume
        self.phases = list(phases)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.wall_start = time.monotonic()
        self.governor = Governor(config.budget, n_test=0, clock=clock)
        self.progress = Progress()
        self.device = resolve_device(config.search.device)
        self.distill_device = resolve_device(config.distill.device)
        self.journal: Journal | None = None
        self._pending: list[tuple[str, str, dict[str, Any]]] = []
        self.previous_journal: Path | None = None
        self.lock: OutputLock | None = None
        self.io_seconds = 0.0
        self.quota = OutputQuota(output, config.output.quota_gb)
        self.reporter = Reporter(self)
        self.checkpointer = Checkpointer(self)
        self.kernels: "KernelCompilation | None" = None  # the kernels' compilation beside the run, while one runs
        self._handler = install_log_handler()

    def kernels_ready(self, phase: str) -> None:
        """Wait, once, for the kernels compiled beside the run (:meth:`~nx46vx.runner.kernels.KernelCompilation.join`); ``phase``
        is the one about to use them or to time its work. Nothing to wait for when no compilation runs."""
        if self.kernels is not None:
            self.kernels.join(self, phase)

    @contextlib.contextmanager
    def session(self, state: "RunState") -> Iterator[None]:
        """The run's frame: the output folder locked and checked before any work, signals turned into a graceful stop,
        everything released at the end (the lock last)."""
        try:
            self.lock = OutputLock.acquire(self.output, run_id=self.run_id)
            check_output_writable(self.output)
            self.reporter.state = state
            self.governor.install_signal_handlers()
            try:
                self.set_aside_previous_journal()
                yield
            finally:
                self.governor.restore_signal_handlers()
        finally:
            self.close()

    # ------------------------------------------------------------------ journal

    def event(self, event: str, phase: str, data: dict[str, Any] | None = None) -> None:
        """Journal an event (held until the journal opens, right after discovery)."""
        if self.journal is None:
            self._pending.append((event, phase, data or {}))
        else:
            self.journal.record(event, phase, data or {})

    def set_aside_previous_journal(self) -> None:
        """Move an earlier run's ``journal.jsonl`` in this folder to ``journals/`` (the new one continues its chain)."""
        previous = self.output / "journal.jsonl"
        if previous.exists():
            journals = self.output / "journals"
            journals.mkdir(exist_ok=True)
            target = journals / f"journal-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.jsonl"
            os.replace(previous, target)
            self.previous_journal = target

    def open_journal(self, link: ChainLink, run_start: dict[str, Any]) -> None:
        """Open ``journal.jsonl`` continuing ``link``; write ``RUN_START``, ``BOOT`` and what was held.

        When the journal ``link`` was read from is damaged, the chain continues from its
        last good record and ``JOURNAL_DAMAGED`` (file, line, what is wrong) follows ``RUN_START``.
        """
        self.journal = Journal(self.output / "journal.jsonl", run_id=self.run_id, link=link)
        self.journal.record("RUN_START", "run", run_start)
        if link.damage is not None:
            log.warning("%s", link.damage.message())
            self.journal.record("JOURNAL_DAMAGED", "run", link.damage.to_data(link))
        self.journal.record("BOOT", "run", boot_info())
        for event, phase, data in self._pending:
            self.journal.record(event, phase, data)
        self._pending.clear()

    def admit_cache(self, path: Path, nbytes: int, phase: str) -> bool:
        """Whether a cache file of ``nbytes`` may be written under the output quota; a refusal is journaled (``OUTPUT_QUOTA``).

        Main thread only (the journal is not thread-safe): background loaders ask ``quota.allow`` directly.
        """
        if self.quota.allow(nbytes):
            return True
        self.event("OUTPUT_QUOTA", phase, {"refused": str(path), "bytes": int(nbytes), "used_bytes": self.quota.used, "quota_bytes": self.quota.limit})
        return False

    # ------------------------------------------------------------------ phases

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        """Time, journal and report one phase; the yielded dict becomes ``PHASE_END``'s data."""
        self.governor.enter(name)
        self.event("PHASE_START", name, {"phase": name})
        self._phase_budget(name)
        self.reporter.report(force=True)
        log.info("phase %s started (%.1f %% done)", name, 100.0 * self.progress.global_progress())
        end: dict[str, Any] = {}
        try:
            yield end
        except BaseException as exc:  # the phase's time and its end are journaled, then the error goes on
            self.governor.leave()
            self.event("PHASE_END", name, dict(end, seconds=round(self.governor.phase_elapsed.get(name, 0.0), 6), error=f"{type(exc).__name__}: {exc}"))
            raise
        self.governor.leave()
        if name not in TRAINING_PHASES[1:]:  # training progress comes from the cursors
            self.progress.set(name, 1.0)
        seconds = round(self.governor.phase_elapsed.get(name, 0.0), 6)
        self.event("PHASE_END", name, dict(end, seconds=seconds))
        self.reporter.write_global_stats(name)
        self.reporter.report(force=True)
        self.event("HEALTH", name, health())
        if self.journal is not None:
            self.journal.sync()
        log.info("phase %s done in %.1f s", name, seconds)

    def _phase_budget(self, name: str) -> None:
        """``TIME_BUDGET_STATE`` with this phase's share of the budget and its deadline."""
        state = self.governor.state()
        deadline = self.governor.phase_deadline(name)
        state.update(phase_share=self.governor.share(name) if name in TRAINING_PHASES else None,
                     phase_deadline_s=None if deadline == float("inf") else round(deadline, 3))
        self.event("TIME_BUDGET_STATE", name, state)

    def close(self) -> None:
        """Release the journal, the log handler this run installed and, last, the output folder's lock."""
        try:
            if self.journal is not None:
                self.journal.close()
        finally:
            if self._handler is not None:
                log.removeHandler(self._handler)
                self._handler = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None
