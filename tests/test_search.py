from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from nx46vx.config import FeatureConfig, SearchConfig, load_config
from nx46vx.errors import ConfigError, NativeKernelError
from nx46vx.features import Pool, sample_pool
from nx46vx.search import N_PARAMS, BatchedFISTA, CandidateSearch, Design, make_grid, native, penalised_mask
from nx46vx.search.sampling import bootstrap_weights
from nx46vx.synthetic import make_volume

CPU = torch.device("cpu")
HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler for the fused kernel")
KERNELS = [pytest.param("native", marks=needs_cc), "torch"]


def _problem(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_PARAMS - 1)).astype(np.float32)
    w = rng.normal(size=N_PARAMS - 1) * (rng.random(N_PARAMS - 1) < 0.4)
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w)))).astype(np.float32)
    phi = torch.from_numpy(np.hstack([x, np.ones((n, 1), np.float32)]))
    return x, y, phi


def _design(phi: torch.Tensor, y: np.ndarray, weights: torch.Tensor | None = None) -> Design:
    n = phi.shape[0]
    weights = torch.full((n, 1), 1.0 / n) if weights is None else weights
    return Design(phi, torch.from_numpy(y)[:, None], weights, penalised_mask(CPU))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("l1,l2", [(1e-3, 1e-2), (1e-2, 1e-3), (3e-3, 1e-4)])
def test_fista_reaches_sklearn_elastic_net(l1: float, l2: float, kernel: str) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y, phi = _problem()
    design = _design(phi, y)
    solver = BatchedFISTA(block_rows=1024, kernel=kernel)
    assert solver.kernel_for(CPU) == kernel
    metas, t1, t2 = torch.zeros(1, dtype=torch.long), torch.tensor([l1]), torch.tensor([l2])
    lips = solver.lipschitz(design, metas, t2)
    state = solver.init_state(torch.zeros(1, N_PARAMS))
    for _ in range(2000):
        state, _ = solver.step(design, state, metas, t1, t2, lips)
    ours = solver.objective(design, state.x, metas, t1, t2).item()
    # sklearn: (1/C)·(r‖w‖₁ + (1−r)/2‖w‖²) + Σ loss, i.e. n·(our objective) with 1/C = n(l1+l2), r = l1/(l1+l2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(penalty="elasticnet", solver="saga", l1_ratio=l1 / (l1 + l2), C=1 / (len(y) * (l1 + l2)), tol=1e-10, max_iter=100000)
        clf.fit(x.astype(np.float64), y)
    theta = torch.from_numpy(np.concatenate([clf.coef_[0], clf.intercept_]).astype(np.float32))[None]
    reference = solver.objective(design, theta, metas, t1, t2).item()
    assert abs(ours - reference) / reference < 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_equals_one_at_a_time(kernel: str) -> None:
    _, y, phi = _problem(2000, seed=1)
    grid = make_grid(2, (1e-4, 1e-2), (1e-3,))
    rng = np.random.default_rng(0)
    weights = torch.from_numpy(np.stack([np.bincount(rng.integers(0, 2000, 2000), minlength=2000) / 2000 for _ in range(2)], 1).astype(np.float32))
    design = _design(phi, y, weights)
    solver = BatchedFISTA(block_rows=512, kernel=kernel)
    metas = torch.tensor([c.meta_neuron for c in grid])
    l1 = torch.tensor([c.l1 for c in grid])
    l2 = torch.tensor([c.l2 for c in grid])
    lips = solver.lipschitz(design, metas, l2)
    init = torch.from_numpy(np.random.default_rng(5).normal(0, 0.01, (len(grid), N_PARAMS)).astype(np.float32))
    batch = solver.init_state(init)
    for _ in range(60):
        batch, _ = solver.step(design, batch, metas, l1, l2, lips)
    for k in range(len(grid)):
        one = solver.init_state(init[k : k + 1])
        sl = slice(k, k + 1)
        for _ in range(60):
            one, _ = solver.step(design, one, metas[sl], l1[sl], l2[sl], lips[sl])
        if kernel == "native":  # every lane computes alone, in the same order: the same bits
            assert torch.equal(one.x[0], batch.x[k])
        else:
            assert torch.allclose(one.x[0], batch.x[k], atol=1e-5, rtol=1e-4)


