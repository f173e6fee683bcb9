"""Data-parallel training: two gloo processes on CPU match one process with the same global batch."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nx46vx import distill
from nx46vx.config import DistillConfig
from nx46vx.errors import ConfigError, ParallelTrainingError
from nx46vx.parallel import DataParallelTrainer, shard, world_size

# float32: the shards' averaged gradients are compared with the whole batch's to float32 rounding (bfloat16's, on a CPU
# that computes it natively, is ~3 digits)
CFG = DistillConfig(arch="resenc", width=4, depth=2, blocks=(1, 1), patch=16, batch=4, warmup_steps=1, lr=1e-2, teacher_weight=0.5, precision="float32")
CPU = torch.device("cpu")
# per step: which patches have a teacher target (uneven over the two shards, and once none in the second one)
COVERED = ([True, True, True, False], [True, True, False, False], [False, True, True, True])


def batch_at(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    shape = (CFG.batch, 1, CFG.patch, CFG.patch, CFG.patch)
    label = torch.randint(0, 3, shape, generator=g).to(torch.uint8)
    return {"image": torch.rand(shape, generator=g), "label": label, "target": torch.rand(shape, generator=g), "covered": torch.tensor(COVERED[step % 3])}


def test_shard_splits_evenly_and_carries_the_batch_counts() -> None:
    batch = batch_at(0)
    parts = [shard(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p["image"] for p in parts]), batch["image"])
    assert all(float(p["patches_total"]) == 4 and int(p["covered_total"]) == 3 for p in parts)


def test_world_size_checks_an_explicit_count() -> None:
    assert world_size(0, batch=4, device=CPU) == 1
    assert world_size(2, batch=4, device=CPU) == 2
    with pytest.raises(ConfigError, match="divisor of distill.batch"):
        world_size(3, batch=4, device=CPU)


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    """One step alone (so the helper must receive a non-trivial optimiser state), then three data-parallel steps."""
    single = distill.init_state(CFG, seed=0, device=CPU)
    single.schedule_steps = 4
    distill.train_step(single, batch_at(3), CFG)
    parallel = distill.init_state(CFG, seed=0, device=CPU)
    distill.load_state_dict(parallel, copy.deepcopy(distill.state_dict(single)))  # a copy: the optimiser would share its moment tensors
    (tmp_path / ".ddp-1-1").write_bytes(b"")  # a rendezvous file left by a killed run
    trainer = DataParallelTrainer(parallel, CFG, world=2, device=CPU, folder=tmp_path)
    try:
        parallel_terms = [trainer.step(parallel, batch_at(step)) for step in range(3)]
    finally:
        trainer.close()
    assert not list(tmp_path.iterdir())  # the stale rendezvous file and this run's are gone
    assert all(not p.is_alive() for p in trainer.helpers.processes)
    single_terms = [distill.train_step(single, batch_at(step), CFG) for step in range(3)]
    assert parallel.step == single.step == 4
    for p_terms, s_terms in zip(parallel_terms, single_terms):
        for key in ("total", "dice", "bce", "teacher", "grad_norm", "lr"):
            assert p_terms[key] == pytest.approx(s_terms[key], rel=1e-4, abs=1e-6), key
    initial = distill.init_state(CFG, seed=0, device=CPU).network.state_dict()
    weights = single.network.state_dict()
    assert any(not torch.equal(weights[k], initial[k]) for k in weights)  # training moved the weights
    # a convolution's bias before an InstanceNorm has a zero gradient up to rounding, which AdamW scales up to a
    # learning-rate-sized step of either sign: those biases differ, and the norm removes them from every output
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU

    pre_norm = {f"{name}.{suffix}" for name, module in parallel.network.named_modules(remove_duplicate=False)
                if isinstance(module, ConvDropoutNormReLU) and module.norm is not None and module.conv.bias is not None for suffix in ("conv.bias", "all_modules.0.bias")}
    assert pre_norm and pre_norm < set(weights)
    for key, value in parallel.network.state_dict().items():
        if key not in pre_norm:
            assert torch.allclose(value, weights[key], atol=2e-5, rtol=1e-4), key
    with torch.no_grad():
        x = batch_at(0)["image"]
        assert torch.allclose(parallel.network.eval()(x), single.network.eval()(x), atol=1e-5)


def test_a_helper_that_cannot_start_is_reported_at_once(tmp_path: Path) -> None:
    state = distill.init_state(CFG, seed=0, device=CPU)
    wider = replace(CFG, width=8)  # the helper builds a wider network: rank 0's weights do not load into it
    with pytest.raises(ParallelTrainingError, match="failed to start") as err:
        DataParallelTrainer(state, wider, world=2, device=CPU, folder=tmp_path)
    assert "size mismatch" in str(err.value)
    assert not list(tmp_path.iterdir())
    # the failed start left nothing waiting: the next trainer in this process (a notebook kernel) joins and steps —
    # here a student fed the ensemble's map (distill.teacher_input): the prior channel travels with the batch
    fed = replace(CFG, teacher_input=True)
    state, single = distill.init_state(fed, seed=0, device=CPU), distill.init_state(fed, seed=0, device=CPU)
    batch = batch_at(0) | {"prior": torch.rand(batch_at(0)["target"].shape, generator=torch.Generator().manual_seed(5))}
    trainer = DataParallelTrainer(state, fed, world=2, device=CPU, folder=tmp_path)
    try:
        terms = trainer.step(state, batch)
    finally:
        trainer.close()
    expected = distill.train_step(single, batch, fed)
    assert state.step == 1 and math.isfinite(terms["total"]) and terms["total"] == pytest.approx(expected["total"], rel=1e-4)
    assert all(not p.is_alive() for p in trainer.helpers.processes)
