"""Medical image I/O (torch-free): rasters, DICOM, NIfTI, NRRD, `.npy`, `.npz` in; mask/label/overlay PNG,
NIfTI, DICOM SEG, `.npz` out.

Every file is decoded by one checked reader per format, which refuses empty, oversized
(decompression bomb, judged from the header before decoding), corrupt/truncated and non-finite
images with an `ImageReadError` naming the file. What differs between callers is only what they get:

- `read_image(path)`: a `MedicalImage` whose `frames` are what to segment (DICOM windowed, NIfTI
  scaled to 0..255 per volume, palettes expanded; a MedSAM-on-Laptop `.npz`'s `imgs`, its boxes in
  `info`); the reader is picked from the file (DICOM by its 'DICM' signature, NIfTI, `.npz` and
  rasters by suffix). `espmed predict` reads this.
- `read_frame(path)`: the one frame of a single-image file (or a `.npy` array), as `read_image`
  gives it: the benchmark's `--data` and the exporter's `--calib` images.
- `read_pixels(path)`, `read_mask(path)`, `read_volume(path)`: values as stored, for training and
  evaluation data and every ground-truth mask (see `espmed.io.pixels`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ImageReadError
from .common import MAX_FRAME_PIXELS, MAX_TOTAL_VALUES, MedicalImage, existing_file
from .dicom import DICOM_SUFFIXES, is_dicom_file, read_dicom, read_dicom_series
from .dicom_seg import write_dicom_seg
from .nifti import is_nifti_path, read_nifti, write_nifti_mask
from .npy import read_npy
from .npz import is_npz, read_npz
from .pixels import PIXEL_SUFFIXES, read_mask, read_pixels, read_volume
from .raster import RASTER_SUFFIXES, read_raster
from .writers import overlay, write_label_png, write_mask_png, write_overlay_png

#: The single-image files the benchmark (`--data`) and the exporter (`--calib`) list in a folder.
FRAME_SUFFIXES = RASTER_SUFFIXES + (".npy",)

__all__ = [
    "FRAME_SUFFIXES",
    "MAX_FRAME_PIXELS",
    "MAX_TOTAL_VALUES",
    "PIXEL_SUFFIXES",
    "MedicalImage",
    "is_supported",
    "overlay",
    "read_dicom",
    "read_dicom_series",
    "read_frame",
    "read_image",
    "read_mask",
    "read_nifti",
    "read_npz",
    "read_pixels",
    "read_raster",
    "read_volume",
    "write_dicom_seg",
    "write_label_png",
    "write_mask_png",
    "write_nifti_mask",
    "write_overlay_png",
]


def is_supported(path: str | Path) -> bool:
    """Whether `read_image` would try this file (by signature or suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    return (suffix in RASTER_SUFFIXES or suffix in DICOM_SUFFIXES or is_nifti_path(path) or is_npz(path)
            or is_dicom_file(path))


def read_image(path: str | Path, axis: int = 2) -> MedicalImage:
    """Read any supported file; `axis` is the NIfTI slicing axis."""
    path = existing_file(path)
    if is_dicom_file(path) or path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(path)
    if is_nifti_path(path):
        return read_nifti(path, axis)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return read_raster(path)
    if is_npz(path):
        return read_npz(path)
    raise ImageReadError(f"{path}: unsupported file type (PNG, JPEG, TIFF, BMP, DICOM, NIfTI, MedSAM-on-Laptop .npz)")


def read_frame(path: str | Path) -> np.ndarray:
    """(H, W) or (H, W, C): the one frame of a single-image file as `read_image` gives it, or a `.npy` array."""
    path = existing_file(path)
    if path.suffix.lower() == ".npy":
        return read_npy(path)
    frames = read_image(path).frames
    if len(frames) != 1:
        raise ImageReadError(f"{path}: holds {len(frames)} frames; one 2-D image is needed here")
    return frames[0]
