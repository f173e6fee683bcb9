"""Batched FISTA over the 135-candidate grid vs the old per-candidate NumPy ISTA loop vs scikit-learn.

Run: ``python bench/bench_search.py [--samples 1000000] [--repeats 3] [--old-candidates 2] [--sklearn-candidates 2] [--torch-iters 3] [--every-iteration]``.
All three work on the same design rows (one synthetic training sample of labelled voxels). The batched
search and the old loop are timed ``--repeats`` times each, alternating, and the ratio of their medians is
printed last. The batched search runs as the search phase does: the objective, which only ``FIT_ITER``
reports, is evaluated on the iterations that report it (``search.objective_every``; the old loop never
evaluated its objective); ``--every-iteration`` also times it on every iteration.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace

import numpy as np
import torch

from nx46vx.config import FeatureConfig, SearchConfig
from nx46vx.features import sample_pool
from nx46vx.search import BatchedFISTA, Design, design_rows, make_grid, penalised_mask
from nx46vx.search.engine import N_X, N_G, Standardiser, reports_objective
from nx46vx.search.sampling import balanced_sample, bootstrap_weights
from nx46vx.synthetic import make_volume


def build_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cfg = replace(FeatureConfig(), pool_per_class=n // 2)
    pools = []
    total = np.zeros(2, int)
    while total.min() < n // 2:
        vol = make_volume((96, 96, 96), rng)
        pools.append(sample_pool(vol.image, vol.label, cfg, rng=rng))
        total += np.bincount(pools[-1].labels, minlength=2)
    sample = balanced_sample(pools, n // 2, np.random.default_rng(seed))
    return sample.features, sample.labels


def old_loop(x: np.ndarray, x2: np.ndarray, g: np.ndarray, y: np.ndarray, l1: float, l2: float, iters: int) -> None:
    """The old fit_prox: full-batch ISTA, lr 0.08, zero init, one candidate at a time (OLD_SYSTEM.md)."""
    n, f = x.shape
    w, a, b_ = np.zeros(f), np.zeros(f), np.zeros(g.shape[1])
    bias = 0.0
    lr = 0.08
    for _ in range(iters):
        z = x @ w + x2 @ a + g @ b_ + bias
        p = 1.0 / (1.0 + np.exp(-z))
        r = (p - y) / n
        gw, ga, gb = x.T @ r + l2 * w, x2.T @ r + l2 * a, g.T @ r + l2 * b_
        bias -= lr * r.sum()
        w, a, b_ = (np.sign(v - lr * gv) * np.maximum(np.abs(v - lr * gv) - lr * l1, 0) for v, gv in ((w, gw), (a, ga), (b_, gb)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--iters", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3, help="timings of the batched search and of the old loop, alternating (median)")
    parser.add_argument("--old-candidates", type=int, default=2)
    parser.add_argument("--sklearn-candidates", type=int, default=2)
    parser.add_argument("--torch-iters", type=int, default=3, help="iterations of the eager-torch path, for reference (0: skip)")
    parser.add_argument("--every-iteration", action="store_true", help="also time the search with the objective on every iteration, once")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}, building a sample of {args.samples:,} labelled voxels …", flush=True)
    features, labels = build_sample(args.samples, 0)
    n = features.shape[0]
    std = Standardiser.fit(features)
    phi = design_rows(torch.from_numpy(features), torch.from_numpy(std.mean), torch.from_numpy(std.std)).contiguous()
    cfg = SearchConfig()
    grid = make_grid(cfg.meta_neurons, cfg.l1, cfg.l2)
    k = len(grid)

    # (a) batched FISTA, all 135 candidates together (the default kernel: fused native on a CPU with a compiler)
    weights = torch.from_numpy(bootstrap_weights(n, range(cfg.meta_neurons), 0, 0))
    design = Design(phi, torch.from_numpy(labels)[:, None], weights, penalised_mask(torch.device("cpu")))
    metas = torch.tensor([c.meta_neuron for c in grid])
    l1 = torch.tensor([c.l1 for c in grid])
    l2 = torch.tensor([c.l2 for c in grid])

    def time_search(solver: BatchedFISTA, iters: int, search: SearchConfig | None = None) -> float:
        """Seconds per candidate-iteration over ``iters`` iterations (after one warm-up iteration), as the search runs them.

        The objective is evaluated on the iterations whose ``FIT_ITER`` reports it (:func:`reports_objective`).
        """
        search = replace(search or cfg, max_iter=iters)
        lips = solver.lipschitz(design, metas, l2)
        state = solver.init_state(torch.zeros(k, phi.shape[1]))
        state, _ = solver.step(design, state, metas, l1, l2, lips)  # warm-up (and kernel build)
        state = solver.init_state(torch.zeros(k, phi.shape[1]))
        t0 = time.perf_counter()
        for it in range(1, iters + 1):
            state, _ = solver.step(design, state, metas, l1, l2, lips, with_objective=reports_objective(it, search))
        return (time.perf_counter() - t0) / (iters * k)

    # (b) old per-candidate loop, a subset of candidates, scaled linearly
    xs = phi[:, :N_X].numpy().astype(np.float64)
    x2 = phi[:, N_X : 2 * N_X].numpy().astype(np.float64)
    gs = phi[:, 2 * N_X : 2 * N_X + N_G].numpy().astype(np.float64)
    y64 = labels.astype(np.float64)

    def time_old() -> float:
        t0 = time.perf_counter()
        for cand in grid[: args.old_candidates]:
            old_loop(xs, x2, gs, y64, cand.l1, cand.l2, args.iters)
        return (time.perf_counter() - t0) / (args.iters * args.old_candidates)

    solver = BatchedFISTA(block_rows=cfg.block_rows, kernel=cfg.kernel)
    kernel = solver.kernel_for(torch.device("cpu"))
    batched_runs, old_runs = [], []
    for r in range(args.repeats):
        batched_runs.append(time_search(solver, args.iters))
        old_runs.append(time_old())
        print(f"    repeat {r + 1}: batched {batched_runs[-1] * 1e3:.3f} ms, old {old_runs[-1] * 1e3:.3f} ms per candidate-iteration "
              f"({old_runs[-1] / batched_runs[-1]:.1f}x)", flush=True)
    batched, old = float(np.median(batched_runs)), float(np.median(old_runs))
    reported = sum(reports_objective(it, replace(cfg, max_iter=args.iters)) for it in range(1, args.iters + 1))
    print(f"(a) batched FISTA, {kernel} kernel: {k} candidates x {args.iters} iterations on {n:,} samples: "
          f"{batched * args.iters * k:.1f} s, {batched * 1e3:.3f} ms per candidate-iteration (median of {args.repeats}; "
          f"objective evaluated on {reported} of {args.iters} iterations, search.objective_every = {cfg.objective_every})", flush=True)
    if args.every_iteration:
        every = time_search(solver, args.iters, replace(cfg, objective_every=1))
        print(f"    with the objective on every iteration (search.objective_every = 1, once): {every * 1e3:.3f} ms per candidate-iteration", flush=True)
    if args.torch_iters:
        eager = time_search(BatchedFISTA(block_rows=cfg.block_rows, kernel="torch"), args.torch_iters)
        print(f"    batched FISTA, torch kernel (timed {args.torch_iters} iterations): {eager * 1e3:.3f} ms per candidate-iteration", flush=True)
    print(f"(b) old NumPy loop: timed {args.old_candidates} candidates x {args.iters} iterations, scaled linearly to {k}: "
          f"{old * args.iters * k:.1f} s, {old * 1e3:.3f} ms per candidate-iteration (median of {args.repeats})", flush=True)

    # (c) scikit-learn elastic-net logistic regression (saga), a few candidates
    from sklearn.linear_model import LogisticRegression

    xd = phi[:, :-1].numpy().astype(np.float64)
    total_iters = 0
    t0 = time.perf_counter()
    for cand in grid[: args.sklearn_candidates]:
        alpha = cand.l1 + cand.l2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(penalty="elasticnet", solver="saga", l1_ratio=cand.l1 / alpha, C=1 / (n * alpha), max_iter=20, tol=1e-12)
            clf.fit(xd, labels)
        total_iters += int(clf.n_iter_[0])
    sk = (time.perf_counter() - t0) / total_iters
    print(f"(c) sklearn saga  : {args.sklearn_candidates} candidates, {total_iters} epochs: {sk * 1e3:.3f} ms per candidate-epoch")
    print(f"batched vs old loop (medians): {old / batched:.1f}x")


if __name__ == "__main__":
    main()
