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
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ... import distill
from ...atomic import load_arrays_checked, save_arrays_checked
from ...config import RunConfig
from ...discovery import TrainPair
from ...segment import normalised
from ...volumes import read_pair
from ..sources import search_probability, validation_probabilities, validation_volumes
from .base import digest, plain

if TYPE_CHECKING:
    from ..context import RunContext
    from ..state import RunState

log = logging.getLogger("nx46vx")


class DistillationPhase:
    """Teachers → student. State: the student, its optimiser and schedule, its step, and the teachers it learnt from."""

    name = "distillation"

    def __init__(self) -> None:
        self.done = False
        self.student: distill.DistillState | None = None
        self.teacher_key = ""
        self._saved: dict[str, Any] | None = None

    def signature(self, config: RunConfig) -> dict[str, Any]:
        settings = {k: v for k, v in dataclasses.asdict(config.distill).items() if k not in ("checkpoint_every", "device")}
        return plain(dict(settings, seed=config.seed))

    def state_dict(self) -> dict[str, Any] | None:
        if self.student is None:
            return self._saved
        return {"student": distill.state_dict(self.student), "teacher_key": self.teacher_key, "done": self.done}

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
                student = distill.init_state(cfg, seed=ctx.config.seed, device=ctx.distill_device)
                distill.load_state_dict(student, self._saved["student"])
                self.student, state.student, self.teacher_key = student, student, str(self._saved["teacher_key"])
                ctx.progress.set(self.name, 1.0)
                end.update(kept=True, steps=student.step)
                return
            if ctx.governor.phase_should_stop(self.name):
                ctx.event("DISTILLATION_SKIPPED", self.name, {"reason": f"stop requested ({ctx.governor.stop_reason or 'phase_share'})"})
                state.unfinished.append(self.name)
                return
            end.update(self._train(ctx, state))

    def _teachers(self, ctx: "RunContext", state: "RunState") -> list[distill.Teacher]:
        """Load every listed teacher (``DISTILLATION_TEACHER_LOAD_*``); any failure stops the run."""
        cfg = ctx.config.distill
        search = state.search
        ensemble = search_probability(ctx, search, cfg.ensemble_k) if search is not None else None
        ensemble_digest = hashlib.sha256(search.top_models(cfg.ensemble_k)["thetas"].numpy().tobytes()).hexdigest() if search else ""
        roots = [Path(p) for p in state.discovery.input_roots]
        teachers = []
        for spec in cfg.teachers:
            ctx.event("DISTILLATION_TEACHER_LOAD_BEGIN", self.name, {"teacher": spec})
            t0 = ctx.governor.clock()
            try:
                teacher = distill.load_teacher(spec, roots=roots, ensemble=ensemble, ensemble_digest=ensemble_digest, patch=cfg.patch, device=ctx.distill_device)
            except distill.DistillationNotExecuted as exc:
                ctx.event("DISTILLATION_TEACHER_LOAD_END", self.name, {"teacher": spec, "ok": False, "error": str(exc)})
                raise
            teachers.append(teacher)
            ctx.event("DISTILLATION_TEACHER_LOAD_END", self.name, {"teacher": spec, "ok": True, "sha256": teacher.sha256, "seconds": round(ctx.governor.clock() - t0, 4)})
        return teachers

    def _teacher_targets(self, ctx: "RunContext", state: "RunState", teachers: list[distill.Teacher], pairs: Sequence[TrainPair]) -> tuple[list[distill.DistillVolume], dict[str, float]]:
        """Read the distillation volumes and their soft targets (teacher outputs cached per volume and teacher)."""
        cache = ctx.output / "cache" / "teachers"
        cache.mkdir(parents=True, exist_ok=True)
        volumes, covered = [], {t.spec: 0 for t in teachers}
        for pair in pairs:
            image, label = read_pair(pair.image, pair.label)
            probs = []
            for teacher in teachers:
                path = cache / f"{state.volume_keys[pair.id][:24]}-{teacher.sha256[:16]}.npz"
                prob = None
                try:
                    prob = load_arrays_checked(path, ("prob",))["prob"].astype(np.float32) if path.is_file() else None
                except Exception as exc:  # a corrupt cache entry is recomputed, never used
                    log.warning("teacher cache %s is corrupt (%s); recomputing", path, exc)
                if prob is None:
                    prob = teacher.predict(pair.id, image)
                    if prob is not None:
                        stored = prob.astype(np.float16)
                        if ctx.quota.allow(stored.nbytes):
                            save_arrays_checked(path, {"prob": stored})
                        else:
                            ctx.event("OUTPUT_QUOTA", self.name, {"refused": str(path), "bytes": int(stored.nbytes), "used_bytes": ctx.quota.used, "quota_bytes": ctx.quota.limit})
                        prob = stored.astype(np.float32)  # what a later cache hit returns
                covered[teacher.spec] += prob is not None
                probs.append(prob)
            volumes.append(distill.DistillVolume(pair.id, normalised(image), label, distill.soft_target(probs)))
        coverage = {spec: 100.0 * n / max(1, len(pairs)) for spec, n in covered.items()}
        return volumes, coverage

    def _student(self, ctx: "RunContext", teachers: list[distill.Teacher]) -> distill.DistillState:
        """A fresh student, or the saved one when it learnt from these same teachers."""
        cfg = ctx.config.distill
        student = distill.init_state(cfg, seed=ctx.config.seed, device=ctx.distill_device)
        key = digest([t.sha256 for t in teachers])
        if self._saved is not None:
            if self._saved["teacher_key"] == key:
                distill.load_state_dict(student, self._saved["student"])
            else:
                ctx.event("DISTILLATION_RESET", self.name, {"reason": "the teachers changed since the saved student", "saved_step": int(self._saved["student"]["step"])})
        self.teacher_key, self.student = key, student
        return student

    def _train(self, ctx: "RunContext", state: "RunState") -> dict[str, Any]:
        cfg = ctx.config.distill
        ctx.event("DISTILLATION_START", self.name, {"teachers": list(cfg.teachers), "steps": cfg.steps, "device": str(ctx.distill_device)})
        teachers = self._teachers(ctx, state)
        volumes, coverage = self._teacher_targets(ctx, state, teachers, state.train_pairs[: cfg.max_volumes])
        val = state.val_pairs[: ctx.config.segment.validation_volumes]
        val_volumes = validation_volumes(ctx, state)
        state.teacher_val_probs = {}
        for teacher in teachers:
            probs, _ = validation_probabilities(ctx, state, teacher.spec, teacher.predict, keep=True)
            state.teacher_val_probs[teacher.spec] = probs if probs and all(pr is not None for pr in probs) else None
        student = state.student = self._student(ctx, teachers)
        val_dvols = [
            distill.DistillVolume(p.id, normalised(img), lab, distill.soft_target([state.teacher_val_probs[t.spec][i] if state.teacher_val_probs[t.spec] else None for t in teachers]))
            for i, (p, (img, lab)) in enumerate(zip(val, val_volumes))
        ]
        probe = distill.sample_batch(val_dvols, 0, dataclasses.replace(cfg, batch=8), seed=ctx.config.seed + 1) if val_dvols else None
        before = distill.agreement(student, probe) if probe is not None else None
        stopped = self._steps(ctx, state, student, volumes)
        if student.step == 0 and stopped is None:
            raise distill.DistillationNotExecuted("no optimiser step ran", expected=f"{cfg.steps} steps", found="0 steps", hint="set distill.steps > 0 or distill.enabled = false")
        after = distill.agreement(student, probe) if probe is not None else None
        ctx.event("DISTILLATION_END", self.name, {"steps": student.step, "stopped": stopped, "teacher_coverage_percent": coverage, "agreement_before": before, "agreement_after": after})
        return {"steps": student.step}

    def _steps(self, ctx: "RunContext", state: "RunState", student: distill.DistillState, volumes: list[distill.DistillVolume]) -> str | None:
        """Optimiser steps until ``distill.steps`` or the governor's stop; returns the stop reason (None when finished)."""
        cfg = ctx.config.distill
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=student.step, desc="distillation", unit="step", disable=None, leave=False)
        stopped = None
        while student.step < cfg.steps:
            if ctx.governor.phase_should_stop(self.name):
                stopped = ctx.governor.stop_reason or "phase_share"
                ctx.event("PRETIMEOUT_FLUSH", self.name, {"distill_step": student.step, "reason": stopped, **ctx.governor.state()})
                state.unfinished.append(self.name)
                ctx.checkpointer.write("pretimeout_flush")
                break
            batch = distill.sample_batch(volumes, student.step, cfg, seed=ctx.config.seed)
            ctx.event("DISTILLATION_BATCH_BEGIN", self.name, {"step": student.step + 1, "patches": int(batch["image"].shape[0]), "covered": int(batch["covered"].sum())})
            terms = distill.train_step(student, batch, cfg)
            state.advanced.add(self.name)
            ctx.event("DISTILLATION_LOSS_STEP", self.name, {"step": student.step, "total": terms["total"], "label": terms["label"], "teacher": terms["teacher"]})
            ctx.event("DISTILLATION_STUDENT_UPDATE", self.name, {"step": student.step, "lr": terms["lr"], "grad_norm": terms["grad_norm"]})
            ctx.event("DISTILLATION_BATCH_END", self.name, {"step": student.step})
            bar.update(1)
            ctx.progress.set(self.name, student.step / max(1, cfg.steps))
            self.done = student.step >= cfg.steps
            if student.step % cfg.checkpoint_every == 0 or self.done:
                ctx.checkpointer.write("distillation_milestone")
                ctx.event("DISTILLATION_CHECKPOINT_WRITTEN", self.name, {"step": student.step})
            ctx.reporter.report()
        bar.close()
        return stopped
