"""Phase 1: find the inputs, validate them, resume what a previous run left, and write the first submission.

Discovery reads names, sizes and a sampled hash per file — never whole training
files — so it takes seconds on the 26 GB training set. Right after it, the
intensity baseline's masks are written and ``submission.zip`` exists: every later
phase only replaces it with something better.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ...config import RunConfig
from ...discovery import TestVolume, TrainPair, discover
from ... import distill
from ...errors import DependencyError, DistillationNotExecuted, MemoryLimitError, ModelFolderError, Nx46Error, TestSetError, VolumeError, VolumeShapeError
from ...segment import ENSEMBLE, intensity_baseline, repair_points, tuning_points
from ...telemetry import ensure_memory
from ...volumes import SEGMENT_BYTES_PER_VOXEL, TRAIN_BYTES_PER_VOXEL, inspect_volume, read_volume, volume_key, volume_shape
from ..masks import mask_intact, publish_submission, write_mask
from .base import digest, plain
from ... import streams

if TYPE_CHECKING:
    from ..context import RunContext
    from ..state import RunState

log = logging.getLogger("nx46vx")


def split_train_val(pairs: Sequence[TrainPair], config: RunConfig) -> tuple[list[TrainPair], list[TrainPair], dict[str, Any]]:
    """Hold out whole scrolls for validation (a seeded grouped split); returns (train, val, how it was split).

    Volumes of one scroll are never split between training and validation: a model
    validated on volumes of a scroll it trained on looks better than it is, and every
    validation-driven choice would lean on that. Scrolls are taken in a seeded order,
    each one while the validation set stays within its target
    (``val_fraction`` of the volumes, at least ``min_val_volumes``); when none fits,
    the smallest scroll is held out. At least one scroll always trains. Without two
    scrolls (one scroll, or no ``scroll_id`` column) the split falls back to volumes,
    and says so. Fewer than two pairs → no validation (and no search).
    """
    ordered = sorted(pairs, key=lambda p: p.id)
    if len(ordered) < 2:
        return ordered, [], {"by": "none", "reason": "fewer than two training pairs"}
    n_val = min(len(ordered) - 1, max(config.data.min_val_volumes, int(round(config.data.val_fraction * len(ordered)))))
    scrolls: dict[str, list[TrainPair]] = {}
    for pair in ordered:
        scrolls.setdefault(pair.scroll_id, []).append(pair)
    if len(scrolls) < 2 or "" in scrolls:
        order = streams.generator(config.seed, streams.SPLIT).permutation(len(ordered))
        val_ids = {ordered[i].id for i in order[:n_val]}
        reason = "one scroll only" if len(scrolls) < 2 and "" not in scrolls else "no scroll_id for every volume"
        how: dict[str, Any] = {"by": "volume", "reason": reason}
    else:
        names = sorted(scrolls)
        held: list[str] = []
        count = 0
        for i in streams.generator(config.seed, streams.SPLIT).permutation(len(names)):
            size = len(scrolls[names[i]])
            if count + size <= n_val and len(held) + 1 < len(names):
                held.append(names[i])
                count += size
        if not held:
            held = [min(names, key=lambda name: (len(scrolls[name]), name))]
        val_ids = {p.id for name in held for p in scrolls[name]}
        how = {"by": "scroll", "val_scrolls": sorted(held), "train_scrolls": sorted(set(names) - set(held))}
    val = [p for p in ordered if p.id in val_ids]
    train = [p for p in ordered if p.id not in val_ids]
    return train, val, how


class DiscoveryPhase:
    """Inputs, split, resume, baseline submission.

    State: the baseline masks written so far (``{id: {"sha", "image"}}``: the mask's
    SHA-256 and the test image's content key, under a key of the baseline's settings),
    so a resumed run recomputes only the masks whose image or settings changed.
    """

    name = "discovery"

    def __init__(self) -> None:
        self.done = False
        self.data_key = ""
        self.baseline: dict[str, str] = {}
        self.baseline_key = ""

    def signature(self, config: RunConfig) -> dict[str, Any]:
        d = config.data
        return plain({
            "data": self.data_key,
            "split": {"seed": config.seed, "val_fraction": d.val_fraction, "min_val_volumes": d.min_val_volumes, "max_train_volumes": d.max_train_volumes, "include_deprecated": d.include_deprecated},
        })

    def state_dict(self) -> dict[str, Any]:
        return {"baseline_key": self.baseline_key, "baseline": dict(self.baseline)}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        if saved:
            self.baseline_key, self.baseline = str(saved["baseline_key"]), dict(saved["baseline"])

    def run(self, ctx: "RunContext", state: "RunState") -> None:
        with ctx.phase(self.name) as end:
            self._discover(ctx, state)
            link = ctx.checkpointer.choose([Path(p) for p in state.discovery.input_roots])
            ctx.open_journal(link, {
                "version": _version(),
                "profile": ctx.config.profile,
                "config": ctx.config.to_dict(),
                "device": str(ctx.device),
                "output": str(ctx.output),
                "previous_journal": str(ctx.previous_journal) if ctx.previous_journal else None,
            })
            resumed = ctx.checkpointer.resumed
            state.resumed_from = str(resumed.path) if resumed else None
            self._baseline_submission(ctx, state)
            check_models(ctx, state)
            self.done = True
            end.update(train=len(state.train_pairs), val=len(state.val_pairs), test=len(state.discovery.test))
        ctx.checkpointer.write("discovery_done")

    def _discover(self, ctx: "RunContext", state: "RunState") -> None:
        config = ctx.config
        found = discover(ctx.input_roots, include_deprecated=config.data.include_deprecated)
        state.discovery = found
        self._check_tests(ctx, state)  # headers and first/last pages now, not hours later
        pairs = self._checked_pairs(ctx, found.train)
        if config.data.max_train_volumes > 0:
            pairs = sorted(pairs, key=lambda p: p.id)[: config.data.max_train_volumes]
        state.train_pairs, state.val_pairs, split = split_train_val(pairs, config)
        if split["by"] == "volume":
            log.warning("validation volumes are drawn from scrolls that also train (%s): validation scores will be optimistic", split["reason"])
        state.volume_keys = {p.id: volume_key(p.image, p.label) for p in pairs}
        ctx.governor.n_test = len(found.test)
        ctx.governor.n_val = min(len(state.val_pairs), config.segment.validation_volumes)
        scored = sum(int(np.prod(volume_shape(p.image) or (0,))) for p in state.val_pairs[: ctx.governor.n_val])  # checked above
        ctx.governor.tuning_voxels = scored * tuning_points(config.segment)
        ctx.governor.repair_voxels = scored * repair_points(config.segment) + (state.test_voxels if config.segment.repair_tunnels else 0)
        ctx.governor.test_voxels = state.test_voxels
        manifest = [("train", p.id, state.volume_keys[p.id]) for p in state.train_pairs] + [("val", p.id, state.volume_keys[p.id]) for p in state.val_pairs]
        self.data_key = digest(sorted(manifest))
        ctx.event("DATASET_DISCOVERY", self.name, {
            "root": str(found.root),
            "input_roots": [str(p) for p in found.input_roots],
            "train_pairs": len(found.train),
            "train": len(state.train_pairs),
            "val": len(state.val_pairs),
            "test_ids": [t.id for t in found.test],
            "data_key": self.data_key,
            "split": dict(split, val_ids=[p.id for p in state.val_pairs]),
            "warnings": list(found.warnings),
            **found.inventory,
        })

    def _check_tests(self, ctx: "RunContext", state: "RunState") -> None:
        """Every test volume's header, length and first/last page; a bad one stops the run or gets an empty mask."""
        bad: list[tuple[TestVolume, Nx46Error]] = []
        for test in state.discovery.test:
            try:
                state.shapes[test.id] = inspect_volume(test.image)
                state.test_keys[test.id] = volume_key(test.image)
                ensure_memory(int(np.prod(state.shapes[test.id])) * SEGMENT_BYTES_PER_VOXEL, path=test.image, what=f"segmenting test volume {test.id}")
            except (VolumeError, MemoryLimitError) as err:
                state.shapes.pop(test.id, None)
                if ctx.config.data.on_bad_test == "error":
                    raise TestSetError(f"bad test volume {test.id}: {err.what}", path=err.path, expected=err.expected, found=err.found,
                                       hint='set data.on_bad_test = "empty" to submit an empty mask for it instead') from None
                bad.append((test, err))
        common = Counter(state.shapes.values()).most_common(1)
        for test, err in bad:
            vol_id = test.id
            shape = volume_shape(test.image)
            shape = tuple(shape) if shape is not None and len(shape) == 3 else (common[0][0] if common else None)
            if shape is None:
                raise TestSetError(f"bad test volume {vol_id}, and no shape to give its empty mask: {err.what}", path=err.path, expected=err.expected, found=err.found)
            state.shapes[vol_id] = shape
            state.rejected_tests[vol_id] = str(err)
            log.warning("test volume %s is unusable and gets an empty mask of shape %s: %s", vol_id, shape, err)
            ctx.event("INPUT_REJECTED", self.name, {"kind": "test", "id": vol_id, "file": err.path, "what": err.what, "expected": str(err.expected),
                                                    "found": str(err.found), "action": "empty mask", "shape": list(shape)})
        state.test_voxels = sum(int(np.prod(shape)) for vol_id, shape in state.shapes.items() if vol_id not in state.rejected_tests)

    def _checked_pairs(self, ctx: "RunContext", pairs: Sequence[TrainPair]) -> list[TrainPair]:
        """The training pairs whose image and label pass :func:`inspect_volume` (same shape); the others are journaled and skipped."""
        kept = []
        for pair in pairs:
            try:
                shape = inspect_volume(pair.image)
                label_shape = inspect_volume(pair.label, label=True)
                if label_shape != shape:
                    raise VolumeShapeError("label shape differs from its image", path=pair.label, expected=f"shape {shape}", found=f"shape {label_shape}")
                ensure_memory(int(np.prod(shape)) * TRAIN_BYTES_PER_VOXEL, path=pair.image, what=f"training pair {pair.id}")
            except (VolumeError, MemoryLimitError) as err:
                log.warning("training pair %s is skipped: %s", pair.id, err)
                ctx.event("INPUT_REJECTED", self.name, {"kind": "train", "id": pair.id, "file": err.path, "what": err.what, "expected": str(err.expected),
                                                        "found": str(err.found), "action": "skipped"})
                continue
            kept.append(pair)
        return kept

    def _baseline_submission(self, ctx: "RunContext", state: "RunState") -> None:
        """The intensity baseline on every test volume, then ``submission.zip`` from it."""
        seg = ctx.config.segment
        key = f"baseline-{digest({'sigma': seg.baseline_sigma, 'min_component_voxels': seg.min_component_voxels, 'version': 1})[:8]}"
        if key != self.baseline_key:
            self.baseline_key, self.baseline = key, {}
        folder = ctx.output / "masks" / key
        for test in state.discovery.test:
            path = folder / f"{test.id}.tif"
            saved = self.baseline.get(test.id)
            kept = isinstance(saved, dict) and saved["image"] == state.test_keys.get(test.id) and mask_intact(path, saved["sha"])
            if test.id in state.rejected_tests:
                self.baseline[test.id] = {"sha": write_mask(folder, test.id, np.zeros(state.shapes[test.id], np.uint8)), "image": None}
            elif not kept:
                mask = intensity_baseline(read_volume(test.image), seg)
                self.baseline[test.id] = {"sha": write_mask(folder, test.id, mask), "image": state.test_keys[test.id]}
                ctx.governor.account("baseline_volume")
            state.baseline_masks[test.id] = path
        state.masks = dict(state.baseline_masks)
        state.segmenter = "intensity_baseline"
        state.submission = publish_submission(ctx, state.masks, state.shapes, segmenter=state.segmenter, phase=self.name)


def check_models(ctx: "RunContext", state: "RunState") -> None:
    """Every teacher the student will load and the model it starts from (``distill.init``, its network against the
    student's settings too), checked now (``MODEL_CHECK``): a bad model folder is found at discovery, with the baseline
    submission already written, not at distillation after hours of search. Nothing from a model runs."""
    cfg = ctx.config.distill
    if not cfg.enabled:
        return
    roots = [Path(p) for p in state.discovery.input_roots]
    checks = [("teacher", spec, lambda spec=spec: distill.check_teacher(spec, roots=roots)) for spec in cfg.teachers if spec != ENSEMBLE]
    if cfg.init:
        checks.append(("init", cfg.init, lambda: distill.check_init(cfg, roots=roots, device=ctx.distill_device)))
    for role, spec, check in checks:
        try:
            sha = check()
        except (DistillationNotExecuted, ModelFolderError, DependencyError) as exc:
            ctx.event("MODEL_CHECK", DiscoveryPhase.name, {"role": role, "spec": spec, "ok": False, "error": str(exc)})
            raise
        ctx.event("MODEL_CHECK", DiscoveryPhase.name, {"role": role, "spec": spec, "ok": True, "sha256": sha})


def _version() -> str:
    from ... import __version__

    return __version__
