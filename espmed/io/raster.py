"""PNG / JPEG / BMP (Pillow) and TIFF (tifffile) images, 8- or 16-bit, gray, RGB or RGBA.

Pixel values are returned as stored (uint8, uint16, float); `espmed.runtimes.preprocess`
scales non-uint8 images to 0..255 by min-max (documented there). Sizes are checked from the
header before decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageReadError
from .common import MedicalImage, check_declared_size, check_finite, read_error

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
RASTER_SUFFIXES = PILLOW_SUFFIXES + TIFF_SUFFIXES


def read_raster(path: str | Path) -> MedicalImage:
    """The frames to segment: a TIFF's frames with Y, X (and samples) last; a Pillow image converted."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        frames = _tiff_frames(*decode_tiff(path))
    else:
        frames = [decode_pillow(path, _pillow_to_array)]
    return MedicalImage(path, "raster", frames, info={"dtype": str(frames[0].dtype)})


def decode_pillow(path: Path, convert: Callable[[Any], np.ndarray] = np.asarray) -> np.ndarray:
    """`convert(image)` of the decoded Pillow image (default: its values as stored, palette indices and all)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # our own limit (checked below) replaces Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            check_declared_size(path, (im.height, im.width, len(im.getbands())), (im.height, im.width))
            im.load()
            array = convert(im)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise read_error(path, "not a readable image", exc) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise read_error(path, "corrupt or truncated image", exc) from None
    check_finite(path, array)
    return array


def _pillow_to_array(im) -> np.ndarray:
    mode = im.mode
    if mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGBA" if ("A" in mode or "transparency" in im.info) else ("L" if mode == "1" else "RGB"))
    elif mode.startswith("I;16"):
        return np.asarray(im, dtype=np.uint16)
    return np.asarray(im)


def decode_tiff(path: Path) -> tuple[np.ndarray, str]:
    """The first series' values as stored, and its tifffile axes (e.g. "YX", "ZYX", "YXS")."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ImageReadError(f"{path}: TIFF holds no image")
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
            if "Y" not in axes or "X" not in axes:
                raise ImageReadError(f"{path}: TIFF series has no Y/X axes (axes {axes})")
            check_declared_size(path, shape, (shape[axes.index("Y")], shape[axes.index("X")]))
            data = series.asarray()
            if tuple(data.shape) != shape:  # tifffile logs, then returns what it could decode
                raise ImageReadError(
                    f"{path}: TIFF pixel data does not fill its declared shape {shape} (truncated or corrupt)"
                )
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise read_error(path, "corrupt or unreadable TIFF", exc) from None
    check_finite(path, data)
    return data, axes


def _tiff_frames(data: np.ndarray, axes: str) -> list[np.ndarray]:
    """Y, X (and samples S) moved last; every other axis enumerates frames."""
    order = [i for i, a in enumerate(axes) if a not in "YXS"] + [axes.index("Y"), axes.index("X")]
    if "S" in axes:
        order.append(axes.index("S"))
    data = np.transpose(data, order)
    per_frame = 3 if "S" in axes else 2
    data = data.reshape((-1,) + data.shape[data.ndim - per_frame :])
    return [np.ascontiguousarray(f) for f in data]
