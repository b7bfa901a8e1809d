"""Box prompts, defined once: how boxes are read, checked, mapped into the model input and how one
mask per box becomes a label image. Torch-free.

Convention (MedSAM's): x0, y0, x1, y1 in pixels of the image as read, x = column, y = row, 0-based,
x1 and y1 inclusive; floats allowed. Boxes are clipped to the image; x1 < x0 or y1 < y0 (or a
non-finite value) is an error. Into the model input a box is scaled as the image is,
`box * input_size / max(H, W)` (the letterbox puts the image at the top left), which is exactly
MedSAM's `box / max(H, W) * 256` in its 256² frame for a model whose embedding cell is LiteMedSAM's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from espmed.errors import PromptError

from .preprocess import Letterbox


def check_boxes(
    boxes: Sequence[Sequence[float]] | np.ndarray, image_hw: tuple[int, int], source: str = ""
) -> np.ndarray:
    """(N, 4) float64 boxes clipped to the image; PromptError for a malformed or inverted box."""
    where = f"{source}: " if source else ""
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise PromptError(f"{where}boxes must be numbers x0, y0, x1, y1") from None
    if arr.ndim == 1 and arr.size == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] < 1:
        raise PromptError(f"{where}boxes must be N x 4 (x0, y0, x1, y1), N >= 1; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise PromptError(f"{where}a box has a non-finite coordinate")
    bad = np.flatnonzero((arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1]))
    if bad.size:
        b = arr[bad[0]]
        raise PromptError(
            f"{where}box {bad[0] + 1} ({', '.join(f'{v:g}' for v in b)}) has x1 < x0 or y1 < y0; "
            "boxes are x0, y0, x1, y1"
        )
    h, w = image_hw
    arr = arr.copy()
    arr[:, 0::2] = np.clip(arr[:, 0::2], 0, w - 1)
    arr[:, 1::2] = np.clip(arr[:, 1::2], 0, h - 1)
    return arr


def to_input_frame(boxes: np.ndarray, box: Letterbox) -> np.ndarray:
    """Image-pixel boxes (N, 4) -> float32 boxes in the letterboxed model input's pixels."""
    return (boxes * (box.input_size / max(box.original_hw))).astype(np.float32)


def label_image(masks: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """One label image from N masks (N, H, W) bool: value k (1-based) = the k-th box's mask; where masks
    overlap the higher IoU estimate wins, then the lower index; 0 = no mask. uint8 for N <= 255, else uint16."""
    n = masks.shape[0]
    if n > 65535:
        raise PromptError(f"{n} boxes: a label image holds at most 65535")
    labels = np.zeros(masks.shape[1:], np.uint8 if n <= 255 else np.uint16)
    for k in np.argsort(-np.asarray(iou, np.float64), kind="stable"):  # higher IoU first; ties: lower index
        labels[masks[k] & (labels == 0)] = k + 1
    return labels
