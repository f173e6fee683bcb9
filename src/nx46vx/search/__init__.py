"""Prox-trained supervised search: datafit, penalties, batched FISTA solver, grid, sampling, epochs."""

from . import native
from .datafit import Logistic
from .engine import N_PARAMS, CandidateSearch, Standardiser, design_rows, penalised_mask, threshold_scan
from .fista import BatchedFISTA, Design, FistaState
from .grid import Candidate, make_grid
from .penalties import L1, L2

__all__ = [
    "BatchedFISTA",
    "Candidate",
    "CandidateSearch",
    "Design",
    "FistaState",
    "L1",
    "L2",
    "Logistic",
    "N_PARAMS",
    "Standardiser",
    "design_rows",
    "make_grid",
    "native",
    "penalised_mask",
    "threshold_scan",
]
