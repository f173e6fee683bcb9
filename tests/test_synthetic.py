"""The synthetic data's ``real`` style has the competition data's properties (DESIGN.md) the others lack."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from nx46vx.synthetic import BORDER, make_competition, make_volume, scanner_look
from nx46vx.volumes import read_volume


def _sheet_normal(image: np.ndarray) -> np.ndarray:
    """The dominant normal of the sheets (unit vector): the principal axis of the smoothed image's gradient structure tensor."""
    smooth = ndimage.gaussian_filter(image.astype(np.float32), 2.0)
    grads = np.stack([g.ravel() for g in np.gradient(smooth)])
    values, vectors = np.linalg.eigh(grads @ grads.T)
    return np.abs(vectors[:, -1])


def test_real_volumes_lie_at_any_orientation_with_sparse_labels_and_a_border(tmp_path: Path) -> None:
    root = make_competition(tmp_path / "data", n_train=6, n_test=3, shapes=((48, 48, 48), (40, 40, 40)), seed=0, style="real", unseen_test_scroll=True)
    labels = sorted((root / "train_labels").glob("*.tif")) + sorted((root / "test_labels").glob("*.tif"))
    normals = []
    for path in labels:
        label, image = read_volume(path), read_volume(path.parent.parent / path.parent.name.replace("labels", "images") / path.name)
        assert label.shape in ((48, 48, 48), (40, 40, 40)) and set(np.unique(label)) == {0, 1, 2}
        for axis in range(3):  # the 3-voxel border on every face is unlabeled
            assert (np.take(label, range(BORDER), axis=axis) == 2).all() and (np.take(label, range(label.shape[axis] - BORDER, label.shape[axis]), axis=axis) == 2).all()
        assert 0.6 <= (label == 2).mean() <= 0.85  # label 2 over most of the volume
        assert 0.02 <= (label == 1).sum() / (label != 2).sum() <= 0.35
        normals.append(_sheet_normal(image))
    # not along an axis, as the other styles' sheets are, and not all alike
    assert np.mean([n.max() < 0.95 for n in normals]) >= 0.5
    assert max(np.abs(a @ b) for a in normals for b in normals) > min(np.abs(a @ b) for a in normals for b in normals) + 0.2
    scroll = make_volume((48, 48, 48), np.random.default_rng(1), style="scroll").image
    assert _sheet_normal(scroll).max() > 0.95
    rows = {split: list(csv.DictReader(open(root / f"{split}.csv"))) for split in ("train", "test")}
    assert {r["scroll_id"] for r in rows["test"]} == {"6"} and "6" not in {r["scroll_id"] for r in rows["train"]}
    demo = make_competition(tmp_path / "demo", n_train=3, n_test=2, shapes=((24, 24, 24),), seed=0, unseen_test_scroll=True)  # any style
    assert {r["scroll_id"] for r in csv.DictReader(open(demo / "test.csv"))} == {"6"}


def test_a_scrolls_look_changes_the_image_and_not_the_geometry() -> None:
    look = scanner_look(np.random.default_rng(0))
    dark, bright = replace(look, background=30.0, papyrus=120.0), replace(look, background=90.0, papyrus=220.0)
    first, second = (make_volume((40, 40, 40), np.random.default_rng(5), style="real", look=which) for which in (dark, bright))
    assert np.array_equal(first.label, second.label)
    assert np.median(second.image) - np.median(first.image) > 40
    again = make_volume((40, 40, 40), np.random.default_rng(5), style="real", look=dark)
    assert np.array_equal(again.image, first.image)
