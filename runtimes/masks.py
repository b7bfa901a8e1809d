"""The mask rule and mask agreement, defined once: the runtimes, the export gate, the benchmark and
evaluation all call these. Torch-free.

- A pixel is foreground when its logit is `>= threshold` (`mask_threshold` in the metadata).
- Dice and IoU of two boolean masks of one shape; two empty masks agree perfectly (1.0), exactly
  one empty mask scores 0.0.
"""

from __future__ import annotations

import numpy as np


def mask_from_logits(logits: np.ndarray, threshold: float) -> np.ndarray:
    """bool mask (same shape as `logits`): logit >= threshold."""
    return np.asarray(logits) >= threshold


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2 |a & b| / (|a| + |b|) of two boolean masks; 1.0 when both are empty."""
    a, b = _pair(a, b)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two boolean masks; 1.0 when both are empty."""
    a, b = _pair(a, b)
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union
