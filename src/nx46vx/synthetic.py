"""Scroll-like synthetic volumes in the competition layout, for the demo and the tests.

Each volume holds several wavy papyrus sheets (thin bright layers whose height
varies smoothly across the plane), some pairs touching, some sheets with holes,
oriented along a random axis, blurred and noisy like a CT chunk. Labels follow the
competition: 0 background, 1 sheet, 2 unlabeled (everything outside a random
labelled box, about half of the volume). Everything is deterministic from a seed.

``style="scroll"`` is harder and closer to the real data: thick sheets whose label
is only a thin surface layer (so a brightness threshold over-segments), sheets
that touch face to face, holes, an extra unlabeled slab, stronger blur and noise.

``style="real"`` models the properties of the competition's data (DESIGN.md): the
sheets are windings of a rolled scroll — concentric wavy shells around an axis of any
orientation outside the chunk, so they lie at every orientation and curve — thick in
the image with a thin labelled surface, one pair touching, holes; each scroll has its
own scanner look (:class:`ScannerLook`: levels, contrast, blur, noise, drift), drawn
once per scroll by :func:`make_competition`; label 2 covers about 70 % of a volume
(outside a labelled box) and a 3-voxel border on every face.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile
from scipy import ndimage

Shape = tuple[int, int, int]

DEFAULT_SHAPES: tuple[Shape, ...] = ((48, 48, 48), (56, 48, 40), (40, 56, 48), (48, 40, 56))


@dataclass(frozen=True)
class SyntheticVolume:
    """One generated chunk: ``image`` and ``label`` are uint8 arrays of shape (z, y, x)."""

    image: np.ndarray
    label: np.ndarray


STYLES = {
    # thickness of a sheet in the image, of its label, gap of the touching pair, blur sigma, noise sigma
    "demo": {"sheet": (1.5, 2.5), "label": None, "touch": (2.0, 3.0), "blur": (0.8, 1.2), "noise": (10, 16), "slab": False},
    "scroll": {"sheet": (4.5, 7.0), "label": (1.5, 2.0), "touch": (5.0, 6.0), "blur": (1.0, 1.5), "noise": (14, 22), "slab": True},
}


def _sheet_heights(rng: np.random.Generator, depth: int, width: int, normal: int, n_sheets: int, touch: tuple[float, float]) -> list[np.ndarray]:
    """Height fields (depth, width) of ``n_sheets`` wavy sheets plus one that follows a neighbour at a gap drawn from ``touch``."""
    a, c = np.meshgrid(np.arange(depth), np.arange(width), indexing="ij")
    spacing = normal / (n_sheets + 1)
    heights = []
    for offset in [spacing * (i + 1) + rng.uniform(-0.2, 0.2) * spacing for i in range(n_sheets)]:
        amp1, amp2 = rng.uniform(0.5, max(0.6, 0.25 * spacing)), rng.uniform(0.3, max(0.4, 0.2 * spacing))
        lam1, lam2 = rng.uniform(0.6, 1.5) * depth, rng.uniform(0.6, 1.5) * width
        ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
        heights.append(offset + amp1 * np.sin(2 * np.pi * a / lam1 + ph1) + amp2 * np.sin(2 * np.pi * c / lam2 + ph2))
    # One sheet follows its neighbour closely so the two touch along the crests.
    k = int(rng.integers(0, n_sheets))
    heights.append(heights[k] + rng.uniform(*touch) + 1.5 * np.sin(2 * np.pi * c / max(width, 1)))
    return heights


def make_volume(shape: Shape, rng: np.random.Generator, *, n_sheets: int = 4, style: str = "demo", look: ScannerLook | None = None) -> SyntheticVolume:
    """Generate one scroll-like chunk.

    Parameters
    ----------
    shape : (z, y, x)
        Output shape.
    rng : numpy Generator
        Source of every random draw.
    n_sheets : int
        Number of sheets (one extra sheet touching another is added).
    style : ``demo``, ``scroll`` or ``real``
        See the module docstring (``real`` ignores ``n_sheets``: the chunk holds the windings that cross it).
    look : ScannerLook, optional
        The scroll's scanner look of a ``real`` volume (drawn from ``rng`` when not given).

    Returns
    -------
    SyntheticVolume
        uint8 image (z, y, x) and uint8 label (z, y, x) with values {0, 1, 2}.
    """
    if style == "real":
        return _real_volume(shape, rng, look if look is not None else scanner_look(rng))
    st = STYLES[style]
    axis = int(rng.integers(0, 3))
    # Build with the sheet normal along axis 1 of a working shape, then move it.
    work = list(shape)
    work[1], work[axis] = work[axis], work[1]
    depth, normal, width = work
    a, c = np.meshgrid(np.arange(depth), np.arange(width), indexing="ij")
    ys = np.arange(normal)[None, :, None]
    sheet_mask = np.zeros(work, dtype=bool)
    label_mask = np.zeros(work, dtype=bool)
    for i, h in enumerate(_sheet_heights(rng, depth, width, normal, n_sheets, st["touch"])):
        thickness = rng.uniform(*st["sheet"])
        distance = np.abs(ys - h[:, None, :])
        layer = distance <= thickness / 2
        surface = distance <= (rng.uniform(*st["label"]) / 2 if st["label"] else thickness / 2)
        if i % 2 == 1:  # every other sheet has a hole
            ca, cc = rng.uniform(0.25, 0.75) * depth, rng.uniform(0.25, 0.75) * width
            radius = rng.uniform(0.08, 0.15) * min(depth, width)
            hole = (a - ca) ** 2 + (c - cc) ** 2 <= radius**2
            layer &= ~hole[:, None, :]
            surface &= ~hole[:, None, :]
        sheet_mask |= layer
        label_mask |= surface
    sheet_mask = np.ascontiguousarray(np.swapaxes(sheet_mask, 1, axis))
    label_mask = np.ascontiguousarray(np.swapaxes(label_mask, 1, axis))

    background, papyrus = rng.uniform(40, 70), rng.uniform(150, 190)
    image = np.where(sheet_mask, papyrus, background).astype(np.float32)
    image += ndimage.gaussian_filter(rng.normal(0, 12, shape).astype(np.float32), 4) * 3  # slow density drift
    image = ndimage.gaussian_filter(image, rng.uniform(*st["blur"]))
    image += rng.normal(0, rng.uniform(*st["noise"]), shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    label = label_mask.astype(np.uint8)
    lo = [int(rng.integers(0, max(1, s // 5))) for s in shape]
    hi = [lo[i] + int(shape[i] * rng.uniform(0.7, 0.8)) for i in range(3)]
    labelled = np.zeros(shape, dtype=bool)
    labelled[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    if st["slab"]:  # an unlabeled slab across the labelled box, as annotators leave them
        slab_axis, size = int(rng.integers(0, 3)), shape[0] // 6
        start = int(rng.integers(0, max(1, shape[slab_axis] - size)))
        index = [slice(None)] * 3
        index[slab_axis] = slice(start, start + size)
        labelled[tuple(index)] = False
    label[~labelled] = 2
    return SyntheticVolume(image=image, label=label)


@dataclass(frozen=True)
class ScannerLook:
    """How one scroll's scan looks: the background and papyrus levels, blur and noise sigmas, slow density drift."""

    background: float
    papyrus: float
    blur: float
    noise: float
    drift: float


