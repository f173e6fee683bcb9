"""Data-parallel training: two gloo processes on CPU match one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import torch

from nx46vx import distill
from nx46vx.config import DistillConfig
from nx46vx.parallel import shard, spawn, train_steps

CFG = DistillConfig(arch="resenc", width=4, depth=2, blocks=(1, 1), patch=16, batch=4, warmup_steps=1, lr=1e-2, teacher_weight=0.5)


class Batches:
    """Seeded global batches (picklable, so spawned workers draw the same ones)."""

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + step)
        shape = (CFG.batch, 1, CFG.patch, CFG.patch, CFG.patch)
        label = torch.randint(0, 3, shape, generator=g).to(torch.uint8)
        return {"image": torch.rand(shape, generator=g), "label": label, "target": torch.rand(shape, generator=g), "covered": torch.ones(CFG.batch, dtype=torch.bool)}


def test_shard_splits_evenly() -> None:
    batch = Batches()(0)
    parts = [shard(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p["image"] for p in parts]), batch["image"])


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    out = tmp_path / "rank0.safetensors"
    spawn(train_steps, 2, str(tmp_path / "init"), CFG, 0, Batches(), 3, str(out))
    from safetensors.torch import load_file

    parallel = load_file(str(out))
    state = distill.init_state(CFG, seed=0, device=torch.device("cpu"))
    state.schedule_steps = 3
    for step in range(3):
        distill.train_step(state, Batches()(step), CFG)
    single = state.network.state_dict()
    assert parallel.keys() == single.keys()
    initial = distill.init_state(CFG, seed=0, device=torch.device("cpu")).network.state_dict()
    assert any(not torch.equal(single[k], initial[k]) for k in single)  # training moved the weights
    for key in single:
        assert torch.allclose(parallel[key], single[key], atol=2e-5, rtol=1e-4), key
