"""Segmentation metrics for one binary 2-D prediction against its ground truth, via MONAI.

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
from typing import Sequence

import numpy as np

METRIC_NAMES = ("dice", "iou", "hd95", "nsd")


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
    p_empty, t_empty = not p.any(), not t.any()
    if p_empty and t_empty:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    if p_empty or t_empty:
        diagonal = math.hypot(p.shape[0] * spacing[0], p.shape[1] * spacing[1])
        return {"dice": 0.0, "iou": 0.0, "hd95": diagonal, "nsd": 0.0}
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument in get_mask_edges.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        return _monai_metrics(p, t, spacing, nsd_tolerance)


def _monai_metrics(p: np.ndarray, t: np.ndarray, spacing: Sequence[float], nsd_tolerance: float) -> dict[str, float]:
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDiceMetric

    yp = torch.from_numpy(p)[None, None].float()
    yt = torch.from_numpy(t)[None, None].float()
    dice = DiceMetric(include_background=True, reduction="none")(yp, yt)
    iou = MeanIoU(include_background=True, reduction="none")(yp, yt)
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        yp, yt, spacing=list(spacing)
    )
    nsd = SurfaceDiceMetric([nsd_tolerance], include_background=True, reduction="none")(
        yp, yt, spacing=list(spacing)
    )
    return {
        "dice": float(dice.item()),
        "iou": float(iou.item()),
        "hd95": float(hd95.item()),
        "nsd": float(nsd.item()),
    }


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice alone, with the same empty-mask rule (fast path for validation during training)."""
    p = np.asarray(pred).astype(bool)
    t = np.asarray(truth).astype(bool)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total
