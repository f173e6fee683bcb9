"""Phase 5: load every teacher, train the student step by step under the governor, checkpoint it like the search.

The student's state is kept across sessions only while its teachers are the same:
the ensemble teacher is the search's top candidates, so a search that advanced in a
later session restarts the student (``DISTILLATION_RESET``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import torch

from ... import distill
from ...config import RunConfig
from ...errors import DependencyError, ModelFolderError
from ...metric import Truth, score_volume
from ...patches import make_batch
from ...segment import BLEND, ENSEMBLE, STUDENT, compute_dtype, plain_params, postprocess, sliding_window, window_count
from ...student import architecture
from ... import betti, topology
from ..sources import search_probability, student_config, unusable_ensemble, validation_truths, validation_volumes
from ..schedule import MapsBudget, StepCosts, extend_schedule, lay_out_schedule, price_inference, refit_schedule, revise_schedule, seconds_per_window
from ..training_data import Prefetcher, VolumeCache, agreement_probe, student_maps
from .base import digest, plain

if TYPE_CHECKING:
    from ...governor import Governor
    from ...nnunet import NnUNetModel
    from ...parallel import DataParallelTrainer
    from ..context import RunContext
    from ..state import RunState

log = logging.getLogger("nx46vx")
#: A validation volume for the student: image (z, y, x) uint8, its labels (scored at every validation), prior float32 or None.
Validation = tuple[np.ndarray, Truth, "np.ndarray | None"]


def ensemble_prior(ctx: "RunContext", state: "RunState") -> dict[str, Any]:
    """The search ensemble the student's prior input comes from, with the feature settings: what :func:`nx46vx.predict` needs to rebuild it."""
    top = state.search.top_models(ctx.config.distill.ensemble_k)
    return {"thetas": top["thetas"].clone(), "mean": torch.as_tensor(np.asarray(top["mean"], np.float32)), "std": torch.as_tensor(np.asarray(top["std"], np.float32)),
            "features": plain(dataclasses.asdict(ctx.config.features))}


def _finite(seconds: float) -> float | None:
    return None if seconds == float("inf") else round(seconds, 3)


def _validation_windows(ctx: "RunContext", cfg: Any, val: list[Validation]) -> int:
    """The student's sliding windows over the validation volumes (no flips): what a validation's inference is priced per."""
    return sum(window_count(image.shape, patch=distill.window(cfg), overlap=ctx.config.segment.overlap, flip_tta=False) for image, _, _ in val)


