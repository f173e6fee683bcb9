"""The prox-trained candidate search, epoch by epoch, as a step-wise state machine.

:class:`CandidateSearch` owns no clock, journal or file. Each call of
:meth:`CandidateSearch.advance` does one unit of work — one FISTA iteration of the
batch in flight, the end of a batch (final objectives + validation), or the end of
an epoch — and returns the events it produced; the runner journals them and
decides when to checkpoint. :meth:`state_dict` / :meth:`load_state_dict` capture
everything needed to continue bit-exactly: the epoch sample, bootstraps and
validation sample are re-derived from seeds, the rest is stored.

The model of a candidate is ``z = w·x + α·(x∘x) + β·g + b`` on standardised
features; the design row of a voxel is ``φ = [x, x∘x, g, 1]`` (P = 2F + G + 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..config import SearchConfig
from ..errors import SearchError
from ..features import G_NAMES, X_NAMES, Pool
from ..telemetry import free_memory
from .fista import BatchedFISTA, Design, FistaState
from .grid import Candidate, make_grid
from .sampling import Sample, balanced_sample, bootstrap_weights, validation_sample
from .. import streams

log = logging.getLogger("nx46vx")

N_X, N_G = len(X_NAMES), len(G_NAMES)
N_PARAMS = 2 * N_X + N_G + 1
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
_BINS = 1000

Event = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Standardiser:
    """Per-channel mean and std (float32, shape (C,)), fixed from the first epoch's sample."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> "Standardiser":
        mean = features.mean(axis=0, dtype=np.float64).astype(np.float32)
        std = features.std(axis=0, dtype=np.float64).astype(np.float32)
        return cls(mean, np.where(std > 1e-8, std, 1.0).astype(np.float32))


def extendable(stage: str, epoch: int, stagnation: int, config: SearchConfig) -> bool:
    """Whether a search in ``stage`` after ``epoch`` epochs may run more under ``config`` (see :meth:`CandidateSearch.reopen`)."""
    return stage == "done" and epoch < config.max_epochs and stagnation < config.patience


def reports_objective(iteration: int, config: SearchConfig) -> bool:
    """Whether ``FIT_ITER`` of this (1-based) iteration carries the objective: the first, every ``objective_every``-th and the last.

    The objective is only reported (FISTA's step size is 1/L), and its softplus is a
    fifth of a CPU iteration.
    """
    return iteration == 1 or iteration % config.objective_every == 0 or iteration >= config.max_iter


