"""The fused CPU kernel of the logistic datafit, built at first use with the system C compiler.

On a CPU, eager torch evaluates ``Φθ``, the sigmoid, the softplus and ``ΦᵀR`` as
separate passes over ``(rows, candidates)`` blocks, and the thin GEMMs
(inner dimension P = 20) run far below the machine's peak. The kernel in
``_logistic_kernel.c`` fuses them: each row's logits live only in registers, and
it visits only the rows a meta-neuron's bootstrap drew (about 63 % of them),
with the bootstrap multiplicity as the row weight. ``bench/bench_search.py``
measures the result against the old loop.

The kernel is compiled once per (source, compiler, CPU) into a cache folder
(``$NX46VX_CACHE_DIR``, else ``$XDG_CACHE_HOME/nx46vx`` or ``~/.cache/nx46vx``),
written atomically, and loaded with :mod:`ctypes`. Chunks of rows run on
``torch.get_num_threads()`` Python threads (ctypes releases the GIL); every
chunk keeps its own partial sums and the sums are added in chunk order, so the
bits do not depend on the number of threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import copy_atomic
from ..errors import NativeKernelError

log = logging.getLogger("nx46vx")

SOURCE = Path(__file__).with_name("_logistic_kernel.c")
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared")
KERNEL_VERSION = 3
_GRADIENT, _LOSS = 1, 2  # what the kernel computes (NX_GRADIENT, NX_LOSS)
PIECES_PER_THREAD = 8  # work pieces per kernel thread (dynamic load balance)
CHUNK_ROWS = 4096  # rows of the design per chunk: the unit of the summation order (threads take pieces of whole chunks)

_VP, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def cache_dir() -> Path:
    """Where compiled kernels are kept (created when missing; a temporary folder when none is writable)."""
    env = os.environ.get("NX46VX_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nx46vx"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"nx46vx-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (``-march=native`` code is only valid on the same kind of CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [line for line in lines if line.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build(*, compiler: str | None = None) -> Path:
    """Compile the kernel (or find it already compiled) and return the shared library's path.

    Raises
    ------
    NativeKernelError
        No C compiler, or it failed (its message is included).
    """
    name = compiler or os.environ.get("CC") or "cc"
    exe = shutil.which(name)
    if exe is None:
        raise NativeKernelError(
            "no C compiler to build the fused search kernel",
            expected="a C compiler on PATH (cc, gcc or clang), or $CC naming one",
            found=name,
            hint="install gcc, or set search.kernel = \"torch\"",
        )
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeKernelError("the C compiler does not run", path=exe, expected="`cc --version` to succeed", found=repr(err)) from err
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), "".join(version).encode(), _cpu_identity().encode()])
    ).hexdigest()[:20]
    target = cache_dir() / f"logistic-kernel-{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="nx46vx-build-") as tmp:
        out = Path(tmp) / target.name
        try:
            proc = subprocess.run([exe, *FLAGS, "-o", str(out), str(SOURCE)], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as err:
            raise NativeKernelError("the C compiler failed on the fused search kernel", path=SOURCE, expected="a shared library", found=repr(err)) from err
        if proc.returncode != 0 or not out.exists():
            raise NativeKernelError(
                "the C compiler failed on the fused search kernel",
                path=SOURCE,
                expected="exit status 0",
                found=f"{proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}",
            )
        copy_atomic(out, target)
    log.info("built the fused search kernel: %s", target)
    return target


@functools.lru_cache(maxsize=None)
def _library(path: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(path)
    except OSError as err:
        raise NativeKernelError(
            "the fused search kernel does not load", path=path, expected="a loadable shared library", found=str(err), hint="delete the file to rebuild it"
        ) from err
    found = (lib.nx_kernel_version(), lib.nx_group_width())
    if found[0] != KERNEL_VERSION:
        raise NativeKernelError("the fused search kernel has the wrong version", path=path, expected=KERNEL_VERSION, found=found[0])
    lib.nx_logistic_chunks.argtypes = [_VP, _VP, _INT, _VP, _VP, _VP, _I64, _INT, _VP, _VP, _I64, _I64, _VP, _VP, _INT]
    lib.nx_logistic_chunks.restype = None
    lib.nx_reduce.argtypes = [_VP, _VP, _I64, _INT, _INT, _VP, _VP, _INT]
    lib.nx_reduce.restype = None
    return lib


@dataclass(frozen=True)
class RowLayout:
    """Which rows each group of candidates visits, chunk by chunk.

    Attributes
    ----------
    rows : ndarray, int32, shape (R,)
        Row indices with a non-zero bootstrap weight, meta-neuron after meta-neuron.
    weights : ndarray, float32, shape (R,)
        Their weights.
    offsets : ndarray, int64, shape (M', n_chunks + 1)
        Where each used meta-neuron's rows of each chunk start in ``rows``.
    group_meta : ndarray, int32, shape (G,)
        The used meta-neuron (row of ``offsets``) of each group of ``width`` candidates.
    lanes : ndarray, int64, shape (G·width,)
        The candidate in each lane (``K`` = padding).
    slot : ndarray, int64, shape (K,)
        Each candidate's lane.
    """

    rows: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    group_meta: np.ndarray
    lanes: np.ndarray
    slot: np.ndarray

    @property
    def n_chunks(self) -> int:
        return self.offsets.shape[1] - 1


class FusedLogistic:
    """Runs the compiled kernel: :meth:`layout` once per (design, batch), then :meth:`scan` per iteration."""

    def __init__(self, library_path: Path) -> None:
        self.lib = _library(str(library_path))
        self.width = int(self.lib.nx_group_width())
        self.max_params = int(self.lib.nx_max_width())
        self._pool: ThreadPoolExecutor | None = None
        self._pool_key = (0, 0)  # (threads, pid): a forked child must not reuse its parent's pool

    def layout(self, weights: np.ndarray, metas: np.ndarray) -> RowLayout:
        """Row lists of the meta-neurons in ``metas`` (K,) over bootstrap ``weights`` (n, M)."""
        n = weights.shape[0]
        n_chunks = max(1, -(-n // CHUNK_ROWS))
        edges = np.minimum(np.arange(n_chunks + 1, dtype=np.int64) * CHUNK_ROWS, n)
        used = list(dict.fromkeys(int(m) for m in metas))
        rows, vals, offsets = [], [], []
        base = 0
        for m in used:
            r = np.flatnonzero(weights[:, m]).astype(np.int32)
            rows.append(r)
            vals.append(weights[r, m].astype(np.float32))
            offsets.append(base + np.searchsorted(r, edges))
            base += r.size
        k = len(metas)
        group_meta, lanes = [], []
        for u, m in enumerate(used):
            members = np.flatnonzero(metas == m)
            for start in range(0, members.size, self.width):
                part = members[start : start + self.width]
                group_meta.append(u)
                lanes.append(np.concatenate((part, np.full(self.width - part.size, k))))
        lanes_arr = np.concatenate(lanes).astype(np.int64)
        slot = np.empty(k, np.int64)
        valid = lanes_arr < k
        slot[lanes_arr[valid]] = np.flatnonzero(valid)
        return RowLayout(
            np.concatenate(rows),
            np.concatenate(vals),
            np.ascontiguousarray(np.stack(offsets), dtype=np.int64),
            np.asarray(group_meta, np.int32),
            lanes_arr,
            slot,
        )

    def _threads(self) -> tuple[ThreadPoolExecutor, int]:
        key = (max(1, torch.get_num_threads()), os.getpid())
        if self._pool is None or self._pool_key != key:
            if self._pool is not None and self._pool_key[1] == key[1]:
                self._pool.shutdown()
            self._pool, self._pool_key = ThreadPoolExecutor(key[0], thread_name_prefix="nx46vx-kernel"), key
        return self._pool, key[0]

    def scan(
        self, phi: np.ndarray, y: np.ndarray, layout: RowLayout, theta: np.ndarray, *, with_gradient: bool, with_loss: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Weighted loss and gradient at ``theta`` (at least one of them).

        Parameters
        ----------
        phi : ndarray, float32, C-contiguous, shape (n, P)
        y : ndarray, float32, shape (n,)
        theta : ndarray, float32, shape (K, P)

        Returns
        -------
        loss : ndarray, float64, shape (K,), or None
            ``Σ_i c_i (softplus(z_i) − y_i z_i)`` (None unless ``with_loss``: the
            logarithm it needs is about a fifth of the pass).
        grad : ndarray, float32, shape (P, K), or None
            ``Φᵀ [c ∘ (σ(z) − y)]``.
        """
        n, p = phi.shape
        if not (with_gradient or with_loss):
            raise ValueError("scan computes the loss, the gradient or both")
        if p > self.max_params:
            raise NativeKernelError("design too wide for the fused kernel", expected=f"<= {self.max_params} columns", found=p)
        groups = layout.group_meta.size
        padded = np.concatenate((theta, np.zeros((1, p), np.float32)))[layout.lanes]  # (G·width, P)
        theta_t = np.ascontiguousarray(padded.reshape(groups, self.width, p).transpose(0, 2, 1))
        n_chunks = layout.n_chunks
        grad_parts = np.empty((n_chunks, groups, p, self.width) if with_gradient else (1,), np.float32)
        loss_parts = np.empty((n_chunks, groups, self.width), np.float32)
        pool, threads = self._threads()
        # several pieces per thread, handed out as threads free up: a vCPU that is slowed down (a busy neighbour)
        # does not hold the others back; the partial sums are per chunk, so the bits do not depend on the pieces
        cuts = np.linspace(0, n_chunks, min(PIECES_PER_THREAD * threads, n_chunks) + 1).astype(np.int64)
        args = (
            phi.ctypes.data, y.ctypes.data, p, layout.rows.ctypes.data, layout.weights.ctypes.data,
            layout.offsets.ctypes.data, n_chunks, groups, layout.group_meta.ctypes.data, theta_t.ctypes.data,
        )
        what = (_GRADIENT if with_gradient else 0) | (_LOSS if with_loss else 0)
        futures = [
            pool.submit(self.lib.nx_logistic_chunks, *args, int(a), int(b), grad_parts.ctypes.data, loss_parts.ctypes.data, what)
            for a, b in zip(cuts[:-1], cuts[1:])
        ]
        for future in futures:
            future.result()
        grad = np.empty((groups, p, self.width), np.float64)
        loss = np.empty((groups, self.width), np.float64)
        self.lib.nx_reduce(grad_parts.ctypes.data, loss_parts.ctypes.data, n_chunks, groups, p, grad.ctypes.data, loss.ctypes.data, int(with_gradient))
        loss_k = loss.reshape(-1)[layout.slot] if with_loss else None
        if not with_gradient:
            return loss_k, None
        grad_k = grad.transpose(1, 0, 2).reshape(p, -1)[:, layout.slot].astype(np.float32)
        return loss_k, grad_k


@functools.lru_cache(maxsize=None)
def load() -> FusedLogistic:
    """The fused kernel, built on first use (raises :class:`NativeKernelError` when it cannot be)."""
    return FusedLogistic(build())
