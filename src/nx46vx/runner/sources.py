"""Probability sources and the validation volumes they are judged on, shared by distillation and segmentation.

The validation volumes are read once per session; a source's maps on them are
computed once (distillation keeps its teachers' maps; the segmenter choice takes an
entry out when there is one — the ensemble is both a teacher and a source under the
same name — and otherwise computes without keeping, so only one source's maps are
held at a time). Costs are read from the governor's clock: they drive decisions.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Callable

import numpy as np

from .. import distill
from ..metric import Truth
from ..segment import BLEND, ENSEMBLE, SEARCH_MODEL, STUDENT, blend, compute_dtype, probability, sliding_window
from ..volumes import SURFACE, read_pair

if TYPE_CHECKING:
    from ..search import CandidateSearch
    from .training_data import Fits
    from .context import RunContext
    from .state import RunState

log = logging.getLogger("nx46vx")

Source = Callable[[np.ndarray], np.ndarray]


def validation_volumes(ctx: "RunContext", state: "RunState") -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, label) of the validation volumes segmentation is chosen on, read once per session.

    A volume with fewer than ``data.min_val_surface_voxels`` surface voxels is left
    out (``VALIDATION_EXCLUDED``): on a truth without surface every empty prediction
    scores 1.0, which would rank segmenters by how little they find. The volumes kept
    are ``state.validation_pairs``, in the same order.
    """
    if state.validation is None:
        least = ctx.config.data.min_val_surface_voxels
        state.validation, state.validation_pairs = [], []
        for pair in state.val_pairs[: ctx.config.segment.validation_volumes]:
            image, label = read_pair(pair.image, pair.label)
            surface = int(np.count_nonzero(label == SURFACE))
            if surface < least:
                log.warning("validation volume %s has %d surface voxels (fewer than %d) and is not used to validate", pair.id, surface, least)
                ctx.event("VALIDATION_EXCLUDED", "validation", {"id": pair.id, "surface_voxels": surface, "min_val_surface_voxels": least})
                continue
            state.validation.append((image, label))
            state.validation_pairs.append(pair)
    return state.validation


def validation_truths(ctx: "RunContext", state: "RunState") -> list[Truth]:
    """The validation volumes' labels prepared for scoring (:class:`nx46vx.metric.Truth`), built once per session.

    Every validation of the student and every point of the post-processing grid is
    scored against them.
    """
    if state.validation_truths is None:
        state.validation_truths = [Truth(label) for _, label in validation_volumes(ctx, state)]
    return state.validation_truths


def validation_probabilities(
    ctx: "RunContext", state: "RunState", name: str, predict: Callable[[str, np.ndarray], np.ndarray | None], *, keep: bool, fits: "Fits | None" = None
) -> tuple[list[np.ndarray | None] | None, float]:
    """``predict(id, image)`` on the validation volumes and its seconds per voxel (computed once per name).

    ``fits(seconds_per_voxel, voxels_left)`` is asked before each volume (as in
    :func:`~nx46vx.runner.training_data.teacher_maps`); at its first False the maps
    are None (incomplete, never kept) with the seconds per voxel measured so far.
    """
    cached = state.validation_probs.get(name) if keep else state.validation_probs.pop(name, None)
    if cached is not None:
        return cached
    volumes = validation_volumes(ctx, state)
    voxels_left = sum(image.size for image, _ in volumes)
    probs: list[np.ndarray | None] = []
    t0, voxels_done = ctx.governor.clock(), 0
    for pair, (image, _) in zip(state.validation_pairs, volumes):
        per_voxel = (ctx.governor.clock() - t0) / voxels_done if voxels_done else 0.0
        if fits is not None and not fits(per_voxel, voxels_left):
            return None, per_voxel
        probs.append(predict(pair.id, image))
        ctx.governor.account("validation_volume")
        voxels_done, voxels_left = voxels_done + image.size, voxels_left - image.size
    cached = (probs, (ctx.governor.clock() - t0) / max(1, voxels_done))
    if keep:
        state.validation_probs[name] = cached
    return cached


def search_probability(ctx: "RunContext", search: "CandidateSearch", k: int) -> Source:
    """Mean probability of the top ``k`` search candidates (k = 1: the best one)."""
    top = search.top_models(k)
    return lambda vol: probability(vol, top["thetas"], top["mean"], top["std"], ctx.config.features, device=ctx.device)


def unusable_ensemble(state: "RunState") -> str | None:
    """Why the search ensemble cannot teach or segment in this run (None: it can)."""
    if state.search is None:
        return "no search ran"
    if not state.search.evaluated:
        return "no search candidate has finished a fit"
    return None


def student_config(ctx: "RunContext", state: "RunState") -> distill.DistillConfig:
    """The student's concrete settings in this run: :func:`nx46vx.distill.resolve` on its device, given the training volumes.

    The ``ensemble`` teacher is left out while :func:`unusable_ensemble` says why (and with it the prior input):
    a search stopped before its first finished fit has no model to learn from.
    """
    config = ctx.config.distill
    if ENSEMBLE in config.teachers and unusable_ensemble(state):
        config = dataclasses.replace(config, teachers=tuple(t for t in config.teachers if t != ENSEMBLE))
    return distill.resolve(config, ctx.distill_device, train_volumes=len(state.train_pairs))


def probability_sources(ctx: "RunContext", state: "RunState") -> dict[str, Source]:
    """Learned probability maps available to segment with: search model, ensemble, student, and the blend of the last two."""
    out: dict[str, Source] = {}
    search = state.search
    if unusable_ensemble(state) is None:
        out[SEARCH_MODEL] = search_probability(ctx, search, 1)
        out[ENSEMBLE] = search_probability(ctx, search, ctx.config.distill.ensemble_k)
    if state.student is not None and state.student.step > 0:
        network = distill.student_network(state.student)
        seg = ctx.config.segment
        cfg = student_config(ctx, state)
        # the ensemble the student learnt to correct: the ensemble teacher's map
        prior = search_probability(ctx, search, cfg.ensemble_k) if cfg.teacher_input else None
        intensity = state.student.intensity

        def student(vol: np.ndarray, prior_map: np.ndarray | None = None) -> np.ndarray:
            if prior is not None and prior_map is None:
                prior_map = prior(vol)
            return sliding_window(vol, network, patch=distill.window(cfg), overlap=seg.overlap, flip_tta=seg.flip_tta, device=ctx.distill_device, batch=seg.window_batch,
                                  prior=prior_map, intensity=intensity, dtype=compute_dtype(cfg.precision, ctx.distill_device))

        out[STUDENT] = student
        if ENSEMBLE in out:
            ensemble = out[ENSEMBLE]

            def blended(vol: np.ndarray) -> np.ndarray:
                ensemble_map = ensemble(vol)  # the student's prior when it takes one: the same map, computed once
                return blend(student(vol, ensemble_map if prior is not None else None), ensemble_map)

            out[BLEND] = blended
    return out
