"""Phases 2 + 3: read each chosen training volume once (on a cache miss) and keep its pool of labelled voxels with features.

Under a budget the governor decides, before each volume, whether its predicted
cost still fits the phase's share: validation volumes first, then training volumes
in a seeded order, until the next one would not fit (at least one of each is
always taken). The subset is a time-driven decision: it is stored in the
checkpoint and replayed by a resumed run (``FEATURES_SUBSET``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...config import RunConfig
from ...discovery import TrainPair
from ...features import FeatureCache, spec_dict
from ...volumes import read_pair, volume_voxels
from ...walk import walk_folders
from .base import plain
from .search import SearchPhase
from ... import streams

if TYPE_CHECKING:
    from ..context import RunContext
    from ..state import RunState

ATTACHED_DEPTH = 3


def attached_caches(roots: list[Path]) -> list[Path]:
    """``cache/features`` folders of previous outputs attached as inputs."""
    return [folder / "cache" / "features" for folder in walk_folders(roots, depth=ATTACHED_DEPTH) if (folder / "cache" / "features").is_dir()]


class FeaturesPhase:
    """Feature pools of the chosen volumes. State: the chosen subset, once decided."""

    name = "features"

    def __init__(self) -> None:
        self.done = False
        self.chosen: list[str] | None = None
        self.skipped: list[str] = []

    def signature(self, config: RunConfig) -> dict[str, Any]:
        return plain({"spec": spec_dict(config.features), "pool_per_class": config.features.pool_per_class, "seed": config.seed})

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "chosen": self.chosen, "skipped": list(self.skipped)}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        if saved:
            self.done, self.chosen, self.skipped = bool(saved["done"]), saved["chosen"], list(saved["skipped"])

    def order(self, state: "RunState", seed: int) -> list[TrainPair]:
        """Validation volumes first (sorted), then training volumes in a seeded order."""
        train = sorted(state.train_pairs, key=lambda p: p.id)
        perm = streams.generator(seed, streams.FEATURE_ORDER).permutation(len(train))
        return sorted(state.val_pairs, key=lambda p: p.id) + [train[i] for i in perm]

    def run(self, ctx: "RunContext", state: "RunState") -> None:
        with ctx.phase(self.name) as end:
            search = next((p for p in ctx.phases if isinstance(p, SearchPhase)), None)
            needed = state.trainable and not (search is not None and search.finished(ctx.config))  # only the search reads pools
            if not needed:
                end.update(skipped="the search already finished" if state.trainable else "fewer than two training volumes")
                ctx.progress.set(self.name, 1.0)
                return
            end.update(self._pools(ctx, state))
        self.done = True
        ctx.checkpointer.write("features_done")

    def _pools(self, ctx: "RunContext", state: "RunState") -> dict[str, Any]:
        config, governor = ctx.config, ctx.governor
        roots = [Path(p) for p in state.discovery.input_roots]
        cache = FeatureCache(ctx.output / "cache" / "features", attached=attached_caches(roots), admit=lambda path, n: ctx.admit_cache(path, n, self.name))
        order = self.order(state, config.seed)
        replay = self.chosen is not None
        wanted = set(self.chosen) if replay else None
        val_ids = {p.id for p in state.val_pairs}
        seconds = voxels_done = 0.0
        load_s = 0.0
        chosen: list[str] = []
        skipped: list[str] = []
        predicted_total = 0.0
        from tqdm.auto import tqdm

        for pair in tqdm(order, desc="features", unit="vol", disable=None, leave=False):
            if replay:
                if pair.id not in wanted:
                    skipped.append(pair.id)
                    continue
            else:
                voxels = volume_voxels(pair.image)
                rate = seconds / voxels_done if voxels_done else config.budget.feature_s_per_mvoxel / 1e6
                predicted = 0.0 if cache.has(state.volume_keys[pair.id], config.features, config.seed) else rate * voxels
                have_both = any(i in val_ids for i in chosen) and any(i not in val_ids for i in chosen)
                if skipped or (have_both and governor.elapsed() + predicted > governor.phase_deadline(self.name)) or (have_both and governor.should_stop()):
                    skipped.append(pair.id)
                    predicted_total += predicted
                    continue
            times: dict[str, float] = {}

            def read(pair: TrainPair = pair) -> tuple[np.ndarray, np.ndarray]:
                t0 = governor.clock()
                image, label = read_pair(pair.image, pair.label)
                times["load"], times["voxels"] = governor.clock() - t0, image.size
                ctx.reporter.count_volume(image.shape)
                return image, label

            t0 = governor.clock()
            pool, source = cache.get_or_compute(state.volume_keys[pair.id], config.features, config.seed, read, device=ctx.device)
            if source == "computed":
                governor.account("features_volume")
            cost = governor.clock() - t0
            if source == "computed":
                seconds, voxels_done = seconds + cost, voxels_done + times["voxels"]
            load_s += times.get("load", 0.0)
            state.pools[pair.id] = pool
            chosen.append(pair.id)
            ctx.progress.set(self.name, (len(chosen) + len(skipped)) / len(order))
            ctx.event("FEATURES_READY", self.name, {"id": pair.id, "cache_hit": source != "computed", "source": source, "pool": int(pool.labels.size), "class_counts": pool.class_counts.tolist(), "seconds": round(cost, 4)})
            ctx.reporter.report()
        self._decide(ctx, chosen, skipped, predicted_total, replay)
        ctx.io_seconds += load_s
        if voxels_done:
            governor.measured_volume_cost(seconds / voxels_done, state.test_voxels, source="features")  # what the search model and ensemble segment with
        return {"cache_hits": cache.hits, "attached_hits": cache.attached_hits, "cache_misses": cache.misses, "cache_corrupt": cache.corrupt, "computed": cache.misses, "load_s": load_s, "features_s": seconds}

    def _decide(self, ctx: "RunContext", chosen: list[str], skipped: list[str], predicted_s: float, replay: bool) -> None:
        """Fix the subset (first time) or confirm the replayed one: the search trains on these pools (the student on every volume)."""
        if not replay:
            self.chosen, self.skipped = sorted(chosen), sorted(skipped)
            if skipped:
                ctx.event("FEATURES_SUBSET", self.name, {"chosen": self.chosen, "skipped": self.skipped, "predicted_skipped_s": round(predicted_s, 3), "deadline_s": round(ctx.governor.phase_deadline(self.name), 3)})
        elif self.skipped:
            ctx.event("FEATURES_SUBSET", self.name, {"chosen": self.chosen, "skipped": self.skipped, "replayed": True})