def scanner_look(rng: np.random.Generator) -> ScannerLook:
    """A scanner look as the competition's scrolls differ (two beamlines, per-scroll contrast and noise)."""
    background = rng.uniform(25, 95)
    return ScannerLook(background=background, papyrus=min(250.0, background + rng.uniform(55, 140)), blur=rng.uniform(0.8, 1.6),
                       noise=rng.uniform(8, 26), drift=rng.uniform(1.0, 4.0))


#: The label-2 border on every face of a ``real`` volume, in voxels (the competition's).
BORDER = 3


def _winding_coordinates(shape: Shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each voxel's radius from a random scroll axis outside the chunk, its arc length around it and position along it (float32 arrays of ``shape``)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    across = np.cross(axis, rng.normal(size=3))
    across /= np.linalg.norm(across)
    radius = rng.uniform(1.2, 3.0) * max(shape)  # the chunk sees gently curved windings
    centre = (np.asarray(shape, np.float64) - 1) / 2 - radius * across
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), axis=-1) - centre.astype(np.float32)
    along = grid @ axis.astype(np.float32)
    radial = grid - along[..., None] * axis.astype(np.float32)
    r = np.linalg.norm(radial, axis=-1)
    other = np.cross(axis, across).astype(np.float32)
    theta = np.arctan2(radial @ other, radial @ across.astype(np.float32))
    return r, (theta * radius).astype(np.float32), along


