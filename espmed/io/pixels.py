"""Stored pixel values for training and ground truth: one 2-D image, a mask, a 3-D volume.

These decode through the same checked readers as `read_image` (declared size refused before
decoding, NaN/Inf refused, truncation and corruption an `ImageReadError` naming the file), but
return the values as the file stores them: no palette expansion, no DICOM window, no intensity
scaling. Training scales them itself (`espmed.runtimes.preprocess`), and a mask's labels are its
stored values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ImageReadError
from .common import check_finite, check_volume_size, existing_file
from .dicom import DICOM_SUFFIXES, header_checked, is_dicom_file, read_dataset, slice_order_key, stored_pixels
from .nifti import decode_nifti, is_nifti_path
from .npy import image_shape, read_npy
from .nrrd import NRRD_SUFFIXES, read_nrrd
from .raster import PILLOW_SUFFIXES, RASTER_SUFFIXES, TIFF_SUFFIXES, decode_pillow, decode_tiff

#: The 2-D image files the training layouts list in a folder, in the order a stem is looked up.
PIXEL_SUFFIXES = RASTER_SUFFIXES + (".npy", ".dcm")


def read_pixels(path: str | Path) -> np.ndarray:
    """One 2-D image's stored values, (H, W) or (H, W, C), from PNG/JPEG/BMP/TIFF/NPY/DICOM."""
    path = existing_file(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return read_npy(path)
    if is_dicom_file(path) or suffix in DICOM_SUFFIXES:
        array = stored_pixels(read_dataset(path), path)
        check_finite(path, array)
    elif suffix in TIFF_SUFFIXES:
        array = decode_tiff(path)[0]
    elif suffix in PILLOW_SUFFIXES:
        array = decode_pillow(path)
    else:
        raise ImageReadError(f"{path}: unsupported image file type ({', '.join(PIXEL_SUFFIXES)})")
    return array.reshape(image_shape(path, array.shape))


def read_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask (H, W) bool: a positive value (label, 255, instance id) in the first channel."""
    array = read_pixels(path)
    if array.ndim == 3:
        array = array[..., 0]
    return array > 0


def read_volume(path: str | Path, axis: int = 2) -> np.ndarray:
    """A 3-D array (x, y, z) of stored values: NIfTI, NRRD, or a folder of single-frame DICOM slices.

    The size limits apply to the slices along `axis` that training cuts from it.
    """
    path = Path(path)
    if path.is_dir():
        return _dicom_folder(path, axis)
    path = existing_file(path)
    if is_nifti_path(path):
        data = decode_nifti(path, axis=axis)[1]
    elif path.suffix.lower() in NRRD_SUFFIXES:
        data = read_nrrd(path, axis)
    else:
        raise ImageReadError(f"{path}: unsupported volume file type (NIfTI, NRRD or a folder of DICOM slices)")
    if data.ndim != 3:
        raise ImageReadError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data


def _dicom_folder(folder: Path, axis: int) -> np.ndarray:
    """The folder's DICOM slices with pixel data (other files skipped), transposed to (x, y) and
    stacked in `slice_order_key` order (file order among equal keys)."""
    found = []  # (order key, (rows, cols), path, dataset)
    for p in sorted(folder.iterdir()):
        if is_dicom_file(p):
            ds = read_dataset(p)
            if "PixelData" in ds:
                found.append((*_slice_place(ds, p), p, ds))
    if not found:
        raise ImageReadError(f"{folder}: no DICOM slices with pixel data")
    sizes = {size for _, size, _, _ in found}
    if len(sizes) != 1:
        raise ImageReadError(f"{folder}: DICOM slices differ in size (rows x columns {sorted(sizes)})")
    rows, cols = sizes.pop()
    check_volume_size(folder, (cols, rows, len(found)), axis)
    found.sort(key=lambda item: item[0])
    slices = []
    for _, _, p, ds in found:
        pixels = stored_pixels(ds, p)
        check_finite(p, pixels)
        if pixels.shape != (rows, cols):
            raise ImageReadError(f"{p}: not a single-frame grayscale slice (pixel array {pixels.shape})")
        slices.append(pixels.T)
    return np.stack(slices, axis=-1)


def _slice_place(ds, path: Path) -> tuple[tuple[float, int], tuple[int, int]]:
    with header_checked(path):
        return slice_order_key(ds), (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