def _mixed_problem(n: int = 9001, metas_per_design: int = 3) -> tuple[Design, torch.Tensor, torch.Tensor]:
    """Rows not a multiple of the chunk, bootstrap zeros, candidates of a meta-neuron not contiguous nor a multiple of 16."""
    _, y, phi = _problem(n, seed=4)
    weights = torch.from_numpy(bootstrap_weights(n, range(metas_per_design), 7, 0))
    metas = torch.tensor([0] * 17 + [1] * 5 + [2] * 16 + [0] * 3)
    theta = torch.from_numpy(np.random.default_rng(1).normal(0, 0.8, (metas.numel(), N_PARAMS)).astype(np.float32))
    return _design(phi, y, weights), metas, theta


@needs_cc
def test_fused_kernel_matches_torch_path() -> None:
    design, metas, theta = _mixed_problem()
    fused, eager = BatchedFISTA(kernel="native"), BatchedFISTA(kernel="torch")
    for with_gradient in (True, False):
        loss_f, grad_f = fused._scan(design, theta, metas, with_gradient)
        loss_t, grad_t = eager._scan(design, theta, metas, with_gradient)
        assert loss_f.shape == loss_t.shape == (metas.numel(),) and loss_f.dtype == torch.float64
        assert float(((loss_f - loss_t).abs() / loss_t.abs()).max()) < 1e-5
        if with_gradient:
            assert grad_f.shape == grad_t.shape == (N_PARAMS, metas.numel())
            assert float((grad_f - grad_t).abs().max() / grad_t.abs().max()) < 1e-5
        else:
            assert grad_f is None
    # the gradient alone (an iteration that does not report its objective) is the same gradient, bit for bit
    for solver, (_, grad) in ((fused, fused._scan(design, theta, metas, True)), (eager, eager._scan(design, theta, metas, True))):
        no_loss, grad_only = solver._scan(design, theta, metas, True, with_loss=False)
        assert no_loss is None and torch.equal(grad_only, grad)
    # extreme logits: the stable forms stay finite and agree
    loss_f, grad_f = fused._scan(design, theta * 200, metas, True)
    loss_t, grad_t = eager._scan(design, theta * 200, metas, True)
    assert torch.isfinite(loss_f).all() and torch.isfinite(grad_f).all()
    assert float(((loss_f - loss_t).abs() / loss_t.abs()).max()) < 1e-5


@needs_cc
def test_fused_kernel_bits_do_not_depend_on_threads() -> None:
    design, metas, theta = _mixed_problem(n=20000)
    solver = BatchedFISTA(kernel="native")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = solver._scan(design, theta, metas, True)
        torch.set_num_threads(3)
        three = solver._scan(design, theta, metas, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


@needs_cc
def test_fused_kernel_is_built_once_and_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NX46VX_CACHE_DIR", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not a library")
    with pytest.raises(NativeKernelError, match="does not load"):
        native.FusedLogistic(broken)


def test_missing_compiler_falls_back_or_fails_clearly(monkeypatch, caplog) -> None:
    with pytest.raises(NativeKernelError, match="no C compiler"):
        native.build(compiler="no-such-compiler-nx46vx")

    def unavailable() -> None:
        raise NativeKernelError("no C compiler to build the fused search kernel", expected="a C compiler", found="none")

    monkeypatch.setattr(native, "load", unavailable)
    design, metas, theta = _mixed_problem(n=500)
    with caplog.at_level(logging.WARNING, logger="nx46vx"):
        auto = BatchedFISTA(kernel="auto")
        assert auto.kernel_for(CPU) == "torch"
        loss, _ = auto._scan(design, theta, metas, False)
    assert torch.isfinite(loss).all() and "eager torch" in caplog.text
    with pytest.raises(NativeKernelError):
        BatchedFISTA(kernel="native").kernel_for(CPU)
    assert BatchedFISTA(kernel="torch").kernel_for(CPU) == "torch"
    with pytest.raises(ConfigError, match="search.kernel"):
        load_config("demo", overrides=["search.kernel=fast"])
    with pytest.raises(ConfigError, match="unknown search kernel"):
        BatchedFISTA(kernel="fast")


