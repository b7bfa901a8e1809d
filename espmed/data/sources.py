"""Where segmentation samples come from: files on disk in the layouts espmed understands.

Every layout returns `Sample`s: a 2-D image (any dtype, gray or RGB), a boolean mask of the same
height and width, and the modality the dataset config declares (never guessed from file names).
Files are read by `espmed.io`'s checked readers, as stored (`read_pixels`, `read_mask`, `read_volume`).

Layouts:
- release: `<root>/image_<name>/`, `<root>/mask_<name>/` and `<root>/<name>_data_split.json` with
  `train` / `valid` / `test` lists of file names (the ESP-MedSAM release's layout);
- folder: an images folder and a masks folder, paired by file stem;
- csv: a CSV with `image` and `mask` columns (paths relative to the CSV);
- volume: a NIfTI or NRRD file or a DICOM series folder plus a mask volume, read as 2-D slices.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ImageReadError
from ..io import PIXEL_SUFFIXES, read_mask, read_pixels, read_volume


@dataclass(frozen=True)
class Sample:
    """One 2-D image with its ground-truth mask."""

    name: str
    image: np.ndarray  # (H, W) or (H, W, 3), any numeric dtype
    mask: np.ndarray  # (H, W) bool
    modality: str
    domain: str = "seen"  # "seen" or "unseen": how `espmed eval` splits its summary


def _pair(name: str, image_path: Path, mask_path: Path, modality: str, domain: str) -> Sample:
    image, mask = read_pixels(image_path), read_mask(mask_path)
    if image.shape[:2] != mask.shape:
        (mh, mw), (ih, iw) = mask.shape, image.shape[:2]
        raise ImageReadError(f"{mask_path}: mask is {mh}x{mw} but its image is {ih}x{iw}")
    return Sample(name, image, mask, modality, domain)


def _find(folder: Path, stem_or_name: str) -> Path:
    direct = folder / stem_or_name
    if direct.is_file():
        return direct
    stem = Path(stem_or_name).stem
    for suffix in PIXEL_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise ImageReadError(f"{folder}: no file for {stem_or_name!r}")


def release_layout(root: str | Path, name: str, split: str, modality: str, domain: str = "seen") -> list[Sample]:
    """The release layout: `image_<name>/`, `mask_<name>/`, `<name>_data_split.json`."""
    root = Path(root)
    split_file = root / f"{name}_data_split.json"
    if not split_file.is_file():
        raise ImageReadError(f"{split_file}: no such split file")
    try:
        splits = json.loads(split_file.read_text())
    except json.JSONDecodeError as exc:
        raise ImageReadError(f"{split_file}: invalid JSON ({exc})") from None
    if split not in splits:
        raise ImageReadError(f"{split_file}: no {split!r} split (has {', '.join(splits)})")
    image_dir, mask_dir = root / f"image_{name}", root / f"mask_{name}"
    return [
        _pair(Path(f).stem, _find(image_dir, f), _find(mask_dir, f), modality, domain)
        for f in splits[split]
    ]


def folder_layout(images: str | Path, masks: str | Path, modality: str, domain: str = "seen") -> list[Sample]:
    """Images and masks folders, paired by file stem; an image without a mask is an error."""
    images, masks = Path(images), Path(masks)
    if not images.is_dir():
        raise ImageReadError(f"{images}: no such images folder")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in PIXEL_SUFFIXES)
    if not files:
        raise ImageReadError(f"{images}: no images ({', '.join(PIXEL_SUFFIXES)})")
    return [_pair(p.stem, p, _find(masks, p.stem), modality, domain) for p in files]


def csv_layout(path: str | Path, modality: str, domain: str = "seen") -> list[Sample]:
    """A CSV with `image` and `mask` columns; relative paths are relative to the CSV."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such CSV file")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image", "mask"} <= set(rows[0]):
        raise ImageReadError(f"{path}: needs a header with 'image' and 'mask' columns")
    return [
        _pair(Path(r["image"]).stem, path.parent / r["image"], path.parent / r["mask"], modality, domain)
        for r in rows
    ]


def volume_slices(
    image: np.ndarray,
    mask: np.ndarray,
    axis: int,
    indices: Sequence[int],
    *,
    modality: str,
    name: str,
    domain: str = "seen",
) -> list[Sample]:
    """2-D slices of a volume along `axis` (0 sagittal, 1 coronal, 2 axial for RAS volumes).

    Slices are rotated so that anterior/superior is up, as radiology viewers show them.
    """
    if image.shape != mask.shape:
        raise ImageReadError(f"{name}: image volume {image.shape} and mask volume {mask.shape} differ")
    out = []
    for i in indices:
        if not 0 <= i < image.shape[axis]:
            raise ImageReadError(f"{name}: slice {i} outside 0..{image.shape[axis] - 1} on axis {axis}")
        img = np.rot90(np.take(image, i, axis=axis))
        msk = np.rot90(np.take(mask, i, axis=axis)) > 0
        img, msk = np.ascontiguousarray(img), np.ascontiguousarray(msk)
        out.append(Sample(f"{name}_ax{axis}_{i:03d}", img, msk, modality, domain))
    return out


def volume_layout(
    image: str | Path,
    mask: str | Path,
    modality: str,
    axis: int = 2,
    indices: Sequence[int] | None = None,
    min_foreground: int = 1,
    domain: str = "seen",
) -> list[Sample]:
    """Slices of a NIfTI/NRRD/DICOM volume and its mask; by default every slice with foreground."""
    vol, msk = read_volume(image, axis), read_volume(mask, axis)
    if indices is None:
        area = (msk > 0).sum(axis=tuple(a for a in range(3) if a != axis))
        indices = [int(i) for i in np.flatnonzero(area >= min_foreground)]
    return volume_slices(vol, msk, axis, indices, modality=modality, name=Path(image).name.split(".")[0], domain=domain)
