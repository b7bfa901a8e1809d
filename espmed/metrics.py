"""Segmentation metrics for one binary 2-D prediction against its ground truth.

Dice and IoU are defined here once (the export gate, the benchmark and evaluation use them too):
two empty masks agree perfectly (1.0), exactly one empty mask scores 0.0. HD95 and NSD come from
MONAI.

Empty masks are decided here, before MONAI (whose distance metrics are undefined for them):
- both empty: Dice 1, IoU 1, NSD 1, HD95 0 (a perfect answer to "there is nothing here");
- exactly one empty: Dice 0, IoU 0, NSD 0, HD95 = the image diagonal in physical units. The
  diagonal is the largest distance possible inside the image, so a missed or hallucinated object
  is the worst finite score and still counts in means (NaN would silently drop those images).

HD95 is MONAI's 95th-percentile symmetric Hausdorff distance; NSD is MONAI's normalised surface
Dice with a boundary tolerance in the same units as `spacing` (pixels by default).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

METRIC_NAMES = ("dice", "iou", "hd95", "nsd")


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


def segmentation_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0),
    nsd_tolerance: float = 2.0,
) -> dict[str, float]:
    """Dice, IoU, HD95 and NSD of boolean (H, W) masks."""
    p = np.asarray(pred).astype(bool)
    t = np.asarray(truth).astype(bool)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"prediction {p.shape} and ground truth {t.shape} must be equal 2-D shapes")
    overlap = {"dice": dice(p, t), "iou": iou(p, t)}  # 1 when both are empty, 0 when one is
    p_empty, t_empty = not p.any(), not t.any()
    if p_empty and t_empty:
        return {**overlap, "hd95": 0.0, "nsd": 1.0}
    if p_empty or t_empty:
        diagonal = math.hypot(p.shape[0] * spacing[0], p.shape[1] * spacing[1])
        return {**overlap, "hd95": diagonal, "nsd": 0.0}
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument in get_mask_edges.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        return {**overlap, **_monai_distances(p, t, spacing, nsd_tolerance)}


def _monai_distances(p: np.ndarray, t: np.ndarray, spacing: Sequence[float], nsd_tolerance: float) -> dict[str, float]:
    import torch
    from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric

    yp = torch.from_numpy(p)[None, None].float()
    yt = torch.from_numpy(t)[None, None].float()
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        yp, yt, spacing=list(spacing)
    )
    nsd = SurfaceDiceMetric([nsd_tolerance], include_background=True, reduction="none")(
        yp, yt, spacing=list(spacing)
    )
    return {"hd95": float(hd95.item()), "nsd": float(nsd.item())}
