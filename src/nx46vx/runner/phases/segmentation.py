"""Phase 6: choose the segmenter on validation, then segment every test volume under the governor.

Three time-driven decisions are made once, stored and replayed on resume: how much
of the post-processing grid each source is tuned on, which segmenters fit the time
left (``SEGMENTER_CHOICE``), and the test volume after which the rest switch to the
baseline's masks because the chosen segmenter would miss the deadline
(``SEGMENTER_SWITCH``). Each mask is written and checkpointed as it is produced, so
a resumed scoring run does not redo finished volumes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ... import reports
from ...config import SEGMENT_METHODS, RunConfig
from ...errors import Nx46Error
from ...metric import score_volume
from ...segment import (BASELINE, BLEND, ENSEMBLE, PREFERENCE, SEARCH_MODEL, STUDENT, TUNING_ORDER, WHOLE_GRID, PostParams, blend, choose_segmenter, intensity_baseline, plain_params, postprocess,
                        postprocess_grid, short_grid, tune_postprocess)
from ...telemetry import ensure_memory, mask_stats
from ...volumes import SEGMENT_BYTES_PER_VOXEL, read_volume
from ..masks import mask_intact, write_mask, write_probability
from ..sources import Source, probability_sources, validation_probabilities, validation_truths, validation_volumes
from .base import digest, plain

if TYPE_CHECKING:
    from ..context import RunContext
    from ..state import RunState
    from ..training_data import Fits

log = logging.getLogger("nx46vx")


#: The order the sources' validation maps are made in: the student's first (usually kept from its last validation), the blend from its parts.
MAPS_ORDER = (STUDENT, ENSEMBLE, BLEND, SEARCH_MODEL)


@dataclasses.dataclass
class Scored:
    """The segmenter choice's findings on validation, per candidate: score, cost, tuned parameters, grid points planned and tried, and those cut for time."""

    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds_per_voxel: dict[str, float] = dataclasses.field(default_factory=dict)
    params: dict[str, PostParams] = dataclasses.field(default_factory=dict)
    planned: dict[str, int] = dataclasses.field(default_factory=dict)
    tuned: dict[str, int] = dataclasses.field(default_factory=dict)
    cut_for_time: list[str] = dataclasses.field(default_factory=list)


