"""Phase 4: the prox-trained candidate search, advanced step by step under the governor and checkpointed at its cursor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...config import RunConfig
from ...search import N_PARAMS, CandidateSearch
from ...search.engine import extendable
from .base import plain

if TYPE_CHECKING:
    from ..context import RunContext
    from ..state import RunState


class SearchPhase:
    """The candidate grid. State: :meth:`CandidateSearch.state_dict` (cursor, parameters, FISTA state, batch size)."""

    name = "search"

    def __init__(self) -> None:
        self.done = False
        self.search: CandidateSearch | None = None
        self._saved: dict[str, Any] | None = None

    def signature(self, config: RunConfig) -> dict[str, Any]:
        s = config.search
        return plain({
            "grid": {"meta_neurons": s.meta_neurons, "l1": list(s.l1), "l2": list(s.l2), "max_iter": s.max_iter},
            "sampling": {"seed": config.seed, "samples_per_class": s.samples_per_class, "val_samples_per_class": s.val_samples_per_class},
            "model": {"kind": "sparse_logistic_meta_neuron", "n_params": N_PARAMS, "init_scale": s.init_scale, "fbeta": s.fbeta, "block_rows": s.block_rows,
                      "batch_candidates": s.batch_candidates, "min_delta": s.min_delta, "grow_on_stagnation": s.grow_on_stagnation, "max_meta_neurons": s.max_meta_neurons},
        })

    def state_dict(self) -> dict[str, Any] | None:
        return self.search.state_dict() if self.search is not None else self._saved

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        self._saved = saved
        self.done = bool(saved) and saved.get("stage") == "done"

    def finished(self, config: RunConfig) -> bool:
        """Done, and not to be continued by this session's settings (the features phase then loads no pools)."""
        saved = self._saved
        return self.done and not (saved is not None and extendable(str(saved["stage"]), int(saved["epoch"]), int(saved["stagnation"]), config.search))

    def run(self, ctx: "RunContext", state: "RunState") -> None:
        with ctx.phase(self.name) as end:
            if not state.trainable:
                ctx.event("SEARCH_SKIPPED", self.name, {"reason": "fewer than two training volumes", "train_pairs": len(state.discovery.train)})
                ctx.progress.set(self.name, 1.0)  # nothing to train
                self.done = True
                return
            train = [state.pools[p.id] for p in state.train_pairs if p.id in state.pools]  # the feature subset
            val = [state.pools[p.id] for p in state.val_pairs if p.id in state.pools]
            search = CandidateSearch(ctx.config.search, train, val, seed=ctx.config.seed, device=ctx.device)
            if self._saved is not None:
                search.load_state_dict(self._saved)
                extended = search.reopen()  # max_epochs and patience are not in the signature: raising them continues
                if extended:
                    ctx.event("SEARCH_EXTENDED", self.name, extended)
            self.search = state.search = search
            ctx.reporter.session_iters_start = search.candidate_iterations
            if not search.done:
                self._advance(ctx, state, search)
            self.done = search.done
            end.update(cursor=search.cursor(), iterations=search.iterations_done, done=search.done)

    def _advance(self, ctx: "RunContext", state: "RunState", search: CandidateSearch) -> None:
        """Iterate until the search ends or the governor stops it; checkpoint at the cadence and at every boundary."""
        cfg = ctx.config.search
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_epochs * len(search.grid) * cfg.max_iter, desc="search", unit="cand-it", disable=None, leave=False)
        every = ctx.config.checkpoint.every_iters
        while not search.done:
            if ctx.governor.phase_should_stop(self.name):
                reason = ctx.governor.stop_reason or "phase_share"
                ctx.event("PRETIMEOUT_FLUSH", self.name, dict(search.cursor(), reason=reason, **ctx.governor.state()))
                state.unfinished.append(self.name)
                ctx.checkpointer.write("pretimeout_flush")
                break
            checkpoint_due = None
            state.advanced.add(self.name)
            for name, data in search.advance():
                ctx.event(name, self.name, data)
                if name == "FIT_ITER":
                    bar.update(data["batch_size"])
                    if data["iter"] % every == 0 and data["iter"] < cfg.max_iter:
                        checkpoint_due = "every_iters"
                elif name == "CANDIDATE_DONE":
                    checkpoint_due = "batch_end"
                elif name == "EPOCH_DONE":
                    checkpoint_due = "epoch_end"
                    ctx.event("TIME_BUDGET_STATE", self.name, ctx.governor.state())
            if search.done:
                self.done = True
                checkpoint_due = "search_done"
            if checkpoint_due:
                ctx.checkpointer.write(checkpoint_due)
            ctx.reporter.report()
        bar.close()
