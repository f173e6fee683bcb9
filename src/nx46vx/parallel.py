"""Data-parallel student training over several processes with ``torch.distributed`` (DDP), started from inside ``run()``.

Rank 0 is the calling process (a notebook's kernel): it keeps the governor, the
journal, validation and the checkpoints. Ranks 1 … W−1 are helper processes
started with the ``spawn`` method (the helper function lives in this importable
module, so it works from a notebook cell) and joined through a file in the output
folder (no network port). Every step rank 0 broadcasts a command (go or stop, the
step, the schedule's length) and the global batch — a pure function of
``(seed, step)`` — and every rank trains on its contiguous share of it; DDP averages
the gradients. The losses are per patch (the teacher term is normalised by the
whole batch's covered patches, see :func:`shard`), so the update equals one
process's on the whole batch to float tolerance, and the journaled loss terms are
the ranks' average. Every helper starts from rank 0's state (weights, optimiser,
gradient scaler, step), so the replicas stay identical and a checkpoint is rank 0's
state alone: a resumed session may use another number of processes.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distill
from .config import DistillConfig
from .errors import ConfigError, ParallelTrainingError

log = logging.getLogger("nx46vx")

#: How long a rank waits for the others at one collective: rank 0 validates and checkpoints between steps while the helpers wait.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)
#: How long :meth:`DataParallelTrainer.close` waits for a helper told to stop before ending it.
HELPER_EXIT_WAIT_S = 20.0
#: Loss terms that are per-rank values, averaged over the ranks for the journal (the rest are equal on every rank).
_AVERAGED = ("total", "dice", "bce", "skeleton", "teacher", "label")


def world_size(requested: int, *, batch: int, device: torch.device) -> int:
    """Processes for the student's training.

    ``requested`` = 0: one per visible GPU when the student trains on a GPU and more
    than one is visible, reduced to the largest count that divides ``batch``; else 1.
    An explicit count must fit: at most one process per GPU, and dividing ``batch``.
    """
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if requested == 0:
        world = max(1, gpus)
        while batch % world:
            world -= 1
        return world
    if device.type == "cuda" and requested > gpus - (device.index or 0):
        raise ConfigError("invalid setting distill.processes", expected=f"at most {gpus - (device.index or 0)} (one process per visible GPU from {device})", found=requested)
    if batch % requested:
        raise ConfigError("invalid setting distill.processes", expected=f"a divisor of distill.batch = {batch}", found=requested)
    return requested


def backend_for(device: torch.device) -> str:
    """The collective backend of a device: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def batch_spec(config: DistillConfig) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Name, shape and dtype of each tensor of a global batch (:func:`nx46vx.patches.make_batch`)."""
    volume = (config.batch, 1, config.patch, config.patch, config.patch)
    spec = [("image", volume, torch.float32), ("label", volume, torch.uint8), ("target", volume, torch.float32), ("covered", (config.batch,), torch.bool)]
    if config.skeleton_weight > 0:
        spec.append(("skeleton", volume, torch.float32))
    if config.teacher_input:
        spec.append(("prior", volume, torch.float32))
    return spec


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s contiguous share of a global batch, with the batch's patch and covered counts (the batch must divide evenly)."""
    size = batch["image"].shape[0]
    if size % world:
        raise ValueError(f"batch of {size} patches does not split over {world} processes")
    per = size // world
    part = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
    return part | {"patches_total": torch.tensor(float(size)), "covered_total": batch["covered"].sum()}