def _real_volume(shape: Shape, rng: np.random.Generator, look: ScannerLook) -> SyntheticVolume:
    """One ``real``-style chunk (module docstring): windings at any orientation, ``look``'s scanner, sparse labels."""
    r, arc, along = _winding_coordinates(shape, rng)
    spacing, thickness, surface = rng.uniform(8.0, 12.0), rng.uniform(4.0, 6.0), rng.uniform(1.5, 2.0)
    first, last = int(np.floor(r.min() / spacing)) - 1, int(np.ceil(r.max() / spacing)) + 1
    touching = int(rng.integers(first, last))
    sheet_mask, label_mask = np.zeros(shape, bool), np.zeros(shape, bool)
    for k in range(first, last + 1):
        wave = rng.uniform(0.5, 2.0) * np.sin(2 * np.pi * arc / rng.uniform(40, 120) + rng.uniform(0, 2 * np.pi))
        wave += rng.uniform(0.3, 1.5) * np.sin(2 * np.pi * along / rng.uniform(40, 120) + rng.uniform(0, 2 * np.pi))
        shift = -(spacing - thickness - rng.uniform(0.0, 1.0)) if k == touching + 1 else 0.0  # this winding lies on the previous one
        distance = np.abs(r - (k * spacing + shift + wave))
        layer, labelled_layer = distance <= thickness / 2, distance <= surface / 2
        if rng.random() < 0.4:  # a hole through this winding
            hole = (arc - rng.uniform(arc.min(), arc.max())) ** 2 + (along - rng.uniform(along.min(), along.max())) ** 2 <= (rng.uniform(0.08, 0.18) * min(shape)) ** 2
            layer &= ~hole
            labelled_layer &= ~hole
        sheet_mask |= layer
        label_mask |= labelled_layer
    image = np.where(sheet_mask, look.papyrus, look.background).astype(np.float32)
    image += ndimage.gaussian_filter(rng.normal(0, 12, shape).astype(np.float32), 4) * look.drift
    image = ndimage.gaussian_filter(image, look.blur)
    image += rng.normal(0, look.noise, shape).astype(np.float32)
    label = label_mask.astype(np.uint8)
    known = np.zeros(shape, bool)
    size = [int(n * rng.uniform(0.6, 0.75)) for n in shape]  # ~30 % of the volume is annotated
    lo = [int(rng.integers(BORDER, max(BORDER + 1, n - BORDER - s))) for n, s in zip(shape, size)]
    known[tuple(slice(a, a + s) for a, s in zip(lo, size))] = True
    border = tuple(slice(BORDER, n - BORDER) for n in shape)
    inner = np.zeros(shape, bool)
    inner[border] = True
    label[~(known & inner)] = 2
    return SyntheticVolume(image=np.clip(np.rint(image), 0, 255).astype(np.uint8), label=label)


def write_tiff(path: str | os.PathLike[str], volume: np.ndarray) -> None:
    """Write a (z, y, x) uint8 volume as a multi-page LZW TIFF (one page per z), like the competition."""
    tifffile.imwrite(path, volume, photometric="minisblack", compression="lzw")


def make_competition(
    root: str | os.PathLike[str],
    *,
    n_train: int = 6,
    n_test: int = 2,
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    seed: int = 0,
    with_test_labels: bool = True,
    style: str = "demo",
    unseen_test_scroll: bool = False,
) -> Path:
    """Write a small dataset in the competition layout under ``root``.

    Layout: ``train.csv`` and ``test.csv`` (``id,scroll_id``), ``train_images/``,
    ``train_labels/``, ``test_images/`` (``<id>.tif``), and, when
    ``with_test_labels``, ``test_labels/`` holding the hidden truth so a demo
    submission can be scored. Shapes cycle through ``shapes``; ``style`` as in
    :func:`make_volume`. Volumes are of scrolls 1–5; ``unseen_test_scroll`` puts every
    test volume in scroll 6, which no training volume is of. A ``real`` dataset draws
    one :class:`ScannerLook` per scroll and each volume's scroll before the volume.

    Returns
    -------
    Path
        ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub in ("train_images", "train_labels", "test_images") + (("test_labels",) if with_test_labels else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = rng.choice(np.arange(100_000, 3_000_000), size=n_train + n_test, replace=False)
    rows: dict[str, list[tuple[int, int]]] = {"train": [], "test": []}
    looks = {scroll: scanner_look(np.random.default_rng([seed, scroll])) for scroll in range(1, 7)} if style == "real" else {}

    def scroll_of(split: str) -> int:
        return 6 if split == "test" and unseen_test_scroll else int(rng.integers(1, 6))

    for i, vol_id in enumerate(int(v) for v in ids):
        split = "train" if i < n_train else "test"
        shape = tuple(shapes[i % len(shapes)])
        if style == "real":  # the scroll first: its look makes the volume
            scroll = scroll_of(split)
            vol = make_volume(shape, rng, style=style, look=looks[scroll])
        else:
            vol = make_volume(shape, rng, style=style)
        write_tiff(root / f"{split}_images" / f"{vol_id}.tif", vol.image)
        if split == "train":
            write_tiff(root / "train_labels" / f"{vol_id}.tif", vol.label)
        elif with_test_labels:
            write_tiff(root / "test_labels" / f"{vol_id}.tif", vol.label)
        if style != "real":  # drawn after the volume, so the demo and scroll datasets of a seed stay what they were
            scroll = scroll_of(split)
        rows[split].append((vol_id, scroll))
    for split, items in rows.items():
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "scroll_id"])
            writer.writerows(items)
    return root
