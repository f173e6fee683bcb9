"""Checkpoints of a run: every phase's state, per-phase signatures, and per-phase resume.

A checkpoint holds each phase's ``state_dict()`` (JSON + safetensors, never a
pickle) and its ``signature(config)``. On resume the phases are compared in order:
the first whose signature changed is redone with every phase after it, the ones
before are kept (``RESUME_PARTIAL`` names both and the changed fields, old → new).
When even discovery changed — other data — nothing can be kept
(``RESUME_INCOMPATIBLE``).
"""

from __future__ import annotations

import logging
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..errors import CheckpointError, OutputNotWritableError
from ..journal import ChainLink, last_link
from ..progress import calibrate

if TYPE_CHECKING:
    from .context import RunContext

log = logging.getLogger("nx46vx")

RUN_PAYLOAD = "run"


def rng_states() -> dict[str, Any]:
    """The global generators' states (python, numpy, torch and CUDA when present)."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: Mapping[str, Any]) -> None:
    """Put the global generators back where :func:`rng_states` found them."""
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(tuple(states["numpy"]))
    torch.set_rng_state(states["torch"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["torch_cuda"]))


def git_sha() -> str | None:
    """The source tree's commit, when the package runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class Resumed:
    """The checkpoint a run continues from, and which phases it kept."""

    path: Path
    source: Path
    manifest: dict[str, Any]
    kept: list[str]
    redone: list[str]


