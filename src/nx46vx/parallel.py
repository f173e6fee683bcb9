"""Data-parallel student training over several processes with ``torch.distributed`` (DDP).

Every rank draws the same global batch — a pure function of ``(seed, step)`` — and
trains on its contiguous shard of it; DDP averages the gradients, so with equal
shards and per-patch losses the update equals one process's on the whole batch.
Workers are started with the ``spawn`` method from inside ``run()``, so it works in
a notebook cell (the worker function lives in this importable module).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distill
from .config import DistillConfig


class AllOutputs(nn.Module):
    """Adapter so DDP's forward returns every deep-supervision output (``network.forward_all``)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.network.forward_all(x)


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s contiguous share of a global batch (the batch must divide evenly)."""
    size = batch["image"].shape[0]
    if size % world:
        raise ValueError(f"batch of {size} patches does not split over {world} processes")
    per = size // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def wrap(state: distill.DistillState, device: torch.device) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The DDP-wrapped forward of ``state.network`` (the process group must be initialised)."""
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(AllOutputs(state.network), device_ids=ids)


def init_process_group(rank: int, world: int, init_file: str, *, backend: str | None = None) -> None:
    """Join the group through a shared file (no network port needed: it works in a sandboxed notebook too)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)


def train_steps(rank: int, world: int, init_file: str, config: DistillConfig, seed: int, batches: Callable[[int], dict[str, torch.Tensor]], steps: int, out: str) -> None:
    """Worker: ``steps`` data-parallel steps of a freshly seeded student; rank 0 saves the final weights to ``out`` (safetensors)."""
    init_process_group(rank, world, init_file, backend="gloo")
    try:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        state = distill.init_state(config, seed=seed, device=device)
        state.schedule_steps = steps
        forward = wrap(state, device)
        for step in range(steps):
            distill.train_step(state, shard(batches(step), rank, world), config, forward=forward)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.network.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes and wait for them (an error in one is raised here)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(fn, args=(world, *args), nprocs=world, join=True, start_method="spawn")
