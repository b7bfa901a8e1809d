"""Mask agreement: Dice and IoU (two empty masks agree perfectly), and per-backend summaries."""

from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def agreement(logits: dict[str, np.ndarray], reference: dict[str, np.ndarray], threshold: float = 0.0) -> dict:
    """Per-image mask Dice and max |logit error| of `logits` against `reference` (same images)."""
    missing = sorted(set(reference) - set(logits))
    if missing:
        raise ValueError(f"no logits for {', '.join(missing)}")
    per_image = {}
    for name, ref in reference.items():
        out = logits[name]
        per_image[name] = {
            "dice": dice(out >= threshold, ref >= threshold),
            "max_abs_logit_error": float(np.max(np.abs(out.astype(np.float64) - ref))),
        }
    dices = [v["dice"] for v in per_image.values()]
    return {
        "dice_min": min(dices),
        "dice_mean": float(np.mean(dices)),
        "max_abs_logit_error": max(v["max_abs_logit_error"] for v in per_image.values()),
        "per_image": per_image,
    }


def ground_truth_scores(logits: dict[str, np.ndarray], masks: dict[str, np.ndarray], threshold: float = 0.0) -> dict | None:
    """Mean Dice/IoU of the predicted masks against ground truth (None without masks)."""
    if not masks:
        return None
    per_image = {
        name: {"dice": dice(logits[name] >= threshold, gt), "iou": iou(logits[name] >= threshold, gt)}
        for name, gt in masks.items()
    }
    return {
        "dice_mean": float(np.mean([v["dice"] for v in per_image.values()])),
        "iou_mean": float(np.mean([v["iou"] for v in per_image.values()])),
        "images": len(per_image),
        "per_image": per_image,
    }