class Checkpointer:
    """Writes checkpoints of every phase and chooses the one to resume."""

    def __init__(self, ctx: "RunContext") -> None:
        self.ctx = ctx
        self.folder = ctx.output / "checkpoints"
        self.seq = 0
        self.merkle_prev: str | None = None
        self.resumed: Resumed | None = None
        self.resumed_rate: float | None = None
        self._git_sha = git_sha()
        self._frozen: dict[str, tuple[Path, dict[str, str]]] = {}  # a done phase's files in a committed checkpoint
        self.last: Path | None = None  # the newest checkpoint this session committed
        self.bytes_written = 0  # payload bytes serialised and written this session, and the seconds it took
        self.write_seconds = 0.0

    def signatures(self) -> dict[str, dict[str, Any]]:
        """Each phase's signature under the current configuration."""
        return {p.name: p.signature(self.ctx.config) for p in self.ctx.phases}

    # ------------------------------------------------------------------ write

    def write(self, reason: str) -> Path:
        """Checkpoint every phase now; journal ``CHECKPOINT_WRITTEN``, ``TRAIN_CURSOR`` and a Merkle root."""
        ctx = self.ctx
        journal = ctx.journal
        assert journal is not None
        t0, started = time.perf_counter(), ctx.governor.clock()
        tree_size, root = journal.merkle_root("checkpoint")
        cursor = ctx.reporter.cursor()
        search = ctx.reporter.state.search if ctx.reporter.state is not None else None
        self.seq = max(self.seq, self._next_seq())
        payload, linked = self._payload()
        signatures = self.signatures()
        manifest = {
            "ts_ns": time.time_ns(),
            "run_id": ctx.run_id,
            "version": _version(),
            "git_sha": self._git_sha,
            "config_signature": signatures,
            "phases": {p.name: {"done": p.done} for p in ctx.phases},
            "epoch": cursor["epoch"],
            "candidate_index": cursor["candidate"],
            "candidate_total": len(search.grid) if search else 0,
            "iter": cursor["iter"],
            "max_iter": ctx.config.search.max_iter,
            "stage": search.stage if search else "no_search",
            "distill_step": ctx.reporter.state.student.step if ctx.reporter.state and ctx.reporter.state.student else 0,
            "best_metrics": search.best if search else {},
            "data_cursor": {"epoch_sample_seed": [ctx.config.seed, 0, cursor["epoch"]], "batch_start": cursor["candidate"]},
            "rng": {"seed": ctx.config.seed, "derivation": "numpy default_rng([seed, stream, epoch, ...]) per draw; python/numpy/torch global states in run.json/run.safetensors"},
            "merkle_prev": self.merkle_prev,
            "merkle_curr": root,
            "tree_size": tree_size,
            "journal_head": {"hash": journal.prev, "next_seq": journal.seq},
            "elapsed_by_phase": ctx.governor.cumulative_seconds(),
            "candidate_iterations_per_s": self._session_rate(),
            "global_progress": ctx.progress.global_progress(),
            "reason": reason,
        }
        try:
            path = ckpt.write_checkpoint(self.folder, self.seq, payload, manifest, keep_last=ctx.config.checkpoint.keep_last, linked=linked)
        except OSError as exc:  # the folder turned read-only or full after the start-up probe: a named error, not a traceback
            raise OutputNotWritableError("cannot write a checkpoint", path=self.folder, expected="a writable folder with free space", found=str(exc)) from None
        self._remember_done(path)
        self.merkle_prev = root
        seconds = time.perf_counter() - t0
        ctx.governor.measured_checkpoint_cost(ctx.governor.clock() - started)  # on the governor's clock: what its reserve is sized by
        ctx.io_seconds += seconds
        self.last = path
        self.bytes_written += sum(len(data) for data in payload.values())
        self.write_seconds += seconds
        journal.record("CHECKPOINT_WRITTEN", "checkpoint", {"path": str(path), "reason": reason, **cursor, "tree_size": tree_size, "merkle_root": root, "seconds": round(seconds, 6)})
        journal.record("TRAIN_CURSOR", "checkpoint", dict(cursor, progress=search.progress() if search else 0.0))
        journal.sync()
        return path

    def _payload(self) -> tuple[dict[str, bytes], dict[str, tuple[Path, str]]]:
        """Every phase's files: serialised now, or — for a finished phase already in a committed checkpoint — linked from it.

        A finished phase's state no longer changes, so a checkpoint per test volume does
        not rewrite the student, its optimiser and the search each time.
        """
        payload: dict[str, bytes] = {}
        linked: dict[str, tuple[Path, str]] = {}
        for phase in self.ctx.phases:
            frozen = self._frozen.get(phase.name) if phase.done else None
            if frozen is not None and all((frozen[0] / name).is_file() for name in frozen[1]):
                linked.update({name: (frozen[0] / name, digest) for name, digest in frozen[1].items()})
            else:
                self._frozen.pop(phase.name, None)
                payload.update(ckpt.payload_files(phase.name, phase.state_dict()))
        payload.update(ckpt.payload_files(RUN_PAYLOAD, {"rng": rng_states(), "elapsed": self.ctx.governor.cumulative_seconds(), "run_id": self.ctx.run_id}))
        return payload, linked

    def _remember_done(self, path: Path) -> None:
        """Note where the files of phases that are done now live (the newest checkpoint: older ones get pruned), with their digests."""
        digests = ckpt.read_manifest(path)["sha512"]
        for phase in self.ctx.phases:
            if phase.done:
                self._frozen[phase.name] = (path, {n: digests[n] for n in (f"{phase.name}.json", f"{phase.name}.safetensors")})

    def write_rate(self) -> float | None:
        """Bytes per second this session's checkpoints were written at (None before one was)."""
        return self.bytes_written / self.write_seconds if self.bytes_written and self.write_seconds > 0 else None

    def _session_rate(self) -> float | None:
        """Candidate-iterations per second of search in this session (None before any)."""
        seconds = self.ctx.governor.phase_seconds().get("search", 0.0)
        done = self.ctx.reporter.session_iterations()
        return done / seconds if seconds > 0 and done else None

    def _next_seq(self) -> int:
        existing = ckpt.list_checkpoints(self.folder)
        last = max((int(p.name[len(ckpt.PREFIX):]) for p in existing if p.name[len(ckpt.PREFIX):].isdigit()), default=-1)
        return last + 1

    # ------------------------------------------------------------------ resume

    def _candidates(self, input_roots: list[Path]) -> list[ckpt.Found]:
        unpack = self.ctx.output / ".attached"
        resume = self.ctx.resume
        if resume == "auto":
            return ckpt.find_checkpoints([self.ctx.output] + input_roots, unpack_into=unpack)
        path = Path(resume)
        if path.is_file() and path.name.endswith(".zip"):
            unpacked = ckpt.extract_results_zip(path, unpack)
            candidates = ckpt.find_checkpoints([unpacked], unpack_into=unpack) if unpacked else []
        elif (path / ckpt.MANIFEST).is_file():
            run_root = path.parent.parent
            candidates = [ckpt.Found(path, run_root, run_root / "journal.jsonl" if (run_root / "journal.jsonl").is_file() else None, (0, 0))]
        else:
            candidates = ckpt.find_checkpoints([path], unpack_into=unpack)
        if not candidates:
            raise CheckpointError("no checkpoint at --resume path", path=path, expected="a checkpoint, run folder or results.zip", found="none")
        return candidates

    def choose(self, input_roots: list[Path]) -> ChainLink:
        """Resume the newest usable checkpoint into the phases; return the journal link to continue.

        Journals ``CHECKPOINT_CORRUPT`` and ``RESUME_INCOMPATIBLE`` for the ones passed over.
        """
        ctx = self.ctx
        link = last_link(ctx.previous_journal) if ctx.previous_journal is not None else ChainLink()
        if ctx.resume == "never":
            return link
        current = self.signatures()
        names = [p.name for p in ctx.phases]
        for found in self._candidates(input_roots):
            try:
                manifest = ckpt.check_integrity(found.path)
            except CheckpointError as exc:
                ctx.event("CHECKPOINT_CORRUPT", "resume", {"checkpoint": str(found.path), "error": str(exc)})
                continue
            if manifest.get("format") != ckpt.FORMAT:
                ctx.event("RESUME_INCOMPATIBLE", "resume", {"checkpoint": str(found.path), "field": "format", "expected": ckpt.FORMAT, "found": manifest.get("format")})
                continue
            stored = manifest.get("config_signature", {})
            first = next((i for i, n in enumerate(names) if stored.get(n) != current[n]), len(names))
            changes = {f"{n}.{k}": v for n in names[first:] for k, v in ckpt.signature_changes(stored.get(n), current[n]).items()}
            if first == 0:
                field_name = next(iter(changes), "discovery")
                ctx.event("RESUME_INCOMPATIBLE", "resume", {"checkpoint": str(found.path), "field": field_name, "changed": changes})
                continue
            try:
                payloads = {n: ckpt.load_payload(found.path, n) for n in names[:first] + [RUN_PAYLOAD]}
            except CheckpointError as exc:
                ctx.event("CHECKPOINT_CORRUPT", "resume", {"checkpoint": str(found.path), "error": str(exc)})
                continue
            self._apply(found, manifest, payloads, names[:first], names[first:], changes)
            if ctx.previous_journal is None:
                if found.journal is not None:
                    link = last_link(found.journal)
                else:
                    head = manifest.get("journal_head", {})
                    link = ChainLink(head.get("hash", ChainLink().prev), int(head.get("next_seq", 0)))
            return link
        return link

    def _apply(self, found: ckpt.Found, manifest: dict[str, Any], payloads: dict[str, Any], kept: list[str], redone: list[str], changes: dict[str, list[Any]]) -> None:
        """Load the kept phases' states, the RNG states and elapsed time; journal what was kept."""
        ctx = self.ctx
        for phase in ctx.phases:
            if phase.name in kept:
                phase.load_state_dict(payloads[phase.name])
        run_state = payloads[RUN_PAYLOAD]
        restore_rng(run_state["rng"])
        ctx.governor.restore(run_state["elapsed"])
        ctx.progress.weights = calibrate(run_state["elapsed"])
        self.resumed_rate = manifest.get("candidate_iterations_per_s")
        self.merkle_prev = manifest.get("merkle_curr")
        self.resumed = Resumed(found.path, found.source, manifest, kept, redone)
        ctx.event("PHASE_WEIGHT_CALIBRATION", "resume", {"weights": ctx.progress.weights, "measured_seconds": run_state["elapsed"]})
        ctx.event(
            "RESUME_OK",
            "resume",
            {
                "checkpoint": str(found.path),
                "source": str(found.source),
                "source_run_id": manifest.get("run_id"),
                "source_hash": manifest.get("journal_head", {}).get("hash"),
                "merkle_root": manifest.get("merkle_curr"),
                "epoch": manifest.get("epoch"),
                "candidate": manifest.get("candidate_index"),
                "iter": manifest.get("iter"),
                "stage": manifest.get("stage"),
                "kept": kept,
            },
        )
        if redone:
            ctx.event("RESUME_PARTIAL", "resume", {"checkpoint": str(found.path), "kept": kept, "redone": redone, "changed": changes})


def _version() -> str:
    from .. import __version__

    return __version__