def data_parallel_trainer(ctx: "RunContext", student: distill.DistillState, cfg: Any) -> "DataParallelTrainer | None":
    """Helper processes for data-parallel training when more than one process is set or GPU visible (``DISTILLATION_PARALLEL``)."""
    from ...parallel import DataParallelTrainer, world_size

    world = world_size(cfg.processes, batch=cfg.batch, device=ctx.distill_device)
    if world == 1:
        return None
    t0 = ctx.governor.clock()
    trainer = DataParallelTrainer(student, cfg, world=world, device=ctx.distill_device, folder=ctx.output / "cache")
    ctx.event("DISTILLATION_PARALLEL", DistillationPhase.name, {"processes": world, "backend": trainer.backend,
                                                                "patches_per_process": cfg.batch // world, "start_s": round(ctx.governor.clock() - t0, 3)})
    return trainer


def initial_model(ctx: "RunContext", state: "RunState", cfg: distill.DistillConfig) -> "NnUNetModel | None":
    """The nnU-Net model ``distill.init`` names, loaded (``DISTILLATION_INIT``: its fold, digest and normalisation); None without one."""
    if not cfg.init:
        return None
    t0 = ctx.governor.clock()
    init = distill.load_init(cfg.init, roots=[Path(p) for p in state.discovery.input_roots])
    ctx.event("DISTILLATION_INIT", DistillationPhase.name, {"init": cfg.init, "folder": str(init.folder), "fold": init.fold_names[0], "sha256": init.sha256,
                                                           "normalization": init.normalization, "seconds": round(ctx.governor.clock() - t0, 4)})
    return init


class DistillationPhase:
    """Teachers → student. State: the student, its optimiser and schedule, its step, and the teachers it learnt from."""

    name = "distillation"

    def __init__(self) -> None:
        self.done = False
        self.student: distill.DistillState | None = None
        self.teacher_key = ""
        self.network: dict[str, Any] = {}  # the resolved student settings, so a checkpoint alone rebuilds the network (predict)
        self.prior: dict[str, Any] | None = None  # the ensemble that makes the student's prior input (predict rebuilds it)
        self.target_ids: list[str] = []  # the training volumes the teachers' maps covered: replayed with the student
        self._test_voxels = 0
        self._test_windows = 0  # the student's windows over the test volumes (flips included)
        self._window_s = 0.0  # the student's seconds per window (its prior's cost apart): priced, then as last measured
        self._prior_seconds_per_voxel = 0.0
        self._blend_extra_s_per_voxel = 0.0  # the ensemble's pass the blend adds to the student's, when the blend may segment
        self._validated_step: int | None = None  # the step whose weights this session validated last
        self._best_maps: list[np.ndarray] | None = None  # the kept weights' validation maps
        self._saved: dict[str, Any] | None = None

    def signature(self, config: RunConfig) -> dict[str, Any]:
        from ...features import resolve_device

        resolved = distill.resolve(config.distill, resolve_device(config.distill.device))  # a CPU student is not a GPU one
        settings = {k: v for k, v in dataclasses.asdict(resolved).items() if k not in ("checkpoint_every", "device", "workers", "processes")}
        # the validation volumes pick the best weights: which of them count is part of what the student is; the
        # network's description (nnU-Net plans form) changes with the library that builds it, and so must the student
        return plain(dict(settings, seed=config.seed, device_kind=resolve_device(config.distill.device).type,
                          min_val_surface_voxels=config.data.min_val_surface_voxels,
                          network=architecture(resolved.arch, width=resolved.width, depth=resolved.depth, blocks=resolved.blocks)))

    def state_dict(self) -> dict[str, Any] | None:
        if self.student is None:
            return self._saved
        return {"student": distill.state_dict(self.student), "teacher_key": self.teacher_key, "done": self.done, "network": self.network, "prior": self.prior,
                "target_ids": self.target_ids}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        self._saved = saved
        self.done = bool(saved) and bool(saved["done"])

    def run(self, ctx: "RunContext", state: "RunState") -> None:
        cfg = ctx.config.distill
        with ctx.phase(self.name) as end:
            if not state.trainable or not cfg.enabled:
                reason = "distill.enabled is false" if state.trainable else "fewer than two training volumes"
                ctx.event("DISTILLATION_SKIPPED", self.name, {"reason": reason})
                ctx.progress.set(self.name, 1.0)
                self.done = True
                return
            if self.done and self._saved is not None and "search" not in state.advanced:
                student = distill.init_state(student_config(ctx, state), seed=ctx.config.seed, device=ctx.distill_device)
                distill.load_state_dict(student, self._saved["student"])
                self.student, state.student, self.teacher_key = student, student, str(self._saved["teacher_key"])
                self.network, self.prior = dict(self._saved["network"]), self._saved.get("prior")
                ctx.progress.set(self.name, 1.0)
                end.update(kept=True, steps=student.step)
                return
            if ctx.governor.phase_should_stop(self.name):
                ctx.event("DISTILLATION_SKIPPED", self.name, {"reason": f"stop requested ({ctx.governor.stop_reason or 'phase_share'})"})
                state.unfinished.append(self.name)
                return
            end.update(self._train(ctx, state))

    def _teachers(self, ctx: "RunContext", state: "RunState") -> list[distill.Teacher]:
        """Load every teacher :func:`student_config` keeps (``DISTILLATION_TEACHER_LOAD_*``); any failure stops the run."""
        cfg = student_config(ctx, state)
        search, usable = state.search, unusable_ensemble(state) is None
        ensemble = search_probability(ctx, search, cfg.ensemble_k) if usable else None
        ensemble_digest = hashlib.sha256(search.top_models(cfg.ensemble_k)["thetas"].numpy().tobytes()).hexdigest() if usable else ""
        roots = [Path(p) for p in state.discovery.input_roots]
        teachers = []
        for spec in cfg.teachers:
            ctx.event("DISTILLATION_TEACHER_LOAD_BEGIN", self.name, {"teacher": spec})
            t0 = ctx.governor.clock()
            try:
                teacher = distill.load_teacher(spec, roots=roots, ensemble=ensemble, ensemble_digest=ensemble_digest, patch=cfg.patch, device=ctx.distill_device,
                                                window_batch=ctx.config.segment.window_batch, flip_tta=ctx.config.segment.flip_tta)
            except (distill.DistillationNotExecuted, ModelFolderError, DependencyError) as exc:
                ctx.event("DISTILLATION_TEACHER_LOAD_END", self.name, {"teacher": spec, "ok": False, "error": str(exc)})
                raise
            teachers.append(teacher)
            ctx.event("DISTILLATION_TEACHER_LOAD_END", self.name, {"teacher": spec, "ok": True, "sha256": teacher.sha256, "seconds": round(ctx.governor.clock() - t0, 4)})
        return teachers

    def _student(self, ctx: "RunContext", cfg: distill.DistillConfig, teachers: list[distill.Teacher], init: "NnUNetModel | None") -> distill.DistillState:
        """A fresh student with the resolved settings ``cfg`` (from ``init``'s weights when given), or the saved one when it
        learnt from these same teachers and started from this same model."""
        student = distill.init_state(cfg, seed=ctx.config.seed, device=ctx.distill_device, init=init)
        key = digest([t.sha256 for t in teachers] + ([f"init:{init.sha256}"] if init is not None else []))
        if self._saved is not None:
            if self._saved["teacher_key"] == key:
                distill.load_state_dict(student, self._saved["student"])
            else:
                self.done = False
                ctx.event("DISTILLATION_RESET", self.name, {"reason": "the teachers or the model the student starts from changed since the saved student",
                                                            "saved_step": int(self._saved["student"]["step"])})
        self.teacher_key, self.student = key, student
        self.network = plain(dataclasses.asdict(cfg))
        return student

    def _train(self, ctx: "RunContext", state: "RunState") -> dict[str, Any]:
        cfg = student_config(ctx, state)
        dtype = compute_dtype(cfg.precision, ctx.distill_device)
        skipped = unusable_ensemble(state) if ENSEMBLE in ctx.config.distill.teachers else None
        if skipped:
            log.warning("the ensemble teacher is skipped: %s", skipped)
        ctx.event("DISTILLATION_START", self.name, {"teachers": list(cfg.teachers), "init": cfg.init or None, "steps": cfg.steps, "arch": cfg.arch, "width": cfg.width, "depth": cfg.depth,
                                                   "patch": cfg.patch, "batch": cfg.batch, "train_volumes": len(state.train_pairs), "device": str(ctx.distill_device),
                                                   "compute_dtype": str(dtype).removeprefix("torch."),
                                                   "teacher_input": cfg.teacher_input, "teacher_input_off": distill.prior_off_reason(ctx.config.distill, len(state.train_pairs)) or skipped,
                                                   "teachers_skipped": {ENSEMBLE: skipped} if skipped else {}})
        teachers = self._teachers(ctx, state)
        init = initial_model(ctx, state, cfg)
        student = state.student = self._student(ctx, cfg, teachers, init)
        val = validation_volumes(ctx, state)
        validation_s = self._reserve_inference(ctx, state, student, cfg, val)
        # a restored student replays the training volumes its teachers' maps covered; a fresh one decides within the time granted
        replay = self._saved.get("target_ids") if self._saved is not None and self._saved["teacher_key"] == self.teacher_key else None
        budget = None if replay is not None else MapsBudget(ctx.governor, self.name, reserved_s=validation_s)
        if budget is not None and not budget.partial(0.0, 0):
            return self._skip_for_time(ctx, state, "no validation and step fit the phase's time left", predicted_validation_s=round(validation_s, 3))
        maps = student_maps(ctx, state, teachers, cfg, budget=budget, replay=replay)
        self._prior_seconds_per_voxel = maps.ensemble_seconds_per_voxel if cfg.teacher_input else 0.0  # segmenting with the student computes the prior too
        # the blend segments with the student and the ensemble: the ensemble's pass on top, unless it is the prior already
        blends = ctx.config.segment.method in ("auto", "blend") and unusable_ensemble(state) is None and not cfg.teacher_input
        self._blend_extra_s_per_voxel = maps.ensemble_seconds_per_voxel if blends else 0.0
        self._measured_test_cost(ctx.governor)
        if maps.cut is not None:
            return self._skip_for_time(ctx, state, maps.cut)
        self.target_ids, targets, priors, coverage, pairs = maps.target_ids, maps.targets, maps.priors, maps.coverage, maps.pairs
        volumes = VolumeCache(pairs, state.volume_keys, ctx.output / "cache" / "foreground", foreground_cap=cfg.foreground_samples, seed=ctx.config.seed,
                              capacity=cfg.cache_volumes, targets=targets, priors=priors if cfg.teacher_input else None, intensity=student.intensity,
                              admit=ctx.quota.allow, on_read=ctx.reporter.count_volume)
        val_priors = state.teacher_val_probs.get(ENSEMBLE) if cfg.teacher_input else None
        self.prior = ensemble_prior(ctx, state) if cfg.teacher_input else None
        probe = agreement_probe(ctx, state, val, teachers, cfg, val_priors, intensity=student.intensity)
        t0 = ctx.governor.clock()
        before = distill.agreement(student, probe, dtype=dtype) if probe is not None else None
        # the probe runs again after the last step: a kaggle-train run's took ~1.2 s after its deadline, and the blend missed its time by 0.2 s
        probe_s = ctx.governor.clock() - t0 if probe is not None else 0.0
        # a student fed the prior is validated only where the prior exists (the ensemble covers every volume it is given)
        validation = [] if cfg.teacher_input and not val_priors else [(image, truth, val_priors[i] if val_priors else None) for i, ((image, _), truth) in enumerate(zip(val[: cfg.val_volumes], validation_truths(ctx, state)))]
        self._best_maps = None
        ctx.kernels_ready(self.name)  # the steps are timed (they lay out the schedule) and validated on the metric: not beside the child
        stopped = self._steps(ctx, state, student, volumes, validation, cfg, validation_s=validation_s if validation else 0.0, closing_s=probe_s)
        # the latest price, per window over the test volumes: it does not depend on the weights
        state.test_prices[STUDENT] = self._test_s_per_voxel + self._prior_seconds_per_voxel
        if self._best_maps is not None and len(validation) == len(val) and not ctx.config.segment.flip_tta:
            state.validation_probs[STUDENT] = (self._best_maps, state.test_prices[STUDENT])  # the segmenter choice scores the same maps, not computed twice
        self._best_maps = None
        if student.step == 0 and stopped is None:
            raise distill.DistillationNotExecuted("no optimiser step ran", expected="at least one step", found="0 steps", hint="give the run more time (budget.total_s) or set distill.enabled = false")
        after = distill.agreement(student, probe, dtype=dtype) if probe is not None else None
        best = student.best or {}
        ctx.event("DISTILLATION_END", self.name, {"steps": student.step, "schedule_steps": student.schedule_steps, "stopped": stopped, "teacher_coverage_percent": coverage, "train_volumes": len(pairs),
                                                 "agreement_before": before, "agreement_after": after, "best_score": best.get("score"), "best_step": best.get("step"), "volume_reads": volumes.reads,
                                                 "agreement_probe_s": round(probe_s, 3), "test_s_per_voxel": state.test_prices[STUDENT]})
        return {"steps": student.step}

    def _reserve_inference(self, ctx: "RunContext", state: "RunState", student: distill.DistillState, cfg: Any, val: list[tuple[np.ndarray, np.ndarray]]) -> float:
        """Price the student's inference before any step is granted (:func:`~nx46vx.runner.schedule.price_inference`,
        ``DISTILLATION_INFERENCE``): its test volumes join the segmentation reserve now, so the training deadline leaves
        time to use what is trained. Returns one validation's predicted seconds (priced before the first step, not
        after the first one it overran)."""
        governor = ctx.governor
        price = price_inference(ctx, state, student, cfg, [image.shape for image, _ in val[: cfg.val_volumes]])
        self._test_voxels, self._test_windows, self._window_s = state.test_voxels, price.test_windows, price.window_s
        if len(val[: cfg.val_volumes]) == len(val) and not ctx.config.segment.flip_tta:
            governor.n_val = 0  # the choice tunes on the student's maps from its last validation: none is made again
        governor.measured_volume_cost(price.test_s_per_voxel, state.test_voxels, source=STUDENT)
        ctx.event("DISTILLATION_INFERENCE", self.name, {"seconds_per_window": round(price.window_s, 6), "predicted_test_s": round(price.test_s_per_voxel * state.test_voxels, 3),
                                                       "predicted_validation_s": round(price.validation_s, 3), "reserve_s": round(governor.reserve(), 3),
                                                       "phase_time_left_s": _finite(governor.phase_time_left(self.name))})
        return price.validation_s

    @property
    def _test_s_per_voxel(self) -> float:
        """The student's test inference per voxel (its prior's cost apart; flips counted in its windows)."""
        return self._window_s * self._test_windows / max(1, self._test_voxels)

    def _measured_test_cost(self, governor: "Governor") -> None:
        """The student's test volumes at its latest measured cost join the reserve, and so do the blend's when it may segment
        (``BLEND``: a blend that wins on validation but no longer fits is as lost as an excluded student)."""
        student_s = self._test_s_per_voxel + self._prior_seconds_per_voxel
        governor.measured_volume_cost(student_s, self._test_voxels, source=STUDENT)
        if self._blend_extra_s_per_voxel > 0:
            governor.measured_volume_cost(student_s + self._blend_extra_s_per_voxel, self._test_voxels, source=BLEND)

    def _skip_for_time(self, ctx: "RunContext", state: "RunState", why: str, **data: Any) -> dict[str, Any]:
        """Stop before training: what was planned did not fit (``DISTILLATION_SKIPPED``); a restored student stays saved as it was."""
        log.warning("distillation skipped for time: %s", why)
        ctx.event("DISTILLATION_SKIPPED", self.name, {"reason": f"time: {why}", **data, **ctx.governor.state()})
        state.unfinished.append(self.name)
        self.student = state.student = None
        return {"skipped": why}

    def _measure(self, ctx: "RunContext", state: "RunState", student: distill.DistillState, val: list[Validation], cfg: Any, costs: StepCosts) -> None:
        """A checkpoint, the student's window timed again (:meth:`_retime_window`), and a post-processing grid point timed on the ensemble
        teacher's validation maps, now: their seconds size the schedule (``costs``) and the tuning reserve (the metric's cost per voxel,
        until then the configured guess, also reprices a validation; with ``segment.repair_tunnels`` the tunnel repair's, on the same
        masks, which the test volumes pay too)."""
        self._checkpoint(ctx, student, costs)
        if val:
            self._retime_window(ctx, student, val, cfg, costs)
        maps, governor, seg = state.teacher_val_probs.get(ENSEMBLE), ctx.governor, ctx.config.segment
        truths = validation_truths(ctx, state) if maps else []
        if not maps or len(maps) != len(truths):
            return
        voxels = max(1, sum(prob.size for prob in maps))
        betti.compile_kernels()  # untimed: the price is the metric's work
        before, t0 = governor.score_s_per_voxel, governor.clock()
        masks = [postprocess(prob, plain_params(seg), seg)[0] for prob in maps]
        governor.measured_cleanup_cost((governor.clock() - t0) / voxels)
        for mask, truth in zip(masks, truths):
            score_volume(mask, truth)
        governor.measured_score_cost((governor.clock() - t0) / voxels)
        costs.validation = max(0.0, costs.validation + (governor.score_s_per_voxel - before) * sum(image.size for image, _, _ in val))
        if seg.repair_tunnels:
            topology.compile_kernels()  # untimed, as the metric's
            t0 = governor.clock()
            for prob, mask in zip(maps, masks):
                topology.repair_tunnels(prob, mask, max_film=seg.tunnel_film_voxels)
            governor.measured_repair_cost((governor.clock() - t0) / voxels)

    def _retime_window(self, ctx: "RunContext", student: distill.DistillState, val: list[Validation], cfg: Any, costs: StepCosts) -> None:
        """Time the student's window once more before the schedule is laid out; a lower price than the one holding replaces it, in
        the test volumes' reserve and in a validation's price (``DISTILLATION_INFERENCE_RETIMED``).

        One timing before any step prices the reserve the schedule is laid out on, and with a
        single validation planned (at its end) nothing measures it again in time: a demo run
        priced the window at 1.57 s (its validation and test volumes then took ~1.1 s a window),
        and its training ended 17 s before a deadline the validation had moved out. The lower of
        two timings holds (a slow spell only adds); every validation measures the inference anew.
        """
        window_s = seconds_per_window(ctx, student, cfg, warm_up=False)  # the first price ran it already
        held_s = self._window_s
        if window_s >= held_s:
            return
        windows = _validation_windows(ctx, cfg, val)
        costs.validation = max(0.0, costs.validation - (held_s - window_s) * windows)
        self._window_s = window_s
        self._measured_test_cost(ctx.governor)
        ctx.event("DISTILLATION_INFERENCE_RETIMED", self.name, {"seconds_per_window": round(window_s, 6), "held_seconds_per_window": round(held_s, 6),
                                                               "predicted_validation_s": round(costs.validation, 3), "reserve_s": round(ctx.governor.reserve(), 3)})

    def _steps(self, ctx: "RunContext", state: "RunState", student: distill.DistillState, volumes: VolumeCache, val: list[Validation], cfg: Any, *,
               validation_s: float, closing_s: float) -> str | None:
        """Optimiser steps until the schedule ends or the governor stops them; returns the stop reason (None when finished).

        ``validation_s`` prices a validation until one is measured; ``closing_s`` what runs after the last step besides it."""
        governor = ctx.governor
        make = lambda step: make_batch(volumes, len(volumes), step, seed=ctx.config.seed, batch=cfg.batch, patch=cfg.patch,  # noqa: E731
                                       positive_fraction=cfg.positive_fraction, augmentations=cfg.augment, skeleton=cfg.skeleton_weight > 0, prior=cfg.teacher_input)
        batches = Prefetcher(make, workers=cfg.workers)
        from tqdm.auto import tqdm

        bar = tqdm(total=student.schedule_steps, initial=student.step, desc="distillation", unit="step", disable=None, leave=False)
        if student.step == 0 and student.best is None and val:
            if cfg.teacher_input and all(prior is not None for _, _, prior in val):
                self._validate(ctx, student, val, cfg, as_prior=True)
            elif cfg.init:  # the untrained student is the nnU-Net model: fine-tuning keeps only weights that beat it
                self._validate(ctx, student, val, cfg)
        stopped, costs = None, StepCosts(governor.clock(), validation=validation_s, closing=closing_s)
        self._validated_step = None
        trainer = data_parallel_trainer(ctx, student, cfg)

        def validate() -> None:
            batches.settle()  # it times the inference and the metric that size the reserve: not beside batches being made
            self._validate(ctx, student, val, cfg, costs=costs)

        def measure() -> None:
            batches.settle()
            self._measure(ctx, state, student, val, cfg, costs)

        try:
            while student.schedule_steps is None or student.step < student.schedule_steps:
                if student.schedule_steps is None:
                    lay_out_schedule(ctx, self.name, student, cfg, costs, measure=measure)
                    bar.total = student.schedule_steps
                    if student.schedule_steps is not None and student.step >= student.schedule_steps:
                        break
                # a step is taken only when a validation still fits after it: whenever the loop stops, the weights it
                # trained last are scored (segmentation uses the best validated ones)
                need = costs.step_s(governor.clock()) + costs.checkpoint + (costs.validation if val else 0.0) + costs.closing
                if governor.phase_should_stop(self.name) or governor.elapsed() + need > governor.phase_deadline(self.name):
                    stopped = governor.stop_reason or "phase_share"
                    # not after a signal: that stop is immediate
                    if val and student.step > 0 and self._validated_step != student.step and governor.stop_reason is None \
                            and governor.elapsed() + costs.validation <= governor.phase_deadline(self.name):
                        validate()
                        # it re-measured the inference and the metric: a reserve grown by a slow spell may shrink and free steps again
                        if governor.stop_reason is None and refit_schedule(ctx, self.name, student, cfg, costs):
                            stopped, bar.total = None, student.schedule_steps
                            self._checkpoint(ctx, student, costs)  # the decision is stored with the step it was made after
                            continue
                    ctx.event("PRETIMEOUT_FLUSH", self.name, {"distill_step": student.step, "reason": stopped, **governor.state()})
                    state.unfinished.append(self.name)
                    ctx.checkpointer.write("pretimeout_flush")
                    break
                started = governor.clock()
                self._one_step(ctx, state, student, batches.get(student.step), cfg, trainer)
                costs.steps += 1
                costs.durations.append(governor.clock() - started)
                bar.update(1)
                revised = revise_schedule(ctx, self.name, student, cfg, costs)  # a decision: stored by the checkpoint below
                finished = student.schedule_steps is not None and student.step >= student.schedule_steps
                if val and distill.validates_after(student, student.step, default_every=cfg.val_every):
                    validate()
                    # the validation re-measured the student's inference and the metric: the reserve may have shrunk
                    revised = extend_schedule(ctx, self.name, student, cfg, costs) or revised
                if revised:
                    bar.total = student.schedule_steps
                self.done = finished
                if revised or student.step % cfg.checkpoint_every == 0 or finished:
                    self._checkpoint(ctx, student, costs)
                ctx.reporter.report()
        finally:
            if trainer is not None:
                trainer.close()
            batches.close()
            bar.close()
        return stopped

    def _checkpoint(self, ctx: "RunContext", student: distill.DistillState, costs: StepCosts) -> None:
        """Write a checkpoint (``DISTILLATION_CHECKPOINT_WRITTEN``) and remember what it cost."""
        t0 = ctx.governor.clock()
        ctx.checkpointer.write("distillation_milestone")
        ctx.event("DISTILLATION_CHECKPOINT_WRITTEN", self.name, {"step": student.step})
        costs.checkpoint = ctx.governor.clock() - t0
        costs.extra += costs.checkpoint

    def _one_step(
        self, ctx: "RunContext", state: "RunState", student: distill.DistillState, batch: dict[str, torch.Tensor], cfg: Any, trainer: "DataParallelTrainer | None"
    ) -> None:
        ctx.event("DISTILLATION_BATCH_BEGIN", self.name, {"step": student.step + 1, "patches": int(batch["image"].shape[0]), "covered": int(batch["covered"].sum())})
        terms = trainer.step(student, batch) if trainer is not None else distill.train_step(student, batch, cfg)
        ctx.governor.account("distill_step")
        state.advanced.add(self.name)
        losses = {k: terms[k] for k in ("total", "label", "dice", "bce", "teacher", "skeleton") if k in terms}
        ctx.event("DISTILLATION_LOSS_STEP", self.name, {"step": student.step, **losses, "teacher_weight": terms["teacher_weight"]})
        ctx.event("DISTILLATION_STUDENT_UPDATE", self.name, {"step": student.step, "lr": terms["lr"], "grad_norm": terms["grad_norm"]})
        ctx.event("DISTILLATION_BATCH_END", self.name, {"step": student.step})
        ctx.progress.set(self.name, student.step / max(1, student.schedule_steps or cfg.max_steps))

    def _validate(self, ctx: "RunContext", student: distill.DistillState, val: list[Validation], cfg: Any, *, as_prior: bool = False, costs: StepCosts | None = None) -> None:
        """Score the current weights by the competition metric on the validation volumes; keep them as :func:`~nx46vx.distill.keep_if_best` decides.

        The inference time measured here sizes the segmentation reserve (the student is the dearest segmenter);
        the kept weights' maps are kept for the segmenter choice.
        ``as_prior``: the untrained student of ``distill.teacher_input`` (zero heads) predicts its prior, so the
        prior maps are scored instead of running the network (equal up to float rounding in the blend): the
        first best is the ensemble itself, and later weights are kept only when they beat it.
        """
        seg, governor = ctx.config.segment, ctx.governor
        network = student.network.eval()
        params, dtype = plain_params(seg), compute_dtype(cfg.precision, ctx.distill_device)
        scores, probs, inference_s, cleanup_s, scoring_s = [], [], 0.0, 0.0, 0.0
        betti.compile_kernels()  # a first validation would otherwise price the metric by its compilation
        t0 = governor.clock()
        for image, label, prior in val:
            started = governor.clock()
            probs.append(prior if as_prior else sliding_window(image, network, patch=distill.window(cfg), overlap=seg.overlap, device=ctx.distill_device,
                                                                 batch=seg.window_batch, prior=prior, intensity=student.intensity,
                                                                 dtype=dtype))
            inference_s += governor.clock() - started
            started = governor.clock()  # a post-processing grid point costs the clean-up and the metric: what the tuning reserve is sized by
            mask = postprocess(probs[-1], params, seg)[0]
            cleanup_s += governor.clock() - started  # what a test mask pays past its inference
            scores.append(score_volume(mask, label).score)
            scoring_s += governor.clock() - started
        governor.account("distill_validation")
        voxels = max(1, sum(image.size for image, _, _ in val))
        governor.measured_score_cost(scoring_s / voxels)
        governor.measured_cleanup_cost(cleanup_s / voxels)
        if not as_prior:
            # a window costs the same however much of it a volume fills (an 80³ volume is one 96³ window): priced per window
            self._window_s = inference_s / max(1, _validation_windows(ctx, cfg, val))
            self._measured_test_cost(governor)
        if costs is not None:
            costs.validation = governor.clock() - t0
            costs.extra += costs.validation
        score = float(np.mean(scores))
        improved, kept = distill.keep_if_best(student, score)
        if not as_prior:
            self._validated_step = student.step
        if kept:
            self._best_maps = probs
        ctx.event("DISTILLATION_VALIDATION", self.name, {"step": student.step, "score": score, "improved": improved, "kept": kept, "best_score": student.best["score"], "best_step": student.best["step"],
                                                        "scored": "prior" if as_prior else "network"})
