"""Per-backend summaries of mask agreement, with the one Dice/IoU (`espmed.metrics`) and mask rule
(`runtimes.masks`), and the columns a run derives from them and the timings: accuracy against the
torch FP32 reference and ground truth, speed-up and share of the GEMM peak."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from espmed.io import read_mask
from espmed.metrics import dice, iou
from espmed.runtimes.masks import mask_from_logits

from .options import REFERENCE

if TYPE_CHECKING:
    from .data import Sample
    from .model_prep import BenchModel


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


def _load_logits(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def add_accuracy(results: list[dict], model: BenchModel, samples: list[Sample], work: Path) -> None:
    """Dice / max logit error vs the torch reference, and vs ground truth where the data has masks
    (box prompts: of the union of an image's box masks, its logits the max over the boxes')."""
    threshold = model.threshold
    ref_path = work / f"{REFERENCE}.logits.npz"
    reference = _load_logits(ref_path) if ref_path.is_file() else None
    masks = {
        s.name: read_mask(s.mask)
        for s in samples
        if s.mask and (model.prompt == "box" or s.modality is None or s.modality == model.modality)
    }
    for rec in results:
        if rec["status"] != "ok":
            continue
        logits = _load_logits(work / f"{rec['name']}.logits.npz")
        if reference is not None:
            vs = agreement(logits, reference, threshold)
            rec["vs_fp32"] = vs
            rec["dice_drop"] = 1.0 - vs["dice_min"]
        rec["ground_truth"] = ground_truth_scores(logits, masks, threshold)


def add_ratios(results: list[dict], model: BenchModel, gemm: dict) -> None:
    """GFLOP/s, share of the GEMM peak and speed-up vs the torch reference of every measured row."""
    ref = next((r for r in results if r["name"] == REFERENCE and r["status"] == "ok"), None)
    for rec in results:
        if rec["status"] != "ok":
            continue
        p50_s = rec["latency_ms"]["p50"] / 1e3
        rec["gflops_per_s"] = model.gflops / p50_s
        rec["gemm_peak_share"] = rec["gflops_per_s"] / gemm["gflops"]
        rec["speedup_vs_torch"] = ref["latency_ms"]["p50"] / rec["latency_ms"]["p50"] if ref else None
