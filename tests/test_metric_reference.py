"""``nx46vx.metric`` against the competition's metric rebuilt from reference parts (:mod:`tests.reference_metric`), on 220 volumes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nx46vx.metric import Truth, score_volume
from nx46vx.synthetic import make_volume

from .reference_metric import reference_score, require_reference_module

N_CASES = 220
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # surface_distance imports from scipy's old namespaces


@pytest.fixture(scope="module")
def betti_matching():
    return require_reference_module()


def _blobs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.8, 2.5)) > rng.uniform(0.45, 0.55)


def _sheets(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    label = make_volume(tuple(int(s) for s in shape), rng, n_sheets=int(rng.integers(1, 4)), style=str(rng.choice(["demo", "scroll"]))).label
    return label == 1


def _perturbed(rng: np.random.Generator, truth: np.ndarray, kind: str) -> np.ndarray:
    if kind == "shift":
        return np.roll(truth, int(rng.choice([-1, 1])), axis=int(rng.integers(3)))
    if kind == "erode":
        return ndimage.binary_erosion(truth)
    if kind == "dilate":
        return ndimage.binary_dilation(truth)
    if kind == "holes":
        return truth & ~(ndimage.binary_dilation(rng.random(truth.shape) > 0.995, iterations=1))
    if kind == "cut":
        cut = truth.copy()
        axis, at = int(rng.integers(3)), int(rng.integers(truth.shape[int(rng.integers(3))] or 1))
        index = [slice(None)] * 3
        index[axis] = slice(at % truth.shape[axis], at % truth.shape[axis] + 2)
        cut[tuple(index)] = False
        return cut
    if kind == "noise":
        return truth ^ (rng.random(truth.shape) > 0.97)
    if kind == "empty":
        return np.zeros_like(truth)
    if kind == "full":
        return np.ones_like(truth)
    if kind == "other":
        return _blobs(rng, truth.shape)
    raise AssertionError(kind)


KINDS = ("shift", "erode", "dilate", "holes", "cut", "noise", "empty", "full", "other")


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, labels 0/1/2) of case ``seed``: shapes, truths, perturbations and label-2 layouts by turn."""
    rng = np.random.default_rng(1000 + seed)
    if seed % 11 == 0:  # an axis shorter than 2, or a very thin one
        shape = [int(rng.integers(6, 20)) for _ in range(3)]
        shape[int(rng.integers(3))] = int(rng.integers(1, 3))
    else:
        shape = [int(rng.integers(9, 34)) for _ in range(3)]  # odd and even: tiles of different sizes
    shape = tuple(shape)
    truth = _sheets(rng, shape) if seed % 2 == 0 and min(shape) >= 8 else _blobs(rng, shape)
    pred = _perturbed(rng, truth, KINDS[seed % len(KINDS)])
    labels = truth.astype(np.uint8)
    layout = seed % 4
    if layout == 1:  # the competition's 3-voxel unlabeled border
        inner = np.zeros(shape, bool)
        inner[tuple(slice(3, max(3, s - 3)) for s in shape)] = True
        labels[~inner] = 2
    elif layout == 2:  # an unlabeled slab
        axis = int(rng.integers(3))
        index = [slice(None)] * 3
        lo = int(rng.integers(0, shape[axis]))
        index[axis] = slice(lo, lo + max(1, shape[axis] // 3))
        labels[tuple(index)] = 2
    elif layout == 3:  # unlabeled over most of the volume, as in the real data
        box = tuple(slice(s // 4, s // 4 + max(1, s // 2)) for s in shape)
        outside = np.ones(shape, bool)
        outside[box] = False
        labels[outside] = 2
    return pred.astype(np.uint8), labels


@pytest.mark.parametrize("seed", range(N_CASES))
def test_the_score_equals_the_reference(seed: int, betti_matching) -> None:
    pred, labels = _case(seed)
    expected, counts = reference_score(pred, labels, betti_matching)
    got = score_volume(pred, labels)
    assert [list(row) for row in got.topo_counts] == counts.tolist()
    for key, value in expected.items():
        assert getattr(got, key) == pytest.approx(value, abs=1e-9, rel=0), key
    if seed % 10 == 0:  # a prepared truth scores like its labels
        assert score_volume(pred, Truth(labels)) == got


def test_the_cases_cover_what_they_claim() -> None:
    """Every kind of perturbation, label-2 layout, thin axis and odd shape is among the cases."""
    shapes = [_case(seed)[1].shape for seed in range(N_CASES)]
    assert any(min(s) == 1 for s in shapes) and any(s[0] % 2 == 1 and s[1] % 2 == 0 for s in shapes)
    assert {seed % len(KINDS) for seed in range(N_CASES)} == set(range(len(KINDS)))
    assert any(not _case(seed)[0].any() for seed in range(N_CASES)) and any(_case(seed)[0].all() for seed in range(N_CASES))
