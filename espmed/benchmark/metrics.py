"""Per-backend summaries of mask agreement, with the one Dice/IoU (`espmed.metrics`) and mask rule (`runtimes.masks`)."""

from __future__ import annotations

import numpy as np

from espmed.metrics import dice, iou
from espmed.runtimes.masks import mask_from_logits


def agreement(logits: dict[str, np.ndarray], reference: dict[str, np.ndarray], threshold: float = 0.0) -> dict:
    """Per-image mask Dice and max |logit error| of `logits` against `reference` (same images)."""
    missing = sorted(set(reference) - set(logits))
    if missing:
        raise ValueError(f"no logits for {', '.join(missing)}")
    per_image = {}
    for name, ref in reference.items():
        out = logits[name]
        per_image[name] = {
            "dice": dice(mask_from_logits(out, threshold), mask_from_logits(ref, threshold)),
            "max_abs_logit_error": float(np.max(np.abs(out.astype(np.float64) - ref))),
        }
    dices = [v["dice"] for v in per_image.values()]
    return {
        "dice_min": min(dices),
        "dice_mean": float(np.mean(dices)),
        "max_abs_logit_error": max(v["max_abs_logit_error"] for v in per_image.values()),
        "per_image": per_image,
    }


def ground_truth_scores(
    logits: dict[str, np.ndarray], masks: dict[str, np.ndarray], threshold: float = 0.0
) -> dict | None:
    """Mean Dice/IoU of the predicted masks against ground truth (None without masks)."""
    if not masks:
        return None
    predicted = {name: mask_from_logits(logits[name], threshold) for name in masks}
    per_image = {
        name: {"dice": dice(predicted[name], gt), "iou": iou(predicted[name], gt)} for name, gt in masks.items()
    }
    return {
        "dice_mean": float(np.mean([v["dice"] for v in per_image.values()])),
        "iou_mean": float(np.mean([v["iou"] for v in per_image.values()])),
        "images": len(per_image),
        "per_image": per_image,
    }
