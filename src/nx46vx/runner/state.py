"""``RunState``: the only hand-off between phases.

A phase reads what the phases before it left here and adds what it produced. What a
resumed run needs comes back through each phase's ``load_state_dict``, never
through this object: it is rebuilt in every session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from ..discovery import Discovery, TrainPair
    from ..distill import DistillState
    from ..features import Pool
    from ..metric import Truth
    from ..search import CandidateSearch

#: A segmenter maps a uint8 volume (z, y, x) to (mask uint8 (z, y, x), probability or None, info).
Segmenter = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray | None, dict[str, Any]]"]


@dataclass
class RunState:
    """What phases hand to each other in one session.

    Attributes
    ----------
    discovery : Discovery
        Inputs found by the discovery phase.
    train_pairs, val_pairs : list of TrainPair
        The seeded split by scroll, by volume without two scrolls (validation never trains).
    volume_keys : dict id → str
        Content key of each training pair (:func:`~nx46vx.volumes.volume_key` of image and label): names cache entries.
    test_keys : dict id → str
        Content key of each test image that passed the discovery check (a kept mask is reused only under the same key).
    shapes : dict id → (z, y, x)
        Shape of each test volume (a rejected one's empty mask included).
    test_voxels : int
        Voxels of every test volume together (sizes the segmentation reserve).
    pools : dict id → Pool
        Labelled voxels with features, of the volumes the features phase chose (the search trains on them).
    search : CandidateSearch or None
    student : DistillState or None
    teacher_val_probs : dict spec → list of ndarray or None
        Each teacher's probability maps on the validation volumes (None where it has none).
    validation : list of (image, label) or None
        The decoded validation volumes, kept while a phase still validates on them.
    validation_pairs : list of TrainPair
        The validation volumes that score (enough surface voxels, at most ``segment.validation_volumes``).
    validation_truths : list of Truth or None
        Their prepared truths for :func:`~nx46vx.metric.score_volume`.
    validation_probs : dict source → (maps, seconds per voxel)
        Each probability source's validation maps, computed once for the student's and the segmenter's choices.
    test_prices : dict source → float
        Seconds per test voxel of a source priced on its windows over the test volumes by the phase that trained it
        (the student's). The segmenter choice holds it over its own measurement on the validation volumes, which
        pays a whole window for a volume smaller than one.
    baseline_masks : dict id → Path
        The intensity baseline's mask file per test volume (the first submission and the fallback).
    masks : dict id → Path
        The mask file per test volume of the submitted segmentation.
    rejected_tests : dict id → str
        Test volumes that failed the discovery check under ``data.on_bad_test = "empty"``
        (their mask stays empty), with the reason.
    segmenter : str
        Name of the segmenter the submission came from.
    validation_scores : dict name → float
    unfinished : list of str
        Training phases a time limit cut short (the next session continues them).
    advanced : set of str
        Training phases that did work in this session (a kept result downstream of them is stale).
    submission : Path or None
        The ``submission.zip`` published last.
    resumed_from : str or None
        The checkpoint this session resumed from.
    """

    discovery: "Discovery | None" = None
    train_pairs: "list[TrainPair]" = field(default_factory=list)
    val_pairs: "list[TrainPair]" = field(default_factory=list)
    volume_keys: dict[str, str] = field(default_factory=dict)
    test_keys: dict[str, str] = field(default_factory=dict)
    test_voxels: int = 0
    pools: "dict[str, Pool]" = field(default_factory=dict)
    search: "CandidateSearch | None" = None
    student: "DistillState | None" = None
    teacher_val_probs: dict[str, "list[np.ndarray] | None"] = field(default_factory=dict)
    validation: "list[tuple[np.ndarray, np.ndarray]] | None" = None
    validation_pairs: "list[TrainPair]" = field(default_factory=list)
    validation_truths: "list[Truth] | None" = None
    validation_probs: dict[str, "tuple[list[np.ndarray | None], float]"] = field(default_factory=dict)
    test_prices: dict[str, float] = field(default_factory=dict)
    baseline_masks: dict[str, Path] = field(default_factory=dict)
    masks: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    rejected_tests: dict[str, str] = field(default_factory=dict)
    segmenter: str = ""
    validation_scores: dict[str, float] = field(default_factory=dict)
    unfinished: list[str] = field(default_factory=list)
    advanced: set[str] = field(default_factory=set)
    submission: Path | None = None
    resumed_from: str | None = None

    @property
    def trainable(self) -> bool:
        """A search (and a student) need at least one training and one validation volume."""
        return bool(self.train_pairs and self.val_pairs)