class SegmentationPhase:
    """The segmenter choice and the test masks. State: the choice, the masks written, the switch point."""

    name = "segmentation"

    def __init__(self) -> None:
        self.done = False
        self.choice: dict[str, Any] | None = None
        self.masks: dict[str, dict[str, str]] = {}
        self.switched_at: int | None = None

    def signature(self, config: RunConfig) -> dict[str, Any]:
        return plain(dict(dataclasses.asdict(config.segment), reserve_safety=config.budget.reserve_safety,
                          min_val_surface_voxels=config.data.min_val_surface_voxels))  # which volumes validate the choice

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "choice": self.choice, "masks": self.masks, "switched_at": self.switched_at}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        if saved:
            self.done, self.choice, self.masks, self.switched_at = bool(saved["done"]), saved["choice"], dict(saved["masks"]), saved["switched_at"]

    def run(self, ctx: "RunContext", state: "RunState") -> None:
        self.done = False  # a kept choice may still get new test volumes: its state changes until the end
        with ctx.phase(self.name) as end:
            sources = probability_sources(ctx, state)
            if self.choice is not None and state.advanced & {"search", "distillation"}:
                ctx.event("SEGMENTATION_RESET", self.name, {"reason": "training advanced since the saved choice", "advanced": sorted(state.advanced)})
                self.choice, self.masks, self.switched_at, self.done = None, {}, None, False
            if self.choice is None:
                self.choice = self._choose(ctx, state, sources)
                ctx.checkpointer.write("segmenter_chosen")
            else:
                ctx.event("SEGMENTER_CHOICE", self.name, dict(self.choice, replayed=True))
            state.segmenter, state.validation_scores = self.choice["chosen"], dict(self.choice["validation_scores"])
            self._segment_all(ctx, state, self._segmenter(ctx, sources))
            self.done = True
            end.update(segmenter=state.segmenter, switched_at=self.switched_at)

    # ------------------------------------------------------------------ the choice

    def _choose(self, ctx: "RunContext", state: "RunState", sources: dict[str, Source]) -> dict[str, Any]:
        """Score every segmenter on validation (post-processing tuned per source within the time granted); pick the best that fits."""
        seg, governor = ctx.config.segment, ctx.governor
        names = [BASELINE] + list(sources)
        if seg.method != "auto":
            wanted = SEGMENT_METHODS[seg.method]
            if wanted not in names:
                raise Nx46Error("segmenter unavailable", expected=f"one of {names}", found=seg.method, hint="train the model it needs first")
            names = [wanted]
        volumes = validation_volumes(ctx, state)
        scored = Scored()
        if volumes:
            labels = validation_truths(ctx, state)
            if BASELINE in names:
                t0 = governor.clock()
                masks = [intensity_baseline(img, seg) for img, _ in volumes]
                scored.seconds_per_voxel[BASELINE] = (governor.clock() - t0) / sum(img.size for img, _ in volumes)
                scored.scores[BASELINE] = float(np.mean([score_volume(mask, lab).score for mask, lab in zip(masks, labels)]))
            self._score_sources(ctx, state, sources, [n for n in names if n in sources], labels, scored)
            names = [n for n in names if n not in scored.cut_for_time] or [BASELINE]  # the baseline's masks exist since discovery
            self._report(ctx, state, labels, scored)
        else:
            reason = "no validation volume" if not state.val_pairs else "no validation volume has enough surface voxels"
            order = [n for n in PREFERENCE if n in names]
            log.warning("%s: the segmenter is chosen by the fixed preference order %s, not by a score", reason, order)
            ctx.event("VALIDATION_UNAVAILABLE", self.name, {"reason": reason, "order": order})
        state.validation, state.validation_truths, state.validation_probs = None, None, {}  # test segmentation needs none of them
        time_left = governor.remaining() - governor.margin()
        choice = choose_segmenter(names, scored.scores, scored.seconds_per_voxel, test_voxels=state.test_voxels, safety=ctx.config.budget.reserve_safety,
                                  time_left=time_left, repaired=[name for name, params in scored.params.items() if params.repair_tunnels])
        record = {
            "chosen": choice.chosen,
            "by": ("preference order" if not scored.scores else "validation score" if choice.best_scored is None
                   else f"validation score: within segment.REPAIR_MARGIN / PREFERENCE_MARGIN of {choice.best_scored}"),
            "validation_scores": scored.scores,
            "params": None if choice.chosen == BASELINE else scored.params.get(choice.chosen, plain_params(seg)).to_dict(),
            "predicted_test_seconds": choice.predicted_test_seconds,
            "seconds_per_voxel": scored.seconds_per_voxel,
            "time_left_s": None if time_left == float("inf") else time_left,
            "excluded_for_time": sorted(set(choice.excluded_for_time) | set(scored.cut_for_time)),
            "validation_cut_for_time": scored.cut_for_time,
        }
        ctx.event("SEGMENTER_CHOICE", self.name, record)
        self._name_planning_failure(ctx, state, record)
        return plain(record)

    def _score_sources(self, ctx: "RunContext", state: "RunState", sources: dict[str, Source], names: list[str], labels: list[Any], scored: "Scored") -> None:
        """Each candidate's validation maps (the blend's from its parts'), then its post-processing tuning, into ``scored``.

        In the order of :data:`~nx46vx.segment.TUNING_ORDER`, the candidates of :data:`~nx46vx.segment.WHOLE_GRID`
        are tuned on the whole grid, each other one on :func:`~nx46vx.segment.short_grid` with the leader's point (the
        time a linear model's grid would take goes to the student's training instead). A source's maps stop when the
        rest of them and the test volumes, segmented by it or by the dearest source so far, would not fit; the blend's
        parts are held until it is scored.
        """
        seg, maps, costs = ctx.config.segment, {}, {}
        parts = {STUDENT, ENSEMBLE} & set(sources) if BLEND in names else set()
        for name in (n for n in MAPS_ORDER if n in set(names) | parts):
            test_price = state.test_prices.get(name)
            fits = self._inference_budget(ctx, state, max(costs.values(), default=0.0), test_price=test_price)
            if name == BLEND:
                per_voxel = costs.get(STUDENT, 0.0) + costs.get(ENSEMBLE, 0.0)
                probs = [blend(s, e) for s, e in zip(maps[STUDENT], maps[ENSEMBLE])] if parts <= set(maps) and fits(per_voxel, 0) else None
            else:
                probs, per_voxel = validation_probabilities(ctx, state, name, lambda _id, vol, source=sources[name]: source(vol), keep=False, fits=fits)
            costs[name] = per_voxel if test_price is None else test_price
            if probs is not None:
                maps[name] = probs
            elif name in names:  # a part's cut maps cut the blend, not a candidate of its own
                scored.cut_for_time.append(name)
        scored.seconds_per_voxel.update({n: costs[n] for n in names if n in costs})
        for name in (n for n in TUNING_ORDER if n in names and n in maps):
            leader = max(scored.params, key=scored.scores.__getitem__, default=None)
            grid = None if leader is None or name in WHOLE_GRID else short_grid(seg, scored.params[leader])
            keep_going = self._tuning_budget(ctx, state, max(scored.seconds_per_voxel.values()))
            scored.planned[name] = len(list(postprocess_grid(seg))) if grid is None else len(grid)
            scored.params[name], scored.scores[name], scored.tuned[name] = tune_postprocess(list(zip(maps[name], labels)), seg, grid=grid, keep_going=keep_going)
        governor = ctx.governor
        finishing = governor.finishing_seconds(state.test_voxels, governor.n_test) / max(1, state.test_voxels)
        for name, params in scored.params.items():  # its test volumes pay the clean-up, a checkpoint each and the tunnel repair where it repairs
            repair = governor.repair_s_per_voxel if params.repair_tunnels else 0.0
            scored.seconds_per_voxel[name] = scored.seconds_per_voxel.get(name, 0.0) + finishing + repair

    def _report(self, ctx: "RunContext", state: "RunState", labels: list[Any], scored: "Scored") -> None:
        """``VALIDATION_REPORT``: the candidates' scores and the teachers' (a teacher that is no candidate scored at the plain point only:
        reported, not chosen from); ``TUNING_CUT`` when time cut a grid."""
        seg, teacher_scores = ctx.config.segment, {}
        for teacher, probs in state.teacher_val_probs.items():
            if probs is not None and teacher in scored.scores:  # the ensemble teacher is the ensemble source: its score is already tuned
                teacher_scores[teacher] = scored.scores[teacher]
            elif probs is not None:
                _, teacher_scores[teacher], scored.tuned[f"teacher:{teacher}"] = tune_postprocess(list(zip(probs, labels)), seg, grid=[plain_params(seg)])
        ctx.event("VALIDATION_REPORT", self.name, {"volumes": [p.id for p in state.validation_pairs], "scores": scored.scores, "teachers": teacher_scores,
                                                   "params": {k: v.to_dict() for k, v in scored.params.items()}, "tuned_points": scored.tuned})
        cut = {k: v for k, v in scored.tuned.items() if v < scored.planned.get(k, 1)}
        if cut:
            ctx.event("TUNING_CUT", self.name, {"tried": cut, "grid": {k: scored.planned[k] for k in cut}})

    def _name_planning_failure(self, ctx: "RunContext", state: "RunState", record: dict[str, Any]) -> None:
        """A trained student, or the blend of it, left out for time is a planning failure (their inference was reserved before
        the student trained): ``PLANNING_FAILURE``."""
        excluded = [n for n in (STUDENT, BLEND) if n in record["excluded_for_time"]]
        if state.student is not None and state.student.step > 0 and excluded:
            log.warning("planning failure: excluded for time with a trained student: %s", excluded)
            ctx.event("PLANNING_FAILURE", self.name, {"what": "a trained student or its blend excluded for time", "excluded": excluded,
                                                      "predicted_test_seconds": {n: record["predicted_test_seconds"].get(n) for n in excluded},
                                                      "validation_cut_for_time": record["validation_cut_for_time"], "time_left_s": record["time_left_s"], **ctx.governor.state()})

    def _inference_budget(self, ctx: "RunContext", state: "RunState", leader_s: float, *, test_price: float | None = None) -> "Fits":
        """``fits(seconds_per_voxel, voxels_left)`` for a source's validation maps: the rest of them and the test volumes fit the time
        left, segmented by this source or by the leader so far (``leader_s`` seconds per voxel), whichever is dearer. The
        source's test volumes cost ``test_price`` per voxel where one is known (:attr:`RunState.test_prices`), else what
        its validation maps cost so far."""
        governor = ctx.governor

        def fits(per_voxel: float, voxels_left: int) -> bool:
            test_s = self._test_seconds(ctx, state, max(per_voxel if test_price is None else test_price, leader_s))
            return per_voxel * voxels_left + test_s <= governor.remaining() - governor.margin()

        return fits

    @staticmethod
    def _test_seconds(ctx: "RunContext", state: "RunState", seconds_per_voxel: float) -> float:
        """The test volumes' predicted seconds at a source's ``seconds_per_voxel`` (its inference), ``budget.reserve_safety``
        included: with the tunnel repair where the grid may choose it, each mask's clean-up and a checkpoint after each."""
        governor = ctx.governor
        repair = governor.repair_s_per_voxel if ctx.config.segment.repair_tunnels else 0.0
        test_s = (seconds_per_voxel + repair) * state.test_voxels + governor.finishing_seconds(state.test_voxels, governor.n_test)
        return test_s * ctx.config.budget.reserve_safety

    def _tuning_budget(self, ctx: "RunContext", state: "RunState", seconds_per_voxel: float) -> Callable[[int], bool]:
        """``keep_going(i)``: one more point fits when its measured cost and the test volumes at ``seconds_per_voxel`` fit the time left."""
        governor = ctx.governor
        start = governor.clock()
        test_s = self._test_seconds(ctx, state, seconds_per_voxel)

        def keep_going(i: int) -> bool:
            governor.account("tune_params")
            per_point = (governor.clock() - start) / i
            return per_point + test_s <= governor.remaining() - governor.margin()

        return keep_going

    # ------------------------------------------------------------------ the test volumes

    def _segmenter(self, ctx: "RunContext", sources: dict[str, Source]) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None, dict[str, Any]]]:
        seg, chosen = ctx.config.segment, self.choice["chosen"]
        if chosen == BASELINE:
            return lambda vol: (intensity_baseline(vol, seg), None, {})
        if chosen not in sources:
            raise Nx46Error("the saved segmenter choice names a model this run does not have", expected=f"one of {sorted(sources)}", found=chosen)
        source, params = sources[chosen], PostParams(**self.choice["params"])

        def segment(vol: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
            prob = source(vol)
            mask, info = postprocess(prob, params, seg)
            return mask, prob, info

        return segment

    def _segment_all(self, ctx: "RunContext", state: "RunState", segment: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None, dict[str, Any]]]) -> None:
        chosen, governor = self.choice["chosen"], ctx.governor
        folder = ctx.output / "masks" / f"{chosen}-{digest(self.choice)[:8]}"
        previews = ctx.output / "previews"
        previews.mkdir(exist_ok=True)
        tests = list(state.discovery.test)
        from tqdm.auto import tqdm

        for index, test in enumerate(tqdm(tests, desc="segmentation", unit="vol", disable=None, leave=False)):
            image_key = state.test_keys.get(test.id)
            saved = self.masks.get(test.id)
            path = folder / f"{test.id}.tif"
            if saved is not None and saved["image"] == image_key and saved["segmenter"] == chosen and mask_intact(path, saved["sha"]):
                state.masks[test.id] = path  # finished in an earlier session
                continue
            if test.id in state.rejected_tests:
                state.masks[test.id] = state.baseline_masks[test.id]  # the empty mask written at discovery
                continue
            if chosen != BASELINE and self.switched_at is None and self._behind(ctx, state, test.id):
                self.switched_at = index
                ctx.event("SEGMENTER_SWITCH", self.name, {"from": chosen, "to": BASELINE, "at_volume": test.id, "remaining": len(tests) - index, **governor.state()})
            if chosen == BASELINE or (self.switched_at is not None and index >= self.switched_at):
                state.masks[test.id] = state.baseline_masks[test.id]  # written at discovery
                continue
            t0 = governor.clock()
            ensure_memory(int(np.prod(state.shapes[test.id])) * SEGMENT_BYTES_PER_VOXEL, path=test.image, what=f"segmenting test volume {test.id}")
            volume = read_volume(test.image)
            ctx.reporter.count_volume(volume.shape)
            mask, prob, info = segment(volume)
            sha = write_mask(folder, test.id, mask)
            if prob is not None and ctx.config.segment.export_probabilities:
                write_probability(ctx.output / "probabilities", test.id, prob)
            governor.account("segment_volume")
            self.masks[test.id] = {"sha": sha, "image": image_key, "segmenter": chosen}
            state.masks[test.id] = path
            ctx.reporter.stats["volumes"][test.id] = mask_stats(mask, prob)
            reports.write_slice_preview(previews / f"{test.id}.png", volume, mask)
            ctx.event("VOLUME_SEGMENTED", self.name, {"id": test.id, "segmenter": chosen, "shape": list(volume.shape), "positive_fraction": float(mask.mean()), **info, "seconds": round(governor.clock() - t0, 4)})
            ctx.progress.set(self.name, (index + 1) / len(tests))
            ctx.checkpointer.write("volume_segmented")
            ctx.reporter.report()

    def _behind(self, ctx: "RunContext", state: "RunState", vol_id: str) -> bool:
        """True when the chosen segmenter's predicted cost on this volume no longer fits before the deadline."""
        governor = ctx.governor
        if governor.remaining() == float("inf"):
            return False
        per_voxel = self.choice["seconds_per_voxel"].get(self.choice["chosen"], 0.0)
        voxels = int(np.prod(state.shapes[vol_id]))
        return per_voxel * voxels * ctx.config.budget.reserve_safety > governor.remaining() - governor.margin()
