"""Mask, label and overlay PNGs (Pillow), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..atomic import write_bytes

OVERLAY_COLOR = (0, 255, 64)  # contour colour: green stands out on gray, fundus and H&E images
OVERLAY_FILL_ALPHA = 0.25  # tint inside the mask


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    """Binary mask as an 8-bit PNG: 0 background, 255 foreground."""
    write_bytes(path, png_bytes(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8)))
    return Path(path)


def write_label_png(path: str | Path, labels: np.ndarray) -> Path:
    """Label image as a PNG of its own depth (8-bit for uint8, 16-bit for uint16): value k = segment k."""
    write_bytes(path, png_bytes(np.asarray(labels)))
    return Path(path)


def mask_contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Foreground pixels within `thickness` pixels of the background (4-neighbour erosion)."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for _ in range(thickness):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask & ~inner


def overlay(image_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB uint8 image with the mask tinted and its contour drawn (thickness ~ image size / 256)."""
    mask = np.asarray(mask, dtype=bool)
    out = image_rgb.astype(np.float32)
    color = np.asarray(OVERLAY_COLOR, np.float32)
    out[mask] = (1 - OVERLAY_FILL_ALPHA) * out[mask] + OVERLAY_FILL_ALPHA * color
    thickness = max(1, round(max(mask.shape) / 256))
    out[mask_contour(mask, thickness)] = color
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_overlay_png(path: str | Path, image_rgb: np.ndarray, mask: np.ndarray) -> Path:
    write_bytes(path, png_bytes(overlay(image_rgb, mask)))
    return Path(path)
