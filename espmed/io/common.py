"""What every reader returns, and the size limits checked before any pixel is decoded. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError

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
        """File name without its image suffixes (`scan.nii.gz` -> `scan`)."""
        name = self.path.name
        for suffix in (".nii.gz", ".nii", ".dcm", ".dicom"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return self.path.stem if self.path.suffix else name


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


def reason(exc: BaseException, limit: int = 240) -> str:
    """A library exception as one short line: 'Type: message' with newlines folded."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_finite(path: Path, array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageReadError(f"{path}: image contains NaN or Inf values")


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to 0..255, clipped (a flat range maps to 0)."""
    v = values.astype(np.float64)
    if high <= low:
        return np.zeros(v.shape, np.uint8)
    return np.clip(np.rint((v - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
