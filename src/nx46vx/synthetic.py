"""Scroll-like synthetic volumes in the competition layout, for the demo and the tests.

Each volume holds several wavy papyrus sheets (thin bright layers whose height
varies smoothly across the plane), some pairs touching, some sheets with holes,
oriented along a random axis, blurred and noisy like a CT chunk. Labels follow the
competition: 0 background, 1 sheet, 2 unlabeled (everything outside a random
labelled box, about half of the volume). Everything is deterministic from a seed.

``style="scroll"`` is harder and closer to the real data: thick sheets whose label
is only a thin surface layer (so a brightness threshold over-segments), sheets
that touch face to face, holes, an extra unlabeled slab, stronger blur and noise.
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


def make_volume(shape: Shape, rng: np.random.Generator, *, n_sheets: int = 4, style: str = "demo") -> SyntheticVolume:
    """Generate one scroll-like chunk.

    Parameters
    ----------
    shape : (z, y, x)
        Output shape.
    rng : numpy Generator
        Source of every random draw.
    n_sheets : int
        Number of sheets (one extra sheet touching another is added).
    style : ``demo`` or ``scroll``
        See the module docstring.

    Returns
    -------
    SyntheticVolume
        uint8 image (z, y, x) and uint8 label (z, y, x) with values {0, 1, 2}.
    """
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
) -> Path:
    """Write a small dataset in the competition layout under ``root``.

    Layout: ``train.csv`` and ``test.csv`` (``id,scroll_id``), ``train_images/``,
    ``train_labels/``, ``test_images/`` (``<id>.tif``), and, when
    ``with_test_labels``, ``test_labels/`` holding the hidden truth so a demo
    submission can be scored. Shapes cycle through ``shapes``; ``style`` as in
    :func:`make_volume`.

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
    for i, vol_id in enumerate(int(v) for v in ids):
        split = "train" if i < n_train else "test"
        vol = make_volume(tuple(shapes[i % len(shapes)]), rng, style=style)
        write_tiff(root / f"{split}_images" / f"{vol_id}.tif", vol.image)
        if split == "train":
            write_tiff(root / "train_labels" / f"{vol_id}.tif", vol.label)
        elif with_test_labels:
            write_tiff(root / "test_labels" / f"{vol_id}.tif", vol.label)
        rows[split].append((vol_id, int(rng.integers(1, 6))))
    for split, items in rows.items():
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "scroll_id"])
            writer.writerows(items)
    return root
