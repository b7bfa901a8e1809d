"""NumPy `.npy` images: the header's shape and dtype are checked before the array is read.

`np.load` alone would read a `.npz` named `.npy`, or allocate whatever shape the header claims.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import ImageReadError
from .common import check_declared_size, check_finite, read_error


def image_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """(H, W) or (H, W, C): `shape` without one leading length-1 axis; any other rank is refused."""
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) not in (2, 3):
        raise ImageReadError(f"{path}: expected a 2-D image, got an array of shape {shape}")
    return shape


def read_header(fh: BinaryIO) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) an `.npy` stream declares, read without its data: what to check before reading it."""
    fmt = np.lib.format
    read = fmt.read_array_header_1_0 if fmt.read_magic(fh) == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(fh)
    return tuple(int(s) for s in shape), dtype


def read_npy(path: Path) -> np.ndarray:
    """A numeric 2-D image (H, W) or (H, W, C) as stored; never unpickles."""
    try:
        with open(path, "rb") as fh:
            fmt = np.lib.format
            shape, dtype = read_header(fh)
            if dtype.kind not in "biuf":
                raise ImageReadError(f"{path}: not a numeric image (dtype {dtype})")
            shape = image_shape(path, shape)
            check_declared_size(path, shape, shape[:2])
            fh.seek(0)
            array = fmt.read_array(fh, allow_pickle=False)
    except ImageReadError:
        raise
    except Exception as exc:  # bad magic, malformed header, truncated data (ValueError, EOFError, ...)
        raise read_error(path, "corrupt or truncated .npy file", exc) from None
    check_finite(path, array)
    return array.reshape(shape)
