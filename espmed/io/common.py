"""What every reader returns, and the size limits checked before any pixel is decoded. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError, first_line

#: Largest single frame accepted (pixels); checked against the declared size before decoding.
MAX_FRAME_PIXELS = 1 << 27  # 134 M pixels, e.g. 11585 x 11585
#: Smallest image side accepted (a 1-pixel image has no structure to segment).
MIN_SIDE = 2
#: Largest whole file/volume accepted (pixels x frames x samples), declared size.
MAX_TOTAL_VALUES = 1 << 30


@dataclass
class MedicalImage:
    """An input ready to segment: 2-D frames (gray or RGB) plus what the writers need.

    kind: "raster" (PNG/JPEG/TIFF/BMP), "dicom" (one file or a series) or "nifti".
    frames: the 2-D images to segment, in order (one for a plain image; one per DICOM frame or
        instance; one per slice of a NIfTI volume along `axis`).
    source: the pydicom datasets (one per instance, frames in instance order) or the nibabel image.
    """

    path: Path
    kind: str
    frames: list[np.ndarray]
    source: Any = None
    axis: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return image_name(self.path)


def image_name(path: Path) -> str:
    """File name without its image suffixes (`scan.nii.gz` -> `scan`): what outputs are named after."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm", ".dicom"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def check_declared_size(path: Path, shape: tuple[int, ...], frame_hw: tuple[int, int]) -> None:
    """Refuse empty images and decompression bombs from the header alone."""
    h, w = frame_hw
    if h <= 0 or w <= 0 or any(int(s) <= 0 for s in shape):
        raise ImageReadError(f"{path}: empty image (declared size {' x '.join(str(s) for s in shape)})")
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageReadError(f"{path}: image too small to segment ({w} x {h} pixels)")
    if h * w > MAX_FRAME_PIXELS:
        raise ImageReadError(
            f"{path}: declared frame size {w} x {h} exceeds the {MAX_FRAME_PIXELS:,}-pixel limit "
            "(possible decompression bomb)"
        )
    total = int(np.prod([int(s) for s in shape], dtype=np.int64))
    if total > MAX_TOTAL_VALUES:
        raise ImageReadError(
            f"{path}: declared size {' x '.join(str(s) for s in shape)} exceeds the {MAX_TOTAL_VALUES:,}-value limit"
        )


def check_volume_size(path: Path, shape: tuple[int, ...], axis: int) -> None:
    """`check_declared_size` for a 2-D image, or a 3-D volume cut into slices along `axis`."""
    if len(shape) == 3 and axis not in (0, 1, 2):
        raise ImageReadError(f"{path}: slice axis must be 0, 1 or 2, got {axis}")
    in_plane = [s for i, s in enumerate(shape) if len(shape) == 2 or i != axis]
    check_declared_size(path, shape, (in_plane[0], in_plane[1]))


def squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A volume's shape without trailing length-1 axes past the third (x, y, z, 1) -> (x, y, z)."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def existing_file(path: str | Path) -> Path:
    """`path` as a Path, refused when it is missing or empty (before any decoder sees it)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file")
    return path


def read_error(path: Path, what: str, exc: BaseException) -> ImageReadError:
    """A decoder's exception as one line naming the file: '<path>: <what> (<Type>: <first line>)'."""
    return ImageReadError(f"{path}: {what} ({first_line(exc, with_type=True)})")


def check_finite(path: Path, array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageReadError(f"{path}: image contains NaN or Inf values")


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to 0..255, clipped (a flat range maps to 0). Computed on halved
    values (exact in binary floating point) so that a range near the float64 limits, whose width
    overflows, still scales."""
    v = values.astype(np.float64)
    if high <= low:
        return np.zeros(v.shape, np.uint8)
    return np.clip(np.rint((v / 2 - low / 2) * (127.5 / (high / 2 - low / 2))), 0, 255).astype(np.uint8)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a gray, gray+alpha, RGB or RGBA array of any numeric dtype: uint8 as
    is, bool 0/255, any other integer or float min-max scaled over the whole image (a constant image
    becomes 0; NaN/Inf refused)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (1, 2):
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ImageReadError(f"expected a 2-D gray or RGB(A) image, got array of shape {a.shape}")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ImageReadError(f"image too small: {a.shape[0]} x {a.shape[1]} pixels")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise ImageReadError(f"unsupported pixel type {a.dtype}")
        if not np.isfinite(a).all():
            raise ImageReadError("image contains NaN or Inf values")
        a = scale_to_uint8(a, float(a.min()), float(a.max()))
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a)