@pytest.fixture(scope="module")
def pools() -> tuple[list[Pool], list[Pool]]:
    rng = np.random.default_rng(11)
    cfg = replace(FeatureConfig(), pool_per_class=2500)
    out = []
    for i in range(5):
        vol = make_volume((40, 40, 40), rng)
        out.append(sample_pool(vol.image, vol.label, cfg, rng=np.random.default_rng(i)))
    return out[:3], out[3:]


def _search(pools, **kw) -> CandidateSearch:
    kw = {"max_epochs": 1, **kw}
    cfg = replace(SearchConfig(), samples_per_class=2000, val_samples_per_class=2000, **kw)
    return CandidateSearch(cfg, pools[0], pools[1], seed=3, device=CPU)


def test_search_learns_and_meta_neurons_differ(pools) -> None:
    search = _search(pools)
    assert len(search.grid) == 135 and search.batch_size == 135
    events = []
    while not search.done:
        events += search.advance()
    names = [e[0] for e in events]
    assert names.count("FIT_ITER") == 120 and names.count("CANDIDATE_DONE") == 135 and names.count("EPOCH_DONE") == 1
    it = next(d for n, d in events if n == "FIT_ITER")
    assert set(it) == {"epoch", "candidate", "batch_size", "iter", "objective"} and len(it["objective"]) == 135
    reported = [d["iter"] for n, d in events if n == "FIT_ITER" and d["objective"] is not None]
    assert reported == [1, *range(10, 121, 10)]  # search.objective_every = 10
    done = [d for n, d in events if n == "CANDIDATE_DONE"]
    assert set(done[0]) == {"epoch", "candidate", "meta_neuron", "l1", "l2", "objective", "val_f1", "val_iou", "val_fbeta", "threshold", "active_start", "active_mid", "active_end"}
    # the all-positive predictor's F1 on the validation prevalence
    val_y = np.concatenate([p.labels for p in pools[1]])
    totals = np.sum([p.class_counts for p in pools[1]], axis=0)
    prevalence = totals[1] / totals.sum()
    all_positive_f1 = 2 * prevalence / (1 + prevalence)
    best = max(d["val_f1"] for d in done)
    assert best > all_positive_f1 + 0.25, (best, all_positive_f1, val_y.mean())
    # same (l1, l2), different meta-neurons → different models
    theta = search.theta
    assert not torch.equal(theta[0], theta[15]) and not torch.equal(theta[15], theta[30])
    assert abs(done[0]["objective"] - done[15]["objective"]) > 0


def test_reporting_the_objective_less_often_changes_no_fit(pools) -> None:
    runs = {}
    for every in (1, 5):
        search = _search(pools, max_iter=12, batch_candidates=45, objective_every=every)
        events = []
        while not search.done:
            events += search.advance()
        runs[every] = (search.theta, {(d["candidate"], d["iter"]): d["objective"] for n, d in events if n == "FIT_ITER"},
                       [d for n, d in events if n == "CANDIDATE_DONE"])
    (theta_1, objectives_1, done_1), (theta_5, objectives_5, done_5) = runs[1], runs[5]
    assert torch.equal(theta_1, theta_5) and done_1 == done_5
    assert sorted({i for (_, i), value in objectives_5.items() if value is not None}) == [1, 5, 10, 12]
    assert all(value is None or value == objectives_1[key] for key, value in objectives_5.items())
    assert all(value is not None for value in objectives_1.values())


