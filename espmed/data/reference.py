"""The reference task's real data: MNI152 brain slices and DSB-2018 nuclei, with fixed splits.

Brain (modality `brain-mri`): nilearn's MNI152 2009 T1 template at 1 mm (197x233x189) with its
brain mask, read from the installed nilearn package (no network). Axial slices z = 20..145 (brain
area >= ~4000 px); split by slice index so no slice is in two splits and every train slice is at
least 2 mm from any valid/test slice:
  test  z % 10 == 0,   valid z % 10 == 5,   train z % 10 in {2, 3, 7, 8}.
Unseen domain: coronal slices y % 10 == 0 with brain area >= 4000 px (the model trains on axial only).

Nuclei (modality `microscopy`): stardist's DSB-2018 512x512 image + instance mask, committed under
`espmed/assets/datasets/nuclei/`. Disjoint regions: train = left half (random crops), valid =
top-right quadrant, test = bottom-right quadrant (each as four 128x128 tiles).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import ImageReadError, require
from ..io import read_mask, read_pixels
from .sources import Sample, volume_slices

NUCLEI_DIR = Path(__file__).resolve().parents[1] / "assets" / "datasets" / "nuclei"
SPLITS = ("train", "valid", "test", "unseen")
_AXIAL_RANGE = range(20, 146)
_SPLIT_REMAINDERS = {"test": {0}, "valid": {5}, "train": {2, 3, 7, 8}}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ImageReadError(f"unknown reference split {split!r}; choose from {', '.join(SPLITS)}")


@lru_cache(maxsize=1)
def _mni152() -> tuple[np.ndarray, np.ndarray]:
    datasets = require("nilearn.datasets", "data", hint=" for the MNI152 reference data")
    t1 = datasets.load_mni152_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32) > 0
    return t1, brain


def mni152_slices(split: str, modality: str = "brain-mri") -> list[Sample]:
    """MNI152 T1 slices with the brain mask for one split (see the module docstring)."""
    _check_split(split)
    t1, brain = _mni152()
    if split == "unseen":
        area = brain.sum(axis=(0, 2))
        ys = [y for y in range(0, t1.shape[1], 10) if area[y] >= 4000]
        return volume_slices(t1, brain, 1, ys, modality=modality, name="mni152", domain="unseen")
    zs = [z for z in _AXIAL_RANGE if z % 10 in _SPLIT_REMAINDERS[split]]
    return volume_slices(t1, brain, 2, zs, modality=modality, name="mni152")


def nuclei_samples(split: str, modality: str = "microscopy") -> list[Sample]:
    """DSB-2018 nuclei for one split: the train region whole (crop it with augmentation), else tiles."""
    _check_split(split)
    if split == "unseen":
        return []
    image = read_pixels(NUCLEI_DIR / "dsb2018_img2d.png")
    mask = read_mask(NUCLEI_DIR / "dsb2018_mask2d.png")
    if split == "train":
        return [Sample("dsb2018_left", image[:, :256].copy(), mask[:, :256].copy(), modality)]
    r0 = 0 if split == "valid" else 256
    return [
        Sample(
            f"dsb2018_{split}_r{r}_c{c}",
            image[r : r + 128, c : c + 128].copy(),
            mask[r : r + 128, c : c + 128].copy(),
            modality,
        )
        for r in (r0, r0 + 128)
        for c in (256, 384)
    ]