class AllOutputs(nn.Module):
    """Adapter so DDP's forward returns every deep-supervision output (``network.forward_all``)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.network.forward_all(x)


def _cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor on the CPU (what is sent to a spawned helper).

    Copied, not moved: sending a CPU tensor to a spawned process puts its storage in
    shared memory, and the helper's optimiser would then update rank 0's moments too.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class _Channel:
    """The collectives rank 0 and the helpers run in the same order: command, batch, averaged losses."""

    def __init__(self, config: DistillConfig, world: int, device: torch.device) -> None:
        self.config, self.world = config, world
        self.nccl = backend_for(device) == "nccl"
        self.device = device if self.nccl else torch.device("cpu")  # gloo sends CPU tensors
        self.spec = batch_spec(config)

    def command(self, go: bool = False, step: int = 0, schedule: int | None = None) -> tuple[bool, int, int | None]:
        """Broadcast from rank 0 (the arguments are rank 0's; a helper passes none and gets rank 0's)."""
        message = torch.tensor([int(go), step, -1 if schedule is None else schedule], dtype=torch.int64, device=self.device)
        dist.broadcast(message, 0)
        go_, step_, schedule_ = message.tolist()
        return bool(go_), int(step_), None if schedule_ < 0 else int(schedule_)

    def batch(self, batch: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Broadcast the global batch from rank 0 (helpers pass None); NCCL carries bools as uint8."""
        out = {}
        for name, shape, dtype in self.spec:
            wire = torch.uint8 if dtype == torch.bool and self.nccl else dtype
            if batch is None:
                tensor = torch.empty(shape, dtype=wire, device=self.device)
            else:
                found = batch[name]
                if tuple(found.shape) != shape or found.dtype != dtype:
                    raise ParallelTrainingError(f"batch tensor {name!r} does not match the data-parallel layout", expected=f"{shape} {dtype}", found=f"{tuple(found.shape)} {found.dtype}")
                tensor = found.to(self.device, wire).contiguous()
            dist.broadcast(tensor, 0)
            out[name] = tensor.to(dtype)
        return out

    def mean_terms(self, terms: dict[str, float]) -> dict[str, float]:
        names = [k for k in _AVERAGED if k in terms]
        values = torch.tensor([terms[k] for k in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return terms | dict(zip(names, (values / self.world).tolist()))


def _ready_file(init_file: str | Path, rank: int) -> Path:
    """The file helper ``rank`` creates once it has restored its state and is about to join."""
    return Path(f"{init_file}.ready-{rank}")


def _init_group(rank: int, world: int, init_file: str, backend: str) -> None:
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)


def _wrap(network: nn.Module, device: torch.device) -> DistributedDataParallel:
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(AllOutputs(network), device_ids=ids)


def _exit_with_parent(parent: int) -> None:
    """A helper whose rank 0 died (a killed notebook) exits instead of waiting at a collective for an hour."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, name="nx46vx-ddp-parent", daemon=True).start()


def _helper(index: int, world: int, init_file: str, config: DistillConfig, saved: dict[str, Any], base_device: str, parent: int) -> None:
    """Rank ``index + 1``: follow rank 0's commands until it says stop."""
    _exit_with_parent(parent)
    rank = index + 1
    device = torch.device(base_device)
    if device.type == "cuda":
        device = torch.device("cuda", (device.index or 0) + rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    state = distill.init_state(config, seed=0, device=device)
    distill.load_state_dict(state, saved)  # before joining: a failure here is seen by rank 0 before it joins
    _ready_file(init_file, rank).touch()
    _init_group(rank, world, init_file, backend_for(device))
    try:
        forward = _wrap(state.network, device)
        channel = _Channel(config, world, device)
        while True:
            go, state.step, state.schedule_steps = channel.command()
            if not go:
                break
            batch = channel.batch()
            channel.mean_terms(distill.train_step(state, shard(batch, rank, world), config, forward=forward))
    finally:
        dist.destroy_process_group()


class DataParallelTrainer:
    """Rank 0 of a data-parallel student: :meth:`step` replaces :func:`nx46vx.distill.train_step`; :meth:`close` ends the helpers.

    Parameters
    ----------
    state : DistillState
        Rank 0's student, already restored; the helpers start from a copy of it.
    config : DistillConfig
        The resolved student settings (``batch`` is the global batch).
    world : int
        Processes in all, this one included (≥ 2; :func:`world_size`).
    device : torch.device
        Rank 0's device; helper ``r`` uses the GPU ``r`` places after it (gloo on a CPU).
    folder : Path
        Where the rendezvous file is made (the run's output folder).
    """

    def __init__(self, state: distill.DistillState, config: DistillConfig, *, world: int, device: torch.device, folder: Path) -> None:
        import torch.multiprocessing as mp

        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.config, self.world, self.device, self.backend = config, world, device, backend_for(device)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".ddp-*"):  # left by a killed run (the output lock keeps any other run out)
            stale.unlink(missing_ok=True)
        self.init_file = folder / f".ddp-{os.getpid()}-{time.monotonic_ns()}"
        saved = _cpu(dict(distill.state_dict(state), best=None))  # the best weights stay with rank 0 (it validates)
        self.helpers = mp.start_processes(
            _helper, args=(world, str(self.init_file), config, saved, str(device), os.getpid()), nprocs=world - 1, join=False, start_method="spawn"
        )
        self._open = True
        try:
            self._rendezvous()
            self.forward: DistributedDataParallel | None = _wrap(state.network, device)
        except BaseException:
            self._stop_helpers(wait_s=0)
            raise
        self.channel = _Channel(config, world, device)

    def _rendezvous(self) -> None:
        """Wait until every helper has restored its state, watching them meanwhile, then join the group.

        A helper that fails to start is reported now, not after the collective timeout,
        and rank 0 never enters the group's rendezvous without its helpers (a rendezvous
        left waiting would block the next run in the same notebook kernel).
        """
        waiting = [_ready_file(self.init_file, rank) for rank in range(1, self.world)]
        while not all(path.exists() for path in waiting):
            try:
                ended = self.helpers.join(timeout=0.2)  # raises when a helper has failed
            except Exception as err:
                raise ParallelTrainingError("a data-parallel helper process failed to start", expected=f"{self.world - 1} helpers joining", found=str(err).strip()[-800:]) from err
            if ended:
                raise ParallelTrainingError("the data-parallel helper processes ended before joining", expected=f"{self.world - 1} helpers joining", found="all exited")
        try:
            _init_group(0, self.world, str(self.init_file), self.backend)
        except RuntimeError as err:
            raise ParallelTrainingError("the data-parallel processes could not join", expected=f"{self.world} processes", found=str(err)) from err

    def step(self, state: distill.DistillState, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One data-parallel optimiser step on the global ``batch``; the loss terms are the ranks' average."""
        try:
            self.channel.command(True, state.step, state.schedule_steps)
            self.channel.batch(batch)
            terms = distill.train_step(state, shard(batch, 0, self.world), self.config, forward=self.forward)
            return self.channel.mean_terms(terms)
        except RuntimeError as err:  # a helper died: its own error says why
            helper_error = self._stop_helpers(wait_s=10)
            raise ParallelTrainingError("a data-parallel training process stopped", expected=f"{self.world} processes", found=helper_error or str(err)) from err

    def close(self) -> None:
        """Tell the helpers to stop, wait for them, leave the process group (safe to call twice; never raises)."""
        if not self._open:
            return
        self._open = False
        stopped = False
        try:
            if dist.is_initialized():
                self.channel.command(False)
                stopped = True
        except RuntimeError as err:
            log.warning("data-parallel helpers did not take the stop command: %s", err)
        finally:
            self.forward = None
            if dist.is_initialized():
                dist.destroy_process_group()
            # a stopped helper exits in about a second and holds nothing rank 0 lacks: one slow to exit is ended, not waited for
            helper_error = self._stop_helpers(wait_s=HELPER_EXIT_WAIT_S if stopped else 0)
            if helper_error:
                log.warning("a data-parallel helper failed: %s", helper_error)

    def _stop_helpers(self, *, wait_s: float) -> str | None:
        """Wait up to ``wait_s`` for the helpers to exit, then end those still running; returns a helper's error, if one raised."""
        deadline = time.monotonic() + wait_s
        error = None
        try:
            while not self.helpers.join(timeout=max(0.0, deadline - time.monotonic())) and time.monotonic() < deadline:
                pass
        except Exception as err:  # ProcessRaisedException / ProcessExitedException: the helper's own message
            error = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
        finally:
            for process in self.helpers.processes:
                if process.is_alive():
                    if wait_s > 0:
                        log.warning("data-parallel helper %s still running %.0f s after the stop command; ending it", process.pid, wait_s)
                    process.terminate()
                    process.join(5)
            for path in [self.init_file, *(_ready_file(self.init_file, rank) for rank in range(1, self.world))]:
                path.unlink(missing_ok=True)
        return error


__all__ = ["COLLECTIVE_TIMEOUT", "AllOutputs", "DataParallelTrainer", "backend_for", "batch_spec", "shard", "world_size"]