def design_rows(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[x, x∘x, g, 1]`` from raw features (n, C) → (n, P) float32 (same function for training and inference)."""
    z = (features - mean) / std
    x, g = z[:, :N_X], z[:, N_X:]
    return torch.cat((x, x * x, g, torch.ones_like(z[:, :1])), dim=1)


def penalised_mask(device: torch.device) -> torch.Tensor:
    """1 on ``w, α, β``, 0 on the bias."""
    mask = torch.ones(N_PARAMS, dtype=torch.float32, device=device)
    mask[-1] = 0
    return mask


def threshold_scan(
    probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *, beta: float
) -> dict[str, np.ndarray]:
    """Weighted F1, IoU and Fβ of each candidate at its best-F1 threshold of :data:`THRESHOLDS`.

    Parameters
    ----------
    probs : Tensor, shape (n, K)
    labels : Tensor, shape (n,), {0, 1}
    weights : Tensor, shape (n,)
    """
    n, k = probs.shape
    bins = (probs * _BINS).long().clamp_(0, _BINS - 1)
    offsets = torch.arange(k, device=probs.device) * _BINS
    flat = (bins + offsets).reshape(-1)
    wpos = (weights * labels).to(torch.float64)
    wneg = (weights * (1 - labels)).to(torch.float64)
    pos = torch.zeros(k * _BINS, dtype=torch.float64, device=probs.device).index_add_(0, flat, wpos.repeat_interleave(k))
    neg = torch.zeros(k * _BINS, dtype=torch.float64, device=probs.device).index_add_(0, flat, wneg.repeat_interleave(k))
    # counts at or above each bin edge
    pos_ge = pos.view(k, _BINS).flip(1).cumsum(1).flip(1)
    neg_ge = neg.view(k, _BINS).flip(1).cumsum(1).flip(1)
    edges = torch.tensor([round(t * _BINS) for t in THRESHOLDS], device=probs.device)
    tp, fp = pos_ge[:, edges], neg_ge[:, edges]
    fn = wpos.sum() - tp
    eps = 1e-12
    f1 = 2 * tp / (2 * tp + fp + fn + eps)
    iou = tp / (tp + fp + fn + eps)
    b2 = beta * beta
    fbeta = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp + eps)
    best = f1.argmax(dim=1)
    pick = lambda m: m.gather(1, best[:, None])[:, 0].cpu().numpy()  # noqa: E731
    return {"f1": pick(f1), "iou": pick(iou), "fbeta": pick(fbeta), "threshold": np.asarray(THRESHOLDS)[best.cpu().numpy()]}


def epoch_design(pools: Sequence[Pool], config: SearchConfig, *, seed: int, epoch: int, meta_neurons: int, standardiser: Standardiser | None,
                 device: torch.device) -> tuple[Design, Standardiser]:
    """An epoch's design: its seeded balanced sample, standardised, with each meta-neuron's bootstrap weights.

    The standardiser is fitted on the first epoch's sample (``standardiser`` None) and kept after.
    """
    sample: Sample = balanced_sample(pools, config.samples_per_class, streams.generator(seed, streams.SEARCH_EPOCH_SAMPLE, epoch))
    standardiser = standardiser if standardiser is not None else Standardiser.fit(sample.features)
    mean, std = torch.from_numpy(standardiser.mean).to(device), torch.from_numpy(standardiser.std).to(device)
    phi = design_rows(torch.from_numpy(sample.features).to(device), mean, std).contiguous()
    weights = torch.from_numpy(bootstrap_weights(phi.shape[0], range(meta_neurons), seed, epoch)).to(device)
    return Design(phi, torch.from_numpy(sample.labels).to(device)[:, None], weights, penalised_mask(device)), standardiser


def validation_design(pools: Sequence[Pool], config: SearchConfig, *, seed: int, standardiser: Standardiser,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The validation rows (standardised like the training design), labels and weights every candidate is scored on."""
    val = validation_sample(pools, config.val_samples_per_class, streams.generator(seed, streams.VALIDATION_SAMPLE))
    mean, std = torch.from_numpy(standardiser.mean).to(device), torch.from_numpy(standardiser.std).to(device)
    return design_rows(torch.from_numpy(val.features).to(device), mean, std), torch.from_numpy(val.labels).to(device), torch.from_numpy(val.weights).to(device)


def candidate_record(epoch: int, cand: Candidate, j: int, *, objective: np.ndarray, scan: dict[str, np.ndarray], active: dict[str, list[int]],
                     end: list[int]) -> dict[str, Any]:
    """``CANDIDATE_DONE``'s record of the ``j``-th candidate of a finished batch: its objective, validation scores and active weights."""
    return {
        "epoch": epoch, "candidate": cand.index, "meta_neuron": cand.meta_neuron, "l1": cand.l1, "l2": cand.l2,
        "objective": float(objective[j]), "val_f1": float(scan["f1"][j]), "val_iou": float(scan["iou"][j]), "val_fbeta": float(scan["fbeta"][j]),
        "threshold": float(scan["threshold"][j]),
        "active_start": int(active["start"][j]), "active_mid": int(active.get("mid", end)[j]), "active_end": int(end[j]),
    }


def top_models(evaluations: dict[int, dict[str, Any]], theta: torch.Tensor, standardiser: Standardiser | None, k: int) -> dict[str, Any]:
    """The ``k`` candidates with the best validation F1, each by its latest finished fit, with the standardiser.

    A search stopped inside an epoch still ranks every candidate: one not yet refit
    in this epoch keeps its previous fit (its parameters in ``theta`` are that fit's).

    Returns ``thetas`` (k', P) float32 tensor, ``candidates`` (their indices),
    ``val_f1`` and ``mean`` / ``std`` (C,).
    """
    results = sorted(evaluations.values(), key=lambda r: (-r["val_f1"], r["candidate"]))[: max(1, k)]
    chosen = [int(r["candidate"]) for r in results]
    return {
        "thetas": theta[chosen].clone(),
        "candidates": chosen,
        "val_f1": [float(r["val_f1"]) for r in results],
        "mean": standardiser.mean if standardiser is not None else np.zeros(N_X + N_G, np.float32),
        "std": standardiser.std if standardiser is not None else np.ones(N_X + N_G, np.float32),
    }


class CandidateSearch:
    """Search over ``meta_neurons × l1 × l2`` candidates, epoch after epoch.

    Parameters
    ----------
    config : SearchConfig
    train_pools, val_pools : sequences of Pool
        Labelled voxels of the training and validation volumes.
    seed : int
    device : torch.device
    """

    def __init__(self, config: SearchConfig, train_pools: Sequence[Pool], val_pools: Sequence[Pool], *, seed: int, device: torch.device) -> None:
        self.config = config
        self.train_pools = list(train_pools)
        self.val_pools = list(val_pools)
        self.seed = seed
        self.device = device
        self.solver = BatchedFISTA(block_rows=config.block_rows, kernel=config.kernel)
        self.per_meta = len(config.l1) * len(config.l2)
        # state (everything below is in state_dict)
        self.meta_neurons = config.meta_neurons
        self.grid: list[Candidate] = make_grid(self.meta_neurons, config.l1, config.l2)
        self.theta = torch.zeros(0, N_PARAMS)
        self.standardiser: Standardiser | None = None
        self.epoch = 0
        self.stage = "epoch_start"
        self.batch_start = 0
        self.fista: FistaState | None = None
        self.active_marks: dict[str, list[int]] = {}
        self.epoch_results: list[dict[str, Any]] = []
        self.evaluations: dict[int, dict[str, Any]] = {}  # each candidate's latest finished fit, the one ``theta`` holds
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.stagnation = 0
        self.iterations_done = 0
        self.candidate_iterations = 0
        self._batch: int | None = None  # decided once from free memory, then stored: a resumed run never re-derives it
        self.numerics: dict[str, str] | None = None  # the data pass and device the fits ran on (their numerics agree only to float tolerance)
        # derived per epoch (not stored)
        self._design: Design | None = None
        self._lipschitz: torch.Tensor | None = None
        self._val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._init_theta(0)

    # ------------------------------------------------------------------ properties

    @property
    def done(self) -> bool:
        return self.stage == "done"

    @property
    def batch_size(self) -> int:
        """Candidates advanced together: whole meta-neurons; ``batch_candidates`` or as many as memory allowed when first asked."""
        if self._batch is None:
            if self.config.batch_candidates > 0:
                metas = max(1, self.config.batch_candidates // self.per_meta)
            else:
                metas = min(self.meta_neurons, max(1, int(0.25 * free_memory(self.device) // self._bytes_per_meta())))
            self._batch = metas * self.per_meta
        return min(self._batch, len(self.grid))

    def _bytes_per_meta(self) -> int:
        """Working memory one meta-neuron's candidates add to a batch (logit, loss and weight blocks, float32)."""
        return 4 * self.config.block_rows * self.per_meta * 4

    def cursor(self) -> dict[str, int]:
        """``(epoch, candidate, iter)``: first candidate of the batch in flight, last completed iteration."""
        return {"epoch": self.epoch, "candidate": self.batch_start, "iter": self.fista.iter if self.fista else 0}

    def progress(self) -> float:
        """Fraction of the current epoch done, from the cursor (0..1)."""
        total = len(self.grid) * self.config.max_iter
        done = self.batch_start * self.config.max_iter + (self.fista.iter if self.fista else 0) * self.batch_size
        return min(1.0, done / total)

    # ------------------------------------------------------------------ setup

    def _init_theta(self, first_meta: int) -> None:
        """Seeded initial parameters for meta-neurons ``first_meta..meta_neurons-1`` (appended)."""
        rows = []
        for cand in self.grid[first_meta * self.per_meta :]:
            rng = streams.generator(self.seed, streams.INITIAL_THETA, cand.meta_neuron)
            init = rng.normal(0.0, self.config.init_scale, N_PARAMS).astype(np.float32)
            init[-1] = 0.0
            rows.append(torch.from_numpy(init))
        if rows:
            self.theta = torch.cat((self.theta, torch.stack(rows)))

    def _prepare_epoch(self) -> None:
        """Derive the epoch's design, bootstraps and step sizes (deterministic from seed and epoch)."""
        self._design, self.standardiser = epoch_design(self.train_pools, self.config, seed=self.seed, epoch=self.epoch, meta_neurons=self.meta_neurons,
                                                       standardiser=self.standardiser, device=self.device)
        metas = torch.tensor([c.meta_neuron for c in self.grid], device=self.device)
        l2 = torch.tensor([c.l2 for c in self.grid], device=self.device)
        self._lipschitz = self.solver.lipschitz(self._design, metas, l2)
        if self._val is None:
            self._val = validation_design(self.val_pools, self.config, seed=self.seed, standardiser=self.standardiser, device=self.device)

    def _batch_tensors(self) -> tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        sl = slice(self.batch_start, min(len(self.grid), self.batch_start + self.batch_size))
        cands = self.grid[sl]
        metas = torch.tensor([c.meta_neuron for c in cands], device=self.device)
        l1 = torch.tensor([c.l1 for c in cands], device=self.device, dtype=torch.float32)
        l2 = torch.tensor([c.l2 for c in cands], device=self.device, dtype=torch.float32)
        assert self._lipschitz is not None
        return sl, metas, l1, l2, self._lipschitz[sl]

    @staticmethod
    def _active(theta: torch.Tensor) -> list[int]:
        return (theta[:, :-1] != 0).sum(dim=1).cpu().tolist()

    def _start_batch(self) -> None:
        sl = slice(self.batch_start, min(len(self.grid), self.batch_start + self.batch_size))
        x0 = self.theta[sl].to(self.device)
        self.fista = self.solver.init_state(x0)
        self.active_marks = {"start": self._active(x0)}
        self.stage = "iterating"

    # ------------------------------------------------------------------ the step

    def advance(self) -> list[Event]:
        """Do one unit of work; return the events it produced (empty when done)."""
        if self.stage == "done":
            return []
        changed = self._check_numerics() if self.stage in ("epoch_start", "iterating") else []
        if self._design is None and self.stage != "epoch_end":
            self._prepare_epoch()
        if changed:
            return changed
        if self.stage == "epoch_start":
            self.batch_start = 0
            self.epoch_results = []
            self._start_batch()
            start = {
                "epoch": self.epoch,
                "candidates": len(self.grid),
                "batch_size": self.batch_size,
                "samples": int(self._design.phi.shape[0]),
                "kernel": self.solver.kernel_for(self.device),
            }
            return [("EPOCH_START", start)]
        if self.stage == "iterating":
            return [self._iterate()]
        if self.stage == "batch_end":
            return self._end_batch()
        if self.stage == "epoch_end":
            return self._end_epoch()
        raise AssertionError(self.stage)

    def _check_numerics(self) -> list[Event]:
        """``SEARCH_NUMERICS_CHANGED`` once, when the fits go on with another data pass or device than the stored state's.

        The native kernel, eager torch and a GPU agree to float tolerance, not bit for
        bit: a search resumed across them continues correctly but is no longer the bits
        of an uninterrupted run, and the journal says so.
        """
        previous, self.numerics = self.numerics, {"kernel": self.solver.kernel_for(self.device), "device": self.device.type}
        changed = {k: [previous.get(k), v] for k, v in self.numerics.items() if previous.get(k) != v} if previous is not None else {}
        if not changed:
            return []
        log.warning("the search continues with other numerics than its checkpoint (%s): results agree to float tolerance, not bit for bit", changed)
        return [("SEARCH_NUMERICS_CHANGED", {"changed": changed, "epoch": self.epoch, "candidate": self.batch_start})]

    def _iterate(self) -> Event:
        assert self.fista is not None and self._design is not None
        sl, metas, l1, l2, lips = self._batch_tensors()
        with_objective = reports_objective(self.fista.iter + 1, self.config)
        self.fista, objective = self.solver.step(self._design, self.fista, metas, l1, l2, lips, with_objective=with_objective)
        self.iterations_done += 1
        self.candidate_iterations += sl.stop - sl.start
        if self.fista.iter == max(1, self.config.max_iter // 2):
            self.active_marks["mid"] = self._active(self.fista.x)
        if self.fista.iter >= self.config.max_iter:
            self.stage = "batch_end"
        return (
            "FIT_ITER",
            {"epoch": self.epoch, "candidate": sl.start, "batch_size": sl.stop - sl.start, "iter": self.fista.iter,
             "objective": None if objective is None else objective.cpu().tolist()},
        )

    def _end_batch(self) -> list[Event]:
        assert self.fista is not None and self._design is not None and self._val is not None
        sl, metas, l1, l2, _ = self._batch_tensors()
        x = self.fista.x
        objective = self.solver.objective(self._design, x, metas, l1, l2).cpu().numpy()
        phi_val, y_val, w_val = self._val
        scan = threshold_scan(torch.sigmoid(phi_val @ x.T), y_val, w_val, beta=self.config.fbeta)
        end = self._active(x)
        events = []
        for j, cand in enumerate(self.grid[sl]):
            record = candidate_record(self.epoch, cand, j, objective=objective, scan=scan, active=self.active_marks, end=end)
            self.epoch_results.append(record)
            self.evaluations[cand.index] = record
            events.append(("CANDIDATE_DONE", record))
        self.theta[sl] = x.cpu()
        self.batch_start = sl.stop
        self.fista = None
        if self.batch_start >= len(self.grid):
            self.stage = "epoch_end"
        else:
            self._start_batch()
        return events

    def _end_epoch(self) -> list[Event]:
        best = max(self.epoch_results, key=lambda r: (r["val_f1"], -r["objective"], -r["candidate"]))
        improved = not self.best or best["val_f1"] > self.best["val_f1"] + self.config.min_delta
        if improved:
            self.best = dict(best)
            self.stagnation = 0
        else:
            self.stagnation += 1
        record = {"epoch": self.epoch, "best_candidate": best["candidate"], "best_objective": best["objective"], "best_f1": best["val_f1"], "stagnation": self.stagnation}
        self.history.append(record)
        events: list[Event] = [("EPOCH_DONE", record)]
        self.epoch += 1
        self._design = None
        stagnated = self.stagnation >= self.config.patience
        if stagnated and self.config.grow_on_stagnation and self.meta_neurons < self.config.max_meta_neurons:
            first = self.meta_neurons
            self.meta_neurons += 1
            self.grid = make_grid(self.meta_neurons, self.config.l1, self.config.l2)
            self._init_theta(first)
            self.stagnation = 0
            events.append(("SEARCH_GROWN", {"epoch": self.epoch, "meta_neurons": self.meta_neurons, "candidates": len(self.grid)}))
            stagnated = False
        if stagnated or self.epoch >= self.config.max_epochs:
            self.stage = "done"
            events.append(("SEARCH_DONE", {"epochs": self.epoch, "reason": "stagnation" if stagnated else "epoch_cap", "best": self.best}))
        else:
            self.stage = "epoch_start"
        return events

    def reopen(self) -> dict[str, Any] | None:
        """Continue a finished search when the settings now allow more: ``max_epochs`` above the epochs done, and a
        ``patience`` the stagnation has not reached. Returns what changed (for ``SEARCH_EXTENDED``), or None.

        The epochs run next are the ones an uninterrupted search with these settings would have run: each
        epoch's sample and bootstraps come from the seed and the epoch number, and the parameters carry over.
        """
        if not extendable(self.stage, self.epoch, self.stagnation, self.config):
            return None
        self.stage = "epoch_start"
        return {"epochs_done": self.epoch, "max_epochs": self.config.max_epochs, "stagnation": self.stagnation, "patience": self.config.patience}

    # ------------------------------------------------------------------ results

    @property
    def evaluated(self) -> bool:
        """Whether any candidate has finished a fit (before that there is no model to use)."""
        return bool(self.evaluations)

    def top_models(self, k: int) -> dict[str, Any]:
        """The ``k`` best candidates by their latest finished fits (:func:`top_models`); :class:`SearchError` before the first."""
        if not self.evaluations:
            raise SearchError("no search model yet", expected="at least one candidate with a finished fit", found=f"none (epoch {self.epoch}, stage {self.stage})")
        return top_models(self.evaluations, self.theta, self.standardiser, k)

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here (tensors on CPU)."""
        return {
            "meta_neurons": self.meta_neurons,
            "theta": self.theta.clone(),
            "standardiser": None if self.standardiser is None else {"mean": self.standardiser.mean.copy(), "std": self.standardiser.std.copy()},
            "epoch": self.epoch,
            "stage": self.stage,
            "batch_start": self.batch_start,
            "fista": None if self.fista is None else self.fista.state_dict(),
            "active_marks": {k: list(v) for k, v in self.active_marks.items()},
            "epoch_results": [dict(r) for r in self.epoch_results],
            "evaluations": [dict(r) for _, r in sorted(self.evaluations.items())],
            "history": [dict(r) for r in self.history],
            "best": dict(self.best),
            "stagnation": self.stagnation,
            "iterations_done": self.iterations_done,
            "candidate_iterations": self.candidate_iterations,
            "batch_size": self._batch,
            "numerics": self.numerics,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.meta_neurons = int(state["meta_neurons"])
        self.grid = make_grid(self.meta_neurons, self.config.l1, self.config.l2)
        self.theta = state["theta"].clone()
        std = state["standardiser"]
        self.standardiser = None if std is None else Standardiser(np.asarray(std["mean"], np.float32), np.asarray(std["std"], np.float32))
        self.epoch = int(state["epoch"])
        self.stage = str(state["stage"])
        self.batch_start = int(state["batch_start"])
        self.fista = None if state["fista"] is None else FistaState.from_state_dict(state["fista"], self.device)
        self.active_marks = {k: list(v) for k, v in state["active_marks"].items()}
        self.epoch_results = [dict(r) for r in state["epoch_results"]]
        # a checkpoint written before evaluations were stored: its current epoch's results, else its best
        saved = state.get("evaluations", state["epoch_results"] or ([state["best"]] if state["best"] else []))
        self.evaluations = {int(r["candidate"]): dict(r) for r in saved}
        self.history = [dict(r) for r in state["history"]]
        self.best = dict(state["best"])
        self.stagnation = int(state["stagnation"])
        self.iterations_done = int(state["iterations_done"])
        self.candidate_iterations = int(state["candidate_iterations"])
        self._batch = None if state.get("batch_size") is None else int(state["batch_size"])
        self.numerics = state.get("numerics")  # absent from older checkpoints: unknown, not compared
        self._design = None
        self._val = None
