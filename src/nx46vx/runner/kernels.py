"""The metric's and the tunnel repair's numba kernels, compiled in a child process while the first phases run.

On a machine that has not compiled them yet (every fresh Kaggle session) they take ~11 s
of one core (:func:`nx46vx.betti.compile_kernels` ~9 s, :func:`nx46vx.topology.compile_kernels`
~1.5 s on 2 CPU cores), and they were compiled when the student's schedule was laid out: time
taken from its training (a kaggle-train bench run: 13.8 s between its 20th step's checkpoint
and its schedule; 2.4 s in the next run, the kernels cached). The kernels are declared ``cache=True``, so a child
process that compiles them fills numba's on-disk cache while discovery, the features and the
search run (a lower priority: it takes a core those leave idle), and this process then loads
them from that cache (~0.2 s). The distillation waits for the child
(:meth:`KernelCompilation.join`) before its first step: its steps' times lay out the
schedule, and a validation (of the prior, at step 0) is the first use of the kernels. What
it does before (the window's price, the teachers' maps) runs beside the child, whose lower
priority leaves it a small share of the cores: demo runs on a cold cache waited 10-14 s for
it before the distillation, and 8-9 s before the first step. A price taken beside the child
is dearer, not cheaper; the window is timed again at the first checkpoint, the lower price
holding. Any later phase waits before it starts (the distillation may have
skipped its steps). A child that fails or is not done in
:data:`JOIN_TIMEOUT_S` changes nothing: the kernels compile in this process at first use,
as without it. The child runs this package's own code on constant 2×2×2 arrays; nothing
from an input root is read.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import betti, topology

if TYPE_CHECKING:
    from .context import RunContext

log = logging.getLogger("nx46vx")

#: The phases that start before the kernels are waited for: none of them times the student's steps or uses the kernels
#: (the distillation waits itself, before its first step).
BEFORE_KERNELS = ("discovery", "features", "search", "distillation")
#: The longest wait for the child before the kernels are compiled here instead.
JOIN_TIMEOUT_S = 300.0
#: The child's ``os.nice`` increment: it runs on what the phases beside it leave.
CHILD_NICENESS = 10
#: What the child runs.
CHILD_CODE = (
    "import os\n"
    f"if hasattr(os, 'nice'): os.nice({CHILD_NICENESS})\n"
    "from nx46vx import betti, topology\n"
    "betti.compile_kernels()\n"
    "topology.compile_kernels()\n"
)


def ready(kernel: Any) -> bool:
    """Whether numba dispatcher ``kernel`` is compiled in this process, or its on-disk cache holds it for its current source
    and this CPU (read through numba's internals; when they are not as expected, False: the child starts)."""
    try:
        if kernel.signatures:
            return True
        magic = kernel.targetctx.codegen().magic_tuple()
        return any(key[1] == magic for key in kernel._cache._cache_file._load_index())
    except Exception:  # noqa: BLE001 - another numba's internals (or none: NUMBA_DISABLE_JIT): compile beside the run, as on a cold cache
        return False


class KernelCompilation:
    """A child process compiling the kernels into numba's cache, or none (this process has them, or none could start)."""

    def __init__(self, process: subprocess.Popen[bytes] | None) -> None:
        self.process = process
        self.started = time.monotonic()
        self.joined = False

    @classmethod
    def start(cls) -> "KernelCompilation":
        """Start the child (:data:`CHILD_CODE`) unless the kernels are :func:`ready`."""
        if all(ready(kernel) for kernel in (betti.ENTRY_KERNEL, topology.ENTRY_KERNEL)) or not sys.executable:
            return cls(None)  # sys.executable is empty where the interpreter is embedded: no child can be started
        package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very package, however it was found
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p))
        try:
            process = subprocess.Popen([sys.executable, "-c", CHILD_CODE], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, env=env)
        except OSError as exc:
            log.warning("the kernels' compilation could not start beside the run (%s): they compile at first use", exc)
            return cls(None)
        return cls(process)

    def join(self, ctx: "RunContext", phase: str, *, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Wait for the child (at most ``timeout_s``, then stop it), once; journal ``KERNELS_READY`` (``phase``: the phase about to run)."""
        if self.joined:
            return
        self.joined = True
        t0 = time.monotonic()
        returncode, error = self._wait(timeout_s) if self.process is not None else (None, None)
        if error is not None:
            log.warning("the kernels' compilation beside the run failed (%s): they compile at first use", error)
        ctx.event("KERNELS_READY", phase, {"child": self.process is not None, "returncode": returncode, "error": error, "waited_s": round(time.monotonic() - t0, 3),
                                           "child_s": round(time.monotonic() - self.started, 3) if self.process is not None else None})

    def _wait(self, timeout_s: float) -> tuple[int | None, str | None]:
        """The child's exit status and, when it failed, why (its last line on stderr)."""
        assert self.process is not None
        try:
            _, stderr = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            return None, f"not done in {timeout_s:g} s"
        if self.process.returncode == 0:
            return 0, None
        lines = stderr.decode(errors="replace").strip().splitlines()
        return self.process.returncode, lines[-1] if lines else f"exit status {self.process.returncode}"

    def stop(self) -> None:
        """Stop the child if it still runs (the run ended or failed before it was waited for)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