def test_state_dict_resume_is_bit_exact(pools) -> None:
    reference = _search(pools, max_iter=12, batch_candidates=45, max_epochs=2)
    while not reference.done:
        reference.advance()
    for stop_after in (5, 14, 30, 40):
        first = _search(pools, max_iter=12, batch_candidates=45, max_epochs=2)
        for _ in range(stop_after):
            first.advance()
        state = first.state_dict()
        second = _search(pools, max_iter=12, batch_candidates=45, max_epochs=2)
        second.load_state_dict(state)
        while not second.done:
            second.advance()
        assert torch.equal(second.theta, reference.theta), stop_after
        assert second.history == reference.history


def test_top_models_rank_every_finished_fit_and_refuse_before_the_first(pools) -> None:
    """Stopped inside epoch 1, the ensemble is the top k of every candidate's latest fit, not of this epoch's batches."""
    from nx46vx.errors import SearchError

    search = _search(pools, max_iter=6, batch_candidates=45, max_epochs=3)
    assert not search.evaluated
    with pytest.raises(SearchError, match="no search model yet"):
        search.top_models(5)
    latest: dict[int, dict] = {}
    while not (search.epoch == 1 and 0 < len(search.epoch_results) < len(search.grid)):
        for name, data in search.advance():
            if name == "CANDIDATE_DONE":
                latest[data["candidate"]] = data
    assert len(latest) == len(search.grid) and sum(r["epoch"] == 1 for r in latest.values()) == 45
    expected = sorted(latest.values(), key=lambda r: (-r["val_f1"], r["candidate"]))[:5]
    top = search.top_models(5)
    assert top["candidates"] == [r["candidate"] for r in expected] and top["val_f1"] == [r["val_f1"] for r in expected]
    assert torch.equal(top["thetas"], search.theta[top["candidates"]])
    resumed = _search(pools, max_iter=6, batch_candidates=45, max_epochs=3)
    resumed.load_state_dict(search.state_dict())
    assert resumed.top_models(5)["candidates"] == top["candidates"]


def test_validation_weights_count_each_volume_by_its_labelled_voxels() -> None:
    """Pools are capped per volume: a small volume's sampled voxels weigh its own class counts, not a pooled share."""
    from nx46vx.search.sampling import validation_sample

    def pool(n: int, counts: tuple[int, int], value: float) -> Pool:
        labels = np.repeat(np.array([0, 1], np.uint8), n)
        return Pool(np.full((2 * n, 3), value, np.float32), labels, np.zeros((2 * n, 3), np.int32), np.array(counts, np.int64))

    small, large = pool(400, (500, 100), 0.0), pool(400, (90_000, 20_000), 1.0)
    sample = validation_sample([small, large], 300, np.random.default_rng(0))
    from_large = sample.features[:, 0] == 1.0
    for cls, (n_small, n_large) in enumerate(zip(small.class_counts, large.class_counts)):
        of_class = sample.labels == cls
        assert sample.weights[of_class & ~from_large].sum() == pytest.approx(n_small)
        assert sample.weights[of_class & from_large].sum() == pytest.approx(n_large)


def test_a_search_resumed_on_other_numerics_says_so(pools) -> None:
    """The data pass and device are stored with the state; continuing on others journals the change once (not bit-exact)."""
    first = _search(pools, max_iter=12, batch_candidates=45, kernel="torch")
    for _ in range(3):
        first.advance()
    saved = first.state_dict()
    assert saved["numerics"] == {"kernel": "torch", "device": "cpu"}
    same = _search(pools, max_iter=12, batch_candidates=45, kernel="torch")
    same.load_state_dict(saved)
    assert all(name != "SEARCH_NUMERICS_CHANGED" for _ in range(3) for name, _ in same.advance())
    moved = _search(pools, max_iter=12, batch_candidates=45, kernel="torch")
    moved.load_state_dict(dict(saved, numerics={"kernel": "native", "device": "cuda"}))  # as written by a GPU session
    events = [e for _ in range(4) for e in moved.advance()]
    changes = [d for name, d in events if name == "SEARCH_NUMERICS_CHANGED"]
    assert len(changes) == 1 and changes[0]["changed"] == {"kernel": ["native", "torch"], "device": ["cuda", "cpu"]}
    assert moved.state_dict()["numerics"] == {"kernel": "torch", "device": "cpu"}
