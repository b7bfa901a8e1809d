"""NRRD volumes (pynrrd), such as pyradiomics' tumour and lesion volumes: stored values, (x, y, z).

Only a data block attached to its header (one `.nrrd` file): a detached header's `data file` may
name any file on the machine. The header's sizes are checked before the data block is read, and a
compressed block is decompressed no further than the declared size allows.
"""

from __future__ import annotations

import bz2
import gzip
import io
from pathlib import Path

import numpy as np

from ..errors import ImageReadError, require
from .common import check_finite, check_volume_size, read_error, squeeze_trailing

NRRD_SUFFIXES = (".nrrd",)
#: Bytes of the widest NRRD scalar (double, int64): a data block is never read past 8 bytes per value.
_MAX_ITEMSIZE = 8


def read_nrrd(path: Path, axis: int = 2) -> np.ndarray:
    """A 3-D volume as stored (F index order, like NIfTI's (x, y, z)); limits apply to slices along `axis`."""
    nrrd = require("nrrd", "data", hint=f" to read {path}")
    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            shape = _declared_shape(path, header)
            check_volume_size(path, shape, axis)
            block = _data_block(path, fh, header["encoding"], _MAX_ITEMSIZE * int(np.prod(shape, dtype=np.int64)))
        data = nrrd.read_data({**header, "encoding": "raw"}, io.BytesIO(block))
    except ImageReadError:
        raise
    except Exception as exc:  # pynrrd's NRRDError, truncated or corrupt compressed data (EOFError, OSError, ...)
        raise read_error(path, "corrupt or unreadable NRRD file", exc) from None
    if data.nbytes != len(block):
        raise ImageReadError(f"{path}: NRRD data block is longer than its declared {data.nbytes} bytes")
    check_finite(path, data)
    return data.reshape(shape)


def _declared_shape(path: Path, header: dict) -> tuple[int, ...]:
    if "data file" in header or "datafile" in header:
        raise ImageReadError(f"{path}: detached NRRD data ('data file') is not read; save the volume as one .nrrd")
    for skip in ("line skip", "lineskip", "byte skip", "byteskip"):
        if int(header.get(skip, 0)) != 0:
            raise ImageReadError(f"{path}: NRRD '{skip}' is not supported")
    if "sizes" not in header or "encoding" not in header:
        raise ImageReadError(f"{path}: NRRD header lacks 'sizes' or 'encoding'")
    shape = squeeze_trailing(tuple(int(s) for s in header["sizes"]))
    if len(shape) != 3:
        raise ImageReadError(f"{path}: expected a 3-D volume, got shape {shape}")
    return shape


def _data_block(path: Path, fh, encoding: str, limit: int) -> bytes:
    """The data block's bytes, at most `limit` + 1 (one more than any declared size could need)."""
    if encoding == "raw":
        return fh.read(limit + 1)
    if encoding in ("gzip", "gz"):
        return gzip.GzipFile(fileobj=fh).read(limit + 1)
    if encoding in ("bzip2", "bz2"):
        return bz2.BZ2File(fh).read(limit + 1)
    raise ImageReadError(f"{path}: NRRD encoding {encoding!r} is not supported (raw, gzip or bzip2)")
