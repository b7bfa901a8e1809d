"""Medical image I/O (torch-free): rasters, DICOM, NIfTI in; mask PNG, overlay PNG, NIfTI, DICOM SEG out.

`read_image(path)` picks the reader from the file (DICOM by its 'DICM' signature, NIfTI by
suffix, rasters by suffix) and returns a `MedicalImage` whose `frames` are what to segment.
Every reader refuses empty, oversized (decompression bomb), corrupt/truncated and non-finite
images with an `ImageReadError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageReadError
from .common import MAX_FRAME_PIXELS, MAX_TOTAL_VALUES, MedicalImage
from .dicom import DICOM_SUFFIXES, is_dicom_file, read_dicom, read_dicom_series, write_dicom_seg
from .nifti import is_nifti_path, read_nifti, write_nifti_mask
from .raster import RASTER_SUFFIXES, read_raster
from .writers import overlay, write_mask_png, write_overlay_png

__all__ = [
    "MAX_FRAME_PIXELS",
    "MAX_TOTAL_VALUES",
    "MedicalImage",
    "is_supported",
    "overlay",
    "read_dicom",
    "read_dicom_series",
    "read_image",
    "read_nifti",
    "read_raster",
    "write_dicom_seg",
    "write_mask_png",
    "write_nifti_mask",
    "write_overlay_png",
]


def is_supported(path: str | Path) -> bool:
    """Whether `read_image` would try this file (by signature or suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    return suffix in RASTER_SUFFIXES or suffix in DICOM_SUFFIXES or is_nifti_path(path) or is_dicom_file(path)


def read_image(path: str | Path, axis: int = 2) -> MedicalImage:
    """Read any supported file; `axis` is the NIfTI slicing axis."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file")
    if is_dicom_file(path) or path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(path)
    if is_nifti_path(path):
        return read_nifti(path, axis)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return read_raster(path)
    raise ImageReadError(f"{path}: unsupported file type (PNG, JPEG, TIFF, BMP, DICOM or NIfTI)")
