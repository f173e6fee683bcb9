"""The seven phases under the services: the only module that checks the clock, journals and checkpoints.

``run()`` = discovery → load → features → search → (distillation: not yet) →
segmentation → packaging, with a hash-chained journal, atomic checkpoints at the
``(epoch, candidate, iter)`` cursor, resume from the output folder or any input
root, and a governor that stops training in time to deliver ``submission.zip``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import subprocess
import time
import uuid
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import orjson
import torch

from . import checkpoint as ckpt
from .atomic import load_arrays_checked, save_arrays_checked, write_json_atomic
from .config import RunConfig, load_config
from .discovery import Discovery, TrainPair, discover
from .errors import CheckpointError, Nx46Error, OutputNotWritableError
from .features import FeatureCache, Pool, resolve_device, spec_dict
from .governor import Governor
from .journal import ChainLink, Journal, dumps, last_link
from .metric import score_volume
from .package import encode_mask, validate_submission, write_results_zip, write_submission
from .progress import Progress, calibrate, train_progress
from . import reports
from .telemetry import boot_info, health, mask_stats
from .search import CandidateSearch, N_PARAMS
from . import distill
from .segment import BASELINE, ENSEMBLE, SEARCH_MODEL, STUDENT, PostParams, intensity_baseline, normalised, postprocess, probability, sliding_window, tune_postprocess
from .volumes import file_sha256, read_pair, read_volume, volume_voxels

log = logging.getLogger("nx46vx")

MIN_FREE_BYTES = 64 << 20


@dataclass
class RunResult:
    """What a run produced.

    ``status``: ``complete``, ``stopped_by_deadline`` or ``stopped_by_signal``.
    ``model_digest``: SHA-256 over the final model parameters (every candidate's
    ``(w, α, β, b)`` and the standardiser), equal for an interrupted-and-resumed run
    and an uninterrupted one.
    """

    status: str
    stop_reason: str | None
    output_dir: Path
    submission: Path
    journal: Path
    run_id: str
    cursor: dict[str, int]
    model_digest: str
    segmenter: str
    validation_scores: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("output_dir", "submission", "journal"):
            out[key] = str(out[key])
        return out


def default_output() -> Path:
    """``/kaggle/working`` on Kaggle, ``./nx46vx-output`` elsewhere."""
    kaggle = Path("/kaggle/working")
    return kaggle if kaggle.is_dir() else Path("nx46vx-output")


def check_output_writable(output: Path) -> None:
    """Fail before any work when the output folder cannot hold the run's files."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".nx46vx-probe-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        raise OutputNotWritableError("output folder is not writable", path=output, expected="a writable folder", found=str(exc)) from None
    free = shutil.disk_usage(output).free
    if free < MIN_FREE_BYTES:
        raise OutputNotWritableError(
            "output folder is nearly full", path=output, expected=f">= {MIN_FREE_BYTES >> 20} MiB free", found=f"{free >> 20} MiB free"
        )


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _digest(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def config_signature(config: RunConfig, data_manifest: Sequence[tuple[str, str, str]]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: feature spec, grid, model, preprocessing, data."""
    s = config.search
    signature = {
        "features": spec_dict(config.features),
        "grid": {"meta_neurons": s.meta_neurons, "l1": list(s.l1), "l2": list(s.l2), "max_iter": s.max_iter},
        "sampling": {
            "seed": config.seed,
            "samples_per_class": s.samples_per_class,
            "val_samples_per_class": s.val_samples_per_class,
            "pool_per_class": config.features.pool_per_class,
            "val_fraction": config.data.val_fraction,
            "min_val_volumes": config.data.min_val_volumes,
        },
        "model": {"kind": "sparse_logistic_meta_neuron", "n_params": N_PARAMS, "init_scale": s.init_scale, "fbeta": s.fbeta, "block_rows": s.block_rows},
        "preprocessing": {"normalise": "p1-p99.5", "version": 1},
        "distill": {k: v for k, v in dataclasses.asdict(config.distill).items() if k not in ("checkpoint_every", "device")},
        "data": _digest(sorted(data_manifest)),
    }
    return orjson.loads(dumps(signature))  # the JSON form, as a manifest stores it


def split_train_val(pairs: Sequence[TrainPair], config: RunConfig) -> tuple[list[TrainPair], list[TrainPair]]:
    """Validation split by volume, seeded; fewer than two pairs → no validation (and no search)."""
    ordered = sorted(pairs, key=lambda p: p.id)
    if len(ordered) < 2:
        return ordered, []
    order = np.random.default_rng([config.seed, 4]).permutation(len(ordered))
    n_val = min(len(ordered) - 1, max(config.data.min_val_volumes, int(round(config.data.val_fraction * len(ordered)))))
    val = sorted((ordered[i] for i in order[:n_val]), key=lambda p: p.id)
    train = sorted((ordered[i] for i in order[n_val:]), key=lambda p: p.id)
    return train, val


def model_digest(search: CandidateSearch | None, student: distill.DistillState | None = None) -> str:
    """SHA-256 over every candidate's parameters, the standardiser and the student's weights (what exists)."""
    h = hashlib.sha256()
    if search is not None:
        h.update(search.theta.numpy().tobytes())
        if search.standardiser is not None:
            h.update(search.standardiser.mean.tobytes())
            h.update(search.standardiser.std.tobytes())
    if student is not None:
        h.update(distill.student_digest(student))
    return h.hexdigest()


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])


class _Run:
    """State of one ``run()`` call; methods are the phases."""

    def __init__(self, config: RunConfig, output: Path, input_roots: Sequence[Path] | None, resume: str) -> None:
        self.config = config
        self.output = output
        self.input_roots = input_roots
        self.resume = resume
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.wall_start = time.monotonic()
        self.device = resolve_device(config.search.device)
        self.pending: list[tuple[str, str, dict[str, Any]]] = []
        self.journal: Journal | None = None
        self.search: CandidateSearch | None = None
        self.resumed: dict[str, Any] | None = None
        self.merkle_prev: str | None = None
        self.io_seconds = 0.0
        self.ckpt_seq = 0
        self.governor = Governor(config.budget, n_test=0)
        self.progress = Progress()
        self.stats: dict[str, Any] = {"files_processed": 0, "slices_processed": 0, "voxels_processed": 0, "volumes": {}}
        self._last_report = float("-inf")
        self._reports = 0
        self._shown = 0.0
        self._session_iters_start = 0
        self.resumed_rate: float | None = None
        self.distill_state: distill.DistillState | None = None
        self.distill_device = resolve_device(config.distill.device)
        self.teacher_val_probs: dict[str, list[np.ndarray] | None] = {}
        self._validation: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._validation_probs: dict[str, tuple[list[np.ndarray | None], float]] = {}

    # ------------------------------------------------------------------ journal helpers

    def event(self, event: str, phase: str, data: dict[str, Any] | None = None) -> None:
        if self.journal is None:
            self.pending.append((event, phase, data or {}))
        else:
            self.journal.record(event, phase, data or {})

    def phase(self, name: str) -> None:
        assert self.journal is not None
        self.governor.enter(name)
        self.journal.record("PHASE_START", name, {"phase": name})
        self.journal.record("TIME_BUDGET_STATE", name, self.governor.state())
        self.report(force=True)

    def end_phase(self, name: str, data: dict[str, Any] | None = None) -> None:
        assert self.journal is not None
        self.governor.leave()
        if name != "search":  # training progress always comes from the cursor
            self.progress.set(name, 1.0)
        self.journal.record("PHASE_END", name, dict(data or {}, seconds=round(self.governor.phase_elapsed.get(name, 0.0), 6)))
        self.write_global_stats(name)
        self.report(force=True)
        self.journal.record("HEALTH", name, health())
        self.journal.sync()

    # ------------------------------------------------------------------ progress and stats

    def report(self, *, force: bool = False) -> None:
        """``GLOBAL_PROGRESS_REALTIME`` + ``roadmap_realtime.json`` every ``progress.interval_s`` and when forced."""
        assert self.journal is not None
        now = self.governor.elapsed()
        if not force and now - self._last_report < self.config.progress.interval_s:
            return
        self._last_report = now
        self._reports += 1
        cursor = self.search.cursor() if self.search else {"epoch": 0, "candidate": 0, "iter": 0}
        if self.search is not None:
            self.progress.set("search", train_progress(self.search.epoch, self.search.progress(), self.config.search.max_epochs, done=self.search.done))
        computed = self.progress.global_progress()
        remaining = self.progress.remaining_estimate(sum(self.governor.cumulative_seconds().values()))
        roadmap = {
            "global_progress_percent": round(100.0 * computed, 6),
            "train_progress_percent": round(100.0 * self.progress.fractions["search"], 6),
            "phase": self.governor.state()["phase"],
            "phase_percent": {p: round(100.0 * f, 6) for p, f in self.progress.fractions.items()},
            "weights": self.progress.weights,
            "cursor": cursor,
            "remaining_estimate_s": None if remaining is None else round(remaining, 3),
            "elapsed_s": round(now, 3),
            "run_id": self.run_id,
        }
        path = self.output / "roadmap_realtime.json"
        write_json_atomic(path, roadmap)
        phase = roadmap["phase"] or "run"
        self.journal.record("GLOBAL_PROGRESS_REALTIME", phase, roadmap)
        shown = orjson.loads(path.read_bytes())["global_progress_percent"]
        if shown != roadmap["global_progress_percent"] or shown + 1e-9 < self._shown:
            self.journal.record("PROGRESS_INTEGRITY_ALERT", phase, {"shown_percent": shown, "computed_percent": roadmap["global_progress_percent"], "previous_shown_percent": self._shown})
        self._shown = shown
        if self._reports % self.config.progress.health_every == 0:
            self.journal.record("HEALTH", phase, health())

    def count_volume(self, shape: Sequence[int]) -> None:
        self.stats["files_processed"] += 1
        self.stats["slices_processed"] += int(shape[0])
        self.stats["voxels_processed"] += int(np.prod(shape))

    def write_global_stats(self, phase: str) -> None:
        search = self.search
        stats = reports.global_stats(
            dict(self.stats, phase=phase),
            search.epoch_results if search else [],
            search_s=self.governor.phase_seconds().get("search", 0.0),
            candidate_iterations=(search.candidate_iterations - self._session_iters_start) if search else 0,
            samples=2 * self.config.search.samples_per_class,
        )
        write_json_atomic(self.output / "GLOBAL_STATS.json", stats)

    # ------------------------------------------------------------------ phases

    def start(self) -> None:
        check_output_writable(self.output)
        self.governor.install_signal_handlers()
        self.governor.enter("discovery")
        previous = self.output / "journal.jsonl"
        self.previous_journal: Path | None = None
        if previous.exists():
            journals = self.output / "journals"
            journals.mkdir(exist_ok=True)
            target = journals / f"journal-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.jsonl"
            os.replace(previous, target)
            self.previous_journal = target

    def discover(self) -> Discovery:
        found = discover(self.input_roots, include_deprecated=self.config.data.include_deprecated)
        self.discovery = found
        self.governor.n_test = len(found.test)
        self.test_voxels = sum(volume_voxels(t.image) for t in found.test)
        pairs = list(found.train)
        if self.config.data.max_train_volumes > 0:
            pairs = sorted(pairs, key=lambda p: p.id)[: self.config.data.max_train_volumes]
        self.train_pairs, self.val_pairs = split_train_val(pairs, self.config)
        start = time.perf_counter()
        self.hashes = {p.id: file_sha256(p.image) + file_sha256(p.label)[:16] for p in pairs}
        self.io_seconds += time.perf_counter() - start
        manifest = [("train", p.id, self.hashes[p.id]) for p in self.train_pairs] + [("val", p.id, self.hashes[p.id]) for p in self.val_pairs]
        self.signature = config_signature(self.config, manifest)
        self.event(
            "DATASET_DISCOVERY",
            "discovery",
            {
                "root": str(found.root),
                "input_roots": [str(p) for p in found.input_roots],
                "train_pairs": len(found.train),
                "train": len(self.train_pairs),
                "val": len(self.val_pairs),
                "test_ids": [t.id for t in found.test],
                "warnings": list(found.warnings),
                **found.inventory,
            },
        )
        return found

    def choose_checkpoint(self) -> ChainLink:
        """Pick the checkpoint to resume (journaling why others were skipped); return the journal link."""
        link = ChainLink()
        if self.previous_journal is not None:
            link = last_link(self.previous_journal)
        if self.resume == "never":
            return link
        unpack = self.output / ".attached"
        if self.resume == "auto":
            roots = [self.output] + [Path(p) for p in self.discovery.input_roots]
            candidates = ckpt.find_checkpoints(roots, unpack_into=unpack)
        else:
            path = Path(self.resume)
            if path.is_file() and path.name.endswith(".zip"):
                unpacked = ckpt.extract_results_zip(path, unpack)
                candidates = ckpt.find_checkpoints([unpacked], unpack_into=unpack) if unpacked else []
            elif (path / ckpt.MANIFEST).is_file():
                candidates = [ckpt.Found(path, path.parent.parent, ckpt._journal_beside(path.parent.parent), (0, 0))]
            else:
                candidates = ckpt.find_checkpoints([path], unpack_into=unpack)
            if not candidates:
                raise CheckpointError("no checkpoint at --resume path", path=path, expected="a checkpoint, run folder or results.zip", found="none")
        for found in candidates:
            try:
                manifest = ckpt.check_integrity(found.path)
            except CheckpointError as exc:
                self.event("CHECKPOINT_CORRUPT", "resume", {"checkpoint": str(found.path), "error": str(exc)})
                continue
            field_name = ckpt.signature_difference(manifest.get("config_signature", {}), self.signature)
            if field_name is not None:
                self.event("RESUME_INCOMPATIBLE", "resume", {"checkpoint": str(found.path), "field": field_name})
                continue
            # Read the payload now: this run's own checkpoints may prune the folder it came from.
            payload = {name: ckpt.load_payload(found.path, name) for name in ("search.pt", "run.pt", "distill.pt")}
            self.resumed = {"path": found.path, "manifest": manifest, "source": found.source, "payload": payload}
            if self.previous_journal is None:
                if found.journal is not None:
                    link = last_link(found.journal)
                else:
                    head = manifest.get("journal_head", {})
                    link = ChainLink(head.get("hash", ChainLink().prev), int(head.get("next_seq", 0)))
            return link
        return link

    def open_journal(self, link: ChainLink) -> None:
        self.journal = Journal(self.output / "journal.jsonl", run_id=self.run_id, link=link)
        self.journal.record(
            "RUN_START",
            "run",
            {
                "version": _version(),
                "profile": self.config.profile,
                "config": self.config.to_dict(),
                "device": str(self.device),
                "output": str(self.output),
                "previous_journal": str(self.previous_journal) if self.previous_journal else None,
            },
        )
        self.journal.record("BOOT", "run", boot_info())
        self.journal.record("PHASE_START", "discovery", {"phase": "discovery"})  # the phase opened before the journal could
        for event, phase, data in self.pending:
            self.journal.record(event, phase, data)
        self.pending.clear()

    def load_features(self) -> tuple[list[Pool], list[Pool]]:
        """Phases 2 + 3: read each training volume once (on a cache miss), keep only its pool."""
        cache = FeatureCache(self.output / "cache" / "features")
        pools: dict[str, Pool] = {}
        load_s = feat_s = 0.0
        voxels = 0
        from tqdm.auto import tqdm

        pairs = self.train_pairs + self.val_pairs
        for pair in tqdm(pairs, desc="features", unit="vol", disable=None, leave=False):
            times = {}

            def read(pair: TrainPair = pair) -> tuple[np.ndarray, np.ndarray]:
                t0 = time.perf_counter()
                image, label = read_pair(pair.image, pair.label)
                times["load"] = time.perf_counter() - t0
                times["voxels"] = image.size
                self.count_volume(image.shape)
                return image, label

            t0 = time.perf_counter()
            pool, hit = cache.get_or_compute(self.hashes[pair.id], self.config.features, self.config.seed, read, device=self.device)
            total = time.perf_counter() - t0
            load_s += times.get("load", 0.0)
            feat_s += total - times.get("load", 0.0)
            voxels += int(times.get("voxels", 0))
            pools[pair.id] = pool
            self.progress.set("features", len(pools) / len(pairs))
            self.report()
            self.journal.record(
                "FEATURES_READY",
                "features",
                {"id": pair.id, "cache_hit": hit, "pool": int(pool.labels.size), "class_counts": pool.class_counts.tolist(), "seconds": round(total, 4)},
            )
        self.io_seconds += load_s
        if voxels:
            self.governor.measured_volume_cost(feat_s / voxels, self.test_voxels)
        self.feature_stats = {"cache_hits": cache.hits, "cache_misses": cache.misses, "cache_corrupt": cache.corrupt, "load_s": load_s, "features_s": feat_s}
        return [pools[p.id] for p in self.train_pairs], [pools[p.id] for p in self.val_pairs]

    # ------------------------------------------------------------------ checkpoints

    def write_checkpoint(self, reason: str) -> None:
        assert self.journal is not None
        t0 = time.perf_counter()
        tree_size, root = self.journal.merkle_root("checkpoint")
        cursor = self.search.cursor() if self.search else {"epoch": 0, "candidate": 0, "iter": 0}
        self.ckpt_seq = max(self.ckpt_seq, self._next_ckpt_seq())
        payload = {
            "search.pt": ckpt.torch_bytes(self.search.state_dict() if self.search else None),
            "distill.pt": ckpt.torch_bytes(distill.state_dict(self.distill_state) if self.distill_state else None),
            "run.pt": ckpt.torch_bytes({"rng": _rng_states(), "elapsed": self.governor.cumulative_seconds(), "run_id": self.run_id}),
        }
        manifest = {
            "ts_ns": time.time_ns(),
            "run_id": self.run_id,
            "version": _version(),
            "git_sha": _git_sha(),
            "config_signature": self.signature,
            "epoch": cursor["epoch"],
            "candidate_index": cursor["candidate"],
            "candidate_total": len(self.search.grid) if self.search else 0,
            "iter": cursor["iter"],
            "max_iter": self.config.search.max_iter,
            "stage": self.search.stage if self.search else "no_search",
            "distill_step": self.distill_state.step if self.distill_state else 0,
            "best_metrics": self.search.best if self.search else {},
            "data_cursor": {"epoch_sample_seed": [self.config.seed, 0, cursor["epoch"]], "batch_start": cursor["candidate"]},
            "rng": {"seed": self.config.seed, "derivation": "numpy default_rng([seed, stream, epoch, ...]) per draw; python/numpy/torch global states in run.pt"},
            "merkle_prev": self.merkle_prev,
            "merkle_curr": root,
            "tree_size": tree_size,
            "journal_head": {"hash": self.journal.prev, "next_seq": self.journal.seq},
            "elapsed_by_phase": self.governor.cumulative_seconds(),
            "candidate_iterations_per_s": self._session_rate(),
            "global_progress": self.progress.global_progress(),
            "reason": reason,
        }
        path = ckpt.write_checkpoint(self.output / "checkpoints", self.ckpt_seq, payload, manifest, keep_last=self.config.checkpoint.keep_last)
        self.merkle_prev = root
        seconds = time.perf_counter() - t0
        self.io_seconds += seconds
        self.journal.record("CHECKPOINT_WRITTEN", "checkpoint", {"path": str(path), "reason": reason, **cursor, "tree_size": tree_size, "merkle_root": root, "seconds": round(seconds, 6)})
        self.journal.record("TRAIN_CURSOR", "checkpoint", dict(cursor, progress=self.search.progress() if self.search else 0.0))
        self.journal.sync()

    def _session_rate(self) -> float | None:
        """Candidate-iterations per second of search in this session (None before any)."""
        seconds = self.governor.phase_seconds().get("search", 0.0)
        done = (self.search.candidate_iterations - self._session_iters_start) if self.search else 0
        return done / seconds if seconds > 0 and done else None

    def _next_ckpt_seq(self) -> int:
        existing = ckpt.list_checkpoints(self.output / "checkpoints")
        last = max((int(p.name[len(ckpt.PREFIX):]) for p in existing if p.name[len(ckpt.PREFIX):].isdigit()), default=-1)
        return last + 1

    # ------------------------------------------------------------------ search

    def run_search(self, train_pools: list[Pool], val_pools: list[Pool]) -> None:
        assert self.journal is not None
        cfg = self.config.search
        self.search = CandidateSearch(cfg, train_pools, val_pools, seed=self.config.seed, device=self.device)
        if self.resumed is not None:
            state = self.resumed["payload"]["search.pt"]
            run_state = self.resumed["payload"]["run.pt"]
            if state is not None:
                self.search.load_state_dict(state)
            _restore_rng(run_state["rng"])
            self.governor.restore(run_state["elapsed"])
            manifest = self.resumed["manifest"]
            self.resumed_rate = manifest.get("candidate_iterations_per_s")
            self.progress.weights = calibrate(run_state["elapsed"])
            self.journal.record("PHASE_WEIGHT_CALIBRATION", "resume", {"weights": self.progress.weights, "measured_seconds": run_state["elapsed"]})
            self.merkle_prev = manifest.get("merkle_curr")
            self.journal.record(
                "RESUME_OK",
                "resume",
                {
                    "checkpoint": str(self.resumed["path"]),
                    "source": str(self.resumed["source"]),
                    "source_run_id": manifest.get("run_id"),
                    "source_hash": manifest.get("journal_head", {}).get("hash"),
                    "merkle_root": manifest.get("merkle_curr"),
                    **self.search.cursor(),
                    "stage": self.search.stage,
                },
            )
        self._session_iters_start = self.search.candidate_iterations
        finished_before = self.search.done  # resumed after the search: its checkpoints already say so
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_epochs * len(self.search.grid) * cfg.max_iter, desc="search", unit="cand-it", disable=None, leave=False)
        every = self.config.checkpoint.every_iters
        while not self.search.done:
            if self.governor.should_stop():
                self.journal.record("PRETIMEOUT_FLUSH", "search", dict(self.search.cursor(), reason=self.governor.stop_reason, **self.governor.state()))
                self.write_checkpoint("pretimeout_flush")
                break
            events = self.search.advance()
            checkpoint_due = None
            for name, data in events:
                self.journal.record(name, "search", data)
                if name == "FIT_ITER":
                    bar.update(data["batch_size"])
                    if data["iter"] % every == 0 and data["iter"] < cfg.max_iter:
                        checkpoint_due = "every_iters"
                elif name == "CANDIDATE_DONE":
                    checkpoint_due = "batch_end"
                elif name == "EPOCH_DONE":
                    checkpoint_due = "epoch_end"
                    self.journal.record("TIME_BUDGET_STATE", "search", self.governor.state())
            if checkpoint_due:
                self.write_checkpoint(checkpoint_due)
            self.report()
        bar.close()
        if self.search.done and not finished_before:
            self.write_checkpoint("search_done")

    # ------------------------------------------------------------------ distillation

    def _teacher_targets(self, teachers: list[distill.Teacher], pairs: Sequence[TrainPair]) -> tuple[list[distill.DistillVolume], dict[str, float]]:
        """Read the distillation volumes and their soft targets (teacher outputs cached per volume and teacher)."""
        cache = self.output / "cache" / "teachers"
        cache.mkdir(parents=True, exist_ok=True)
        volumes, covered = [], {t.spec: 0 for t in teachers}
        for pair in pairs:
            image, label = read_pair(pair.image, pair.label)
            probs = []
            for teacher in teachers:
                path = cache / f"{self.hashes[pair.id][:24]}-{teacher.sha256[:16]}.npz"
                prob = None
                try:
                    prob = load_arrays_checked(path, ("prob",))["prob"].astype(np.float32) if path.is_file() else None
                except Exception as exc:  # a corrupt cache entry is recomputed, never used
                    log.warning("teacher cache %s is corrupt (%s); recomputing", path, exc)
                if prob is None:
                    prob = teacher.predict(pair.id, image)
                    if prob is not None:
                        save_arrays_checked(path, {"prob": prob.astype(np.float16)})
                        prob = prob.astype(np.float16).astype(np.float32)  # what a later cache hit returns
                covered[teacher.spec] += prob is not None
                probs.append(prob)
            volumes.append(distill.DistillVolume(pair.id, normalised(image), label, distill.soft_target(probs)))
        coverage = {spec: 100.0 * n / max(1, len(pairs)) for spec, n in covered.items()}
        return volumes, coverage

    def run_distillation(self) -> None:
        """Phase 5: load every teacher, train the student step by step, checkpoint it like the search."""
        assert self.journal is not None
        cfg = self.config.distill
        self.phase("distillation")
        if not cfg.enabled:
            self.journal.record("DISTILLATION_SKIPPED", "distillation", {"reason": "distill.enabled is false"})
            self.progress.set("distillation", 1.0)
            self.end_phase("distillation")
            return
        if self.governor.should_stop():
            self.journal.record("DISTILLATION_SKIPPED", "distillation", {"reason": f"stop requested ({self.governor.stop_reason})"})
            self.end_phase("distillation")
            return
        self.journal.record("DISTILLATION_START", "distillation", {"teachers": list(cfg.teachers), "steps": cfg.steps, "device": str(self.distill_device)})
        ensemble = self._ensemble_probability() if self.search is not None else None
        ensemble_digest = hashlib.sha256(self.search.top_models(cfg.ensemble_k)["thetas"].numpy().tobytes()).hexdigest() if self.search else ""
        roots = [Path(p) for p in self.discovery.input_roots]
        teachers = []
        for spec in cfg.teachers:
            self.journal.record("DISTILLATION_TEACHER_LOAD_BEGIN", "distillation", {"teacher": spec})
            t0 = time.perf_counter()
            try:
                teacher = distill.load_teacher(spec, roots=roots, ensemble=ensemble, ensemble_digest=ensemble_digest, patch=cfg.patch, device=self.distill_device)
            except distill.DistillationNotExecuted as exc:
                self.journal.record("DISTILLATION_TEACHER_LOAD_END", "distillation", {"teacher": spec, "ok": False, "error": str(exc)})
                raise
            teachers.append(teacher)
            self.journal.record("DISTILLATION_TEACHER_LOAD_END", "distillation", {"teacher": spec, "ok": True, "sha256": teacher.sha256, "seconds": round(time.perf_counter() - t0, 4)})
        pairs = self.train_pairs[: cfg.max_volumes]
        volumes, coverage = self._teacher_targets(teachers, pairs)
        val = self.val_pairs[: self.config.segment.validation_volumes]
        val_volumes = self._validation_volumes()
        self.teacher_val_probs = {}
        for teacher in teachers:
            probs, _ = self._validation_probabilities(teacher.spec, teacher.predict, keep=True)
            self.teacher_val_probs[teacher.spec] = probs if probs and all(pr is not None for pr in probs) else None
        state = distill.init_state(cfg, seed=self.config.seed, device=self.distill_device)
        if self.resumed is not None:
            saved = self.resumed["payload"]["distill.pt"]
            if saved is not None:
                distill.load_state_dict(state, saved)
                self.journal.record("RESUME_OK", "distillation", {"checkpoint": str(self.resumed["path"]), "distill_step": state.step})
        self.distill_state = state
        val_dvols = [
            distill.DistillVolume(p.id, normalised(img), lab, distill.soft_target([self.teacher_val_probs[t.spec][i] if self.teacher_val_probs[t.spec] else None for t in teachers]))
            for i, (p, (img, lab)) in enumerate(zip(val, val_volumes))
        ]
        probe = distill.sample_batch(val_dvols, 0, dataclasses.replace(cfg, batch=8), seed=self.config.seed + 1) if val_dvols else None
        agreement = (lambda: distill.agreement(state, probe)) if probe is not None else (lambda: None)  # noqa: E731
        before = agreement()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=state.step, desc="distillation", unit="step", disable=None, leave=False)
        stopped = None
        while state.step < cfg.steps:
            if self.governor.should_stop():
                stopped = self.governor.stop_reason
                self.journal.record("PRETIMEOUT_FLUSH", "distillation", {"distill_step": state.step, "reason": stopped, **self.governor.state()})
                self.write_checkpoint("pretimeout_flush")
                break
            batch = distill.sample_batch(volumes, state.step, cfg, seed=self.config.seed)
            self.journal.record("DISTILLATION_BATCH_BEGIN", "distillation", {"step": state.step + 1, "patches": int(batch["image"].shape[0]), "covered": int(batch["covered"].sum())})
            terms = distill.train_step(state, batch, cfg)
            self.journal.record("DISTILLATION_LOSS_STEP", "distillation", {"step": state.step, "total": terms["total"], "label": terms["label"], "teacher": terms["teacher"]})
            self.journal.record("DISTILLATION_STUDENT_UPDATE", "distillation", {"step": state.step, "lr": terms["lr"], "grad_norm": terms["grad_norm"]})
            self.journal.record("DISTILLATION_BATCH_END", "distillation", {"step": state.step})
            bar.update(1)
            self.progress.set("distillation", state.step / max(1, cfg.steps))
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                self.write_checkpoint("distillation_milestone")
                self.journal.record("DISTILLATION_CHECKPOINT_WRITTEN", "distillation", {"step": state.step})
            self.report()
        bar.close()
        if state.step == 0 and stopped is None:
            raise distill.DistillationNotExecuted("no optimiser step ran", expected=f"{cfg.steps} steps", found="0 steps", hint="set distill.steps > 0 or distill.enabled = false")
        after = agreement()
        self.journal.record(
            "DISTILLATION_END",
            "distillation",
            {"steps": state.step, "stopped": stopped, "teacher_coverage_percent": coverage, "agreement_before": before, "agreement_after": after},
        )
        self.end_phase("distillation", {"steps": state.step})

    # ------------------------------------------------------------------ segmentation

    def _probability_sources(self) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        """Learned probability maps available to segment with: search model, ensemble, student."""
        feats, seg = self.config.features, self.config.segment
        out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        if self.search is not None and (self.search.best or self.search.epoch_results):
            best = self.search.top_models(1)
            out[SEARCH_MODEL] = lambda vol: probability(vol, best["thetas"], best["mean"], best["std"], feats, device=self.device)
            out[ENSEMBLE] = self._ensemble_probability()
        if self.distill_state is not None and self.distill_state.step > 0:
            network = distill.student_network(self.distill_state)
            out[STUDENT] = lambda vol: sliding_window(vol, network, patch=self.config.distill.patch, overlap=seg.overlap, flip_tta=seg.flip_tta, device=self.distill_device)
        return out

    def _validation_volumes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(image, label) of the validation volumes segmentation is chosen on, read once per run."""
        if self._validation is None:
            self._validation = [read_pair(p.image, p.label) for p in self.val_pairs[: self.config.segment.validation_volumes]]
        return self._validation

    def _validation_probabilities(
        self, name: str, predict: Callable[[str, np.ndarray], np.ndarray | None], *, keep: bool
    ) -> tuple[list[np.ndarray | None], float]:
        """``predict(id, image)`` on the validation volumes and its seconds per voxel.

        Computed once per name: distillation keeps its teachers' entries (``keep``),
        the segmenter choice takes an entry out when there is one — the ensemble is
        both a teacher and a source under the same name — and otherwise computes
        without keeping, so only one source's maps are held at a time.
        """
        cached = self._validation_probs.get(name) if keep else self._validation_probs.pop(name, None)
        if cached is None:
            volumes = self._validation_volumes()
            pairs = self.val_pairs[: len(volumes)]
            t0 = time.perf_counter()
            probs = [predict(p.id, image) for p, (image, _) in zip(pairs, volumes)]
            cached = (probs, (time.perf_counter() - t0) / max(1, sum(image.size for image, _ in volumes)))
            if keep:
                self._validation_probs[name] = cached
        return cached

    def _ensemble_probability(self) -> Callable[[np.ndarray], np.ndarray]:
        assert self.search is not None
        top = self.search.top_models(self.config.distill.ensemble_k)
        return lambda vol: probability(vol, top["thetas"], top["mean"], top["std"], self.config.features, device=self.device)

    def choose_segmenter(self) -> tuple[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None, dict[str, Any]]], dict[str, float]]:
        """Score every segmenter on validation volumes by the competition metric (post-processing tuned per source); pick the best.

        Journals ``VALIDATION_REPORT`` (baseline, best search candidate, ensemble,
        student, and each external teacher that covers the validation volumes) and
        ``SEGMENTER_CHOICE``.
        """
        seg = self.config.segment
        sources = self._probability_sources()
        names = [BASELINE] + list(sources)
        if seg.method != "auto":
            wanted = {"baseline": BASELINE, "search": SEARCH_MODEL, "ensemble": ENSEMBLE, "student": STUDENT}[seg.method]
            if wanted not in names:
                raise Nx46Error("segmenter unavailable", expected=f"one of {names}", found=seg.method, hint="train the model it needs first")
            names = [wanted]
        val = self.val_pairs[: seg.validation_volumes]
        volumes = self._validation_volumes()
        scores: dict[str, float] = {}
        seconds_per_voxel: dict[str, float] = {}
        params: dict[str, PostParams] = {name: PostParams(min_component=seg.min_component_voxels) for name in sources}
        if volumes:
            labels = [lab for _, lab in volumes]
            voxels = sum(lab.size for lab in labels)
            if BASELINE in names:
                t0 = time.perf_counter()
                masks = [intensity_baseline(img, seg) for img, _ in volumes]
                seconds_per_voxel[BASELINE] = (time.perf_counter() - t0) / voxels
                scores[BASELINE] = float(np.mean([score_volume(mask, lab).score for mask, lab in zip(masks, labels)]))
            for name in names:
                if name in sources:
                    source = sources[name]
                    probs, seconds_per_voxel[name] = self._validation_probabilities(name, lambda _id, vol, source=source: source(vol), keep=False)
                    params[name], scores[name] = tune_postprocess(list(zip(probs, labels)), seg)
            teacher_scores = {}
            for teacher, probs in self.teacher_val_probs.items():
                if probs is not None:  # the ensemble teacher is the ensemble source: its score is already tuned
                    teacher_scores[teacher] = scores[teacher] if teacher in scores else tune_postprocess(list(zip(probs, labels)), seg)[1]
            self.journal.record(
                "VALIDATION_REPORT",
                "segmentation",
                {"volumes": [p.id for p in val], "scores": scores, "teachers": teacher_scores, "params": {k: v.to_dict() for k, v in params.items() if k in scores}},
            )
        self._validation, self._validation_probs = None, {}  # test segmentation needs neither
        # The submission must exist before the deadline: only segmenters whose measured cost fits the time left.
        predicted = {k: v * self.test_voxels * self.config.budget.reserve_safety for k, v in seconds_per_voxel.items()}
        time_left = self.governor.remaining() - self.governor.margin()
        feasible = [k for k in names if predicted.get(k, 0.0) <= time_left] or [BASELINE if BASELINE in names else min(names, key=lambda k: predicted.get(k, 0.0))]
        preference = [STUDENT, ENSEMBLE, SEARCH_MODEL, BASELINE]  # ties (and no validation) favour the more trained model
        chosen = max(feasible, key=lambda k: (scores.get(k, -1.0), -preference.index(k)))
        self.journal.record(
            "SEGMENTER_CHOICE",
            "segmentation",
            {
                "chosen": chosen,
                "validation_scores": scores,
                "params": params[chosen].to_dict() if chosen in params else None,
                "predicted_test_seconds": predicted,
                "time_left_s": None if time_left == float("inf") else time_left,
                "excluded_for_time": sorted(set(names) - set(feasible)),
            },
        )
        if chosen == BASELINE:
            return chosen, lambda vol: (intensity_baseline(vol, seg), None, {}), scores
        source, chosen_params = sources[chosen], params[chosen]

        def segment(vol: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
            prob = source(vol)
            mask, info = postprocess(prob, chosen_params, seg)
            return mask, prob, info

        return chosen, segment, scores

    def segment_and_package(self) -> tuple[Path, str, dict[str, float]]:
        self.phase("segmentation")
        name, fn, scores = self.choose_segmenter()
        masks: dict[str, bytes] = {}
        shapes: dict[str, tuple[int, int, int]] = {}
        previews = self.output / "previews"
        previews.mkdir(exist_ok=True)
        from tqdm.auto import tqdm

        for done, test in enumerate(tqdm(self.discovery.test, desc="segmentation", unit="vol", disable=None, leave=False), start=1):
            t0 = time.perf_counter()
            volume = read_volume(test.image)
            self.count_volume(volume.shape)
            mask, prob, info = fn(volume)
            masks[test.id] = encode_mask(mask)
            shapes[test.id] = volume.shape
            self.stats["volumes"][test.id] = mask_stats(mask, prob)
            reports.write_slice_preview(previews / f"{test.id}.png", volume, mask)
            self.journal.record(
                "VOLUME_SEGMENTED",
                "segmentation",
                {"id": test.id, "segmenter": name, "shape": list(volume.shape), "positive_fraction": float(mask.mean()), **info, "seconds": round(time.perf_counter() - t0, 4)},
            )
            self.progress.set("segmentation", done / len(self.discovery.test))
            self.report()
        self.end_phase("segmentation", {"segmenter": name})
        self.phase("packaging")
        submission = self.output / "submission.zip"
        write_submission(submission, masks)
        summary = validate_submission(submission, shapes)
        self.journal.record("SUBMISSION_WRITTEN", "packaging", {"path": str(submission), "volumes": summary, "sha256": file_sha256(submission)})
        return submission, name, scores


    def finish(self, result: RunResult) -> None:
        """Close packaging with the training curve, then write the post-mortem and the profile."""
        assert self.journal is not None
        if self.search is not None and self.search.history:
            reports.write_curve(self.output / "previews" / "training_curve.png", [h["best_objective"] for h in self.search.history])
        self.end_phase("packaging", {"submission": str(result.submission)})
        phase_seconds = self.governor.phase_seconds()
        wall = time.monotonic() - self.wall_start
        latest = ckpt.list_checkpoints(self.output / "checkpoints")
        write_json_atomic(
            self.output / "postmortem.json",
            reports.postmortem(
                dict(result.to_dict(), cumulative_phase_seconds=self.governor.cumulative_seconds()),
                phase_fractions=self.progress.fractions,
                phase_seconds=phase_seconds,
                latest_checkpoint=str(latest[-1]) if latest else None,
            ),
        )
        search = self.search
        profile = reports.profile_summary(
            wall_s=wall,
            phase_seconds=phase_seconds,
            journal_s=self.journal.write_seconds,
            io_s=self.io_seconds,
            journal_events=self.journal.events,
            candidate_iterations=(search.candidate_iterations - self._session_iters_start) if search else 0,
            search_s=phase_seconds.get("search", 0.0),
            resumed_rate=self.resumed_rate,
        )
        write_json_atomic(self.output / "RUN_PROFILE_SUMMARY.json", profile)
        self.journal.record("RUN_PROFILE_SUMMARY", "packaging", profile)
        self.publish()

    def publish(self) -> None:
        """Upload the latest committed checkpoint as a Kaggle Model when configured; journal why not otherwise."""
        assert self.journal is not None
        handle = self.config.publish.model_handle
        committed = [p for p in ckpt.list_checkpoints(self.output / "checkpoints") if ckpt.is_committed(p)]
        reason = None
        if not handle:
            reason = "publish.model_handle is not set"
        elif self.config.profile == "kaggle-submit":
            reason = "never under kaggle-submit"
        elif not committed:
            reason = "no committed checkpoint"
        else:
            try:
                import kagglehub
            except ImportError:
                reason = "kagglehub is not importable"
        if reason is not None:
            self.journal.record("PUBLISH_SKIPPED", "packaging", {"reason": reason, "model_handle": handle})
            return
        try:
            kagglehub.model_upload(handle, str(committed[-1]), version_notes=self.config.publish.version_notes)
        except Exception as exc:  # an upload failure must never cost the submission
            self.journal.record("PUBLISH_SKIPPED", "packaging", {"reason": f"upload failed: {type(exc).__name__}: {exc}", "model_handle": handle})
            return
        self.journal.record("PUBLISH_OK", "packaging", {"model_handle": handle, "checkpoint": str(committed[-1])})


RESULT_MEMBERS = [
    "journal.jsonl",
    "checkpoints",
    "postmortem.json",
    "RUN_PROFILE_SUMMARY.json",
    "GLOBAL_STATS.json",
    "roadmap_realtime.json",
    "previews",
    "submission.zip",
]


def _version() -> str:
    from . import __version__

    return __version__


def run(
    input_roots: Iterable[str | os.PathLike[str]] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
    resume: str = "auto",
    config: RunConfig | None = None,
) -> RunResult:
    """Run the whole pipeline and return where everything is.

    Parameters
    ----------
    input_roots : paths, optional
        Folders to search for the competition data and for previous runs'
        checkpoints (default: every folder under ``/kaggle/input``).
    output : path, optional
        Output folder (default ``/kaggle/working`` on Kaggle, ``./nx46vx-output`` elsewhere).
    profile, config_file, overrides
        See :func:`nx46vx.config.load_config`; ignored when ``config`` is given.
    resume : ``auto`` | ``never`` | path
        ``auto`` resumes the newest compatible checkpoint found in the output
        folder or any input root; a path names a checkpoint, run folder or
        ``results.zip``.

    Returns
    -------
    RunResult
    """
    config = config or load_config(profile, config_file=config_file, overrides=overrides)
    out = Path(output) if output is not None else default_output()
    roots = [Path(p) for p in input_roots] if input_roots is not None else None
    state = _Run(config, out, roots, resume)
    state.start()
    try:
        state.discover()
        link = state.choose_checkpoint()
        state.open_journal(link)
        journal = state.journal
        assert journal is not None
        state.end_phase("discovery", {"train": len(state.train_pairs), "val": len(state.val_pairs), "test": len(state.discovery.test)})

        if state.train_pairs and state.val_pairs:
            state.phase("features")
            train_pools, val_pools = state.load_features()
            state.end_phase("features", state.feature_stats)
            state.phase("search")
            state.run_search(train_pools, val_pools)
            state.end_phase("search", {"cursor": state.search.cursor(), "iterations": state.search.iterations_done})
            state.run_distillation()
        else:
            journal.record("SEARCH_SKIPPED", "search", {"reason": "fewer than two training volumes", "train_pairs": len(state.discovery.train)})
            state.progress.set("search", 1.0)  # nothing to train
            if state.resumed is None:
                state.write_checkpoint("no_search")
        submission, segmenter, scores = state.segment_and_package()
        stop = state.governor.stop_reason
        status = {"deadline": "stopped_by_deadline", "signal": "stopped_by_signal", None: "complete"}[stop]
        cursor = state.search.cursor() if state.search else {"epoch": 0, "candidate": 0, "iter": 0}
        digest = model_digest(state.search, state.distill_state)
        result = RunResult(
            status=status,
            stop_reason=stop,
            output_dir=out,
            submission=submission,
            journal=out / "journal.jsonl",
            run_id=state.run_id,
            cursor=cursor,
            model_digest=digest,
            segmenter=segmenter,
            validation_scores=scores,
            resumed_from=str(state.resumed["path"]) if state.resumed else None,
            wall_s=time.monotonic() - state.wall_start,
        )
        state.finish(result)
        journal.merkle_root("packaging")
        journal.record("RUN_END", "run", {"status": status, "stop_reason": stop, "model_digest": digest, "cursor": cursor, "wall_s": round(result.wall_s, 3)})
        journal.close()
        write_results_zip(out / "results.zip", out, RESULT_MEMBERS)
        return result
    finally:
        state.governor.restore_signal_handlers()
        if state.journal is not None:
            state.journal.close()
