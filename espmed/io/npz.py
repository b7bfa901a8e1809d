"""MedSAM-on-Laptop 2-D `.npz` files: `imgs` (H x W x 3 uint8, or H x W) and `boxes` (N x 4: x_min,
y_min, x_max, y_max) in; `segs` (H x W uint16, 0 background, k = box k) out.

Each member's `.npy` header is checked before its array is read: a zip member inflates to whatever
its header claims. 3-D files (imgs D x H x W, boxes of 6 values) are refused by name.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_open
from ..errors import ImageReadError
from .common import MedicalImage, check_declared_size, check_finite, existing_file, read_error
from .npy import read_header

NPZ_SUFFIX = ".npz"
#: Most boxes one file may hold: a uint16 label image numbers at most 65535.
MAX_BOXES = 65535


def is_npz(path: str | Path) -> bool:
    return Path(path).suffix.lower() == NPZ_SUFFIX


def read_npz(path: str | Path) -> MedicalImage:
    """One 2-D image; its boxes (as stored, N x 4) in `info["boxes"]` when the file has them."""
    path = existing_file(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "imgs.npy" not in names:
                raise ImageReadError(f"{path}: no 'imgs' array (a MedSAM-on-Laptop .npz holds imgs and boxes)")
            shapes = {name: _header(zf, path, name) for name in ("imgs", "boxes") if f"{name}.npy" in names}
            _check_2d(path, shapes)
            arrays = {name: _array(zf, f"{name}.npy") for name in shapes}
    except ImageReadError:
        raise
    except Exception as exc:  # not a zip, a truncated member, a malformed header (BadZipFile, EOFError, ...)
        raise read_error(path, "corrupt or truncated .npz file", exc) from None
    imgs = arrays["imgs"]
    check_finite(path, imgs)
    info = {"boxes": arrays["boxes"]} if "boxes" in arrays else {}
    return MedicalImage(path, "npz", [imgs], info=info)


def _header(zf: zipfile.ZipFile, path: Path, name: str) -> tuple[int, ...]:
    with zf.open(f"{name}.npy") as fh:
        shape, dtype = read_header(fh)
    if dtype.kind not in "biuf":
        raise ImageReadError(f"{path}: '{name}' is not numeric (dtype {dtype})")
    return shape


def _check_2d(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse 3-D files and sizes past the limits, from the headers alone."""
    imgs, boxes = shapes["imgs"], shapes.get("boxes")
    if (boxes and boxes[-1] == 6) or (len(imgs) == 3 and imgs[2] not in (1, 3, 4)):
        raise ImageReadError(
            f"{path}: a 3-D MedSAM-on-Laptop file (imgs {imgs}, boxes {boxes}); predict reads 2-D files only "
            "(imgs H x W x 3 or H x W, boxes N x 4)"
        )
    if len(imgs) not in (2, 3):
        raise ImageReadError(f"{path}: 'imgs' must be H x W x 3 or H x W, got shape {imgs}")
    check_declared_size(path, imgs, imgs[:2])
    if boxes is not None and (len(boxes) not in (1, 2) or boxes[-1] != 4 or int(np.prod(boxes)) > 4 * MAX_BOXES):
        raise ImageReadError(f"{path}: 'boxes' must be N x 4 (x_min, y_min, x_max, y_max), N <= {MAX_BOXES}; "
                             f"got shape {boxes}")


def _array(zf: zipfile.ZipFile, member: str) -> np.ndarray:
    with zf.open(member) as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


def write_npz_segs(path: str | Path, labels: np.ndarray) -> Path:
    """The MedSAM-on-Laptop output: `segs`, uint16 (0 background, k = box k), compressed, written atomically."""
    with atomic_open(path, "wb") as fh:
        np.savez_compressed(fh, segs=np.asarray(labels, np.uint16))
    return Path(path)
