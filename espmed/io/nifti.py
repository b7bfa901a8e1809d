"""NIfTI volumes (nibabel): slices along a chosen axis in, a mask volume with the input's affine out.

Intensities are mapped to 0..255 once per volume (0.5-99.5 percentile window over the whole
volume), so every slice sees the same contrast. Slices are the array's own orientation
(`data[:, :, k]` for axis 2): the mask volume is written back in exactly that layout.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes
from ..errors import ImageReadError
from .common import MedicalImage, check_finite, check_volume_size, read_error, scale_to_uint8, squeeze_trailing

VOLUME_PERCENTILES = (0.5, 99.5)


def is_nifti_path(path: str | Path) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def decode_nifti(path: Path, *, axis: int, dtype: type | None = None) -> tuple[Any, np.ndarray]:
    """The nibabel image and its data (2-D or 3-D, trailing length-1 axes dropped), size-checked first.

    dtype: what nibabel scales the stored values to (None: its own choice, the stored dtype when the
    file has no scaling). The limits apply to slices along `axis`.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.header.get_data_shape())
    except Exception as exc:  # nibabel: ImageFileError, HeaderDataError, gzip/EOF errors
        raise read_error(path, "not a readable NIfTI file", exc) from None
    shape = squeeze_trailing(shape)
    if len(shape) not in (2, 3):
        raise ImageReadError(f"{path}: expected a 2-D or 3-D volume, got shape {shape}")
    check_volume_size(path, shape, axis)
    try:
        data = np.asarray(img.dataobj, dtype=dtype).reshape(shape)
    except Exception as exc:  # truncated or corrupt data block
        raise read_error(path, "corrupt NIfTI data", exc) from None
    check_finite(path, data)
    return img, data


def read_nifti(path: str | Path, axis: int = 2) -> MedicalImage:
    """A 2-D image or a 3-D volume (4-D with one volume) cut into slices along `axis`."""
    path = Path(path)
    img, data = decode_nifti(path, axis=axis, dtype=np.float32)
    low, high = np.percentile(data, VOLUME_PERCENTILES)
    if high <= low:
        low, high = float(data.min()), float(data.max())
    volume = scale_to_uint8(data, float(low), float(high))
    if volume.ndim == 2:
        frames = [volume]
        axis = None
    else:
        frames = [np.ascontiguousarray(s) for s in np.moveaxis(volume, axis, 0)]
    return MedicalImage(path, "nifti", frames, source=img, axis=axis, info={"shape": data.shape})


def mask_volume(image: MedicalImage, masks: list[np.ndarray]) -> np.ndarray:
    """Stack per-slice masks back into the input's array layout (uint8 0/1)."""
    stacked = np.stack([np.asarray(m, dtype=np.uint8) for m in masks])
    if image.axis is None:
        return stacked[0]
    return np.moveaxis(stacked, 0, image.axis)


def write_nifti_mask(path: str | Path, image: MedicalImage, masks: list[np.ndarray]) -> Path:
    """uint8 0/1 mask volume with the input's affine and header (gzipped for `.nii.gz`)."""
    import nibabel as nib

    path = Path(path)
    source = image.source
    volume = mask_volume(image, masks)
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(volume, source.affine, header=header)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"], out.header["cal_max"] = 0, 1
    out.header["descrip"] = b"espmed ESP-MedSAM mask"
    data = out.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    write_bytes(path, data)
    return path
