"""Evaluation: predictions through the shared numpy pre/post-processing, metrics per image, summaries
per modality and domain (seen / unseen), a per-image CSV and optional prediction PNGs. Modalities with
a classical baseline (`espmed.baseline`) get its scores on the same images beside the model's."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_bytes, write_text
from ..baseline import BASELINES
from ..data.sources import Sample
from ..metrics import METRIC_NAMES, dice, segmentation_metrics
from ..model import ESPMedSAM
from ..runtimes.masks import mask_from_logits
from ..runtimes.preprocess import preprocess, restore_logits


@torch.no_grad()
def predict_logits(model: ESPMedSAM, samples: Sequence[Sample], batch_size: int = 8) -> list[np.ndarray]:
    """Mask logits at each sample's original size, as every espmed runtime computes them:
    numpy letterbox preprocessing -> network -> low-resolution logits -> `restore_logits`."""
    cfg = model.config
    pre = cfg.preprocessing
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[np.ndarray | None] = [None] * len(samples)
    by_modality: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_modality[s.modality].append(i)
    try:
        for modality, indices in by_modality.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                inputs, boxes = zip(*(
                    preprocess(samples[i].image, cfg.image_size, pre.mean, pre.std, pre.resize)
                    for i in chunk
                ), strict=True)
                x = torch.from_numpy(np.stack(inputs)).to(device)
                lowres = model(x, modality).lowres_masks.float().cpu().numpy()
                for i, low, box in zip(chunk, lowres, boxes, strict=True):
                    out[i] = restore_logits(low[0], box)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def mean_dice_by_modality(model: ESPMedSAM, samples: Sequence[Sample], batch_size: int = 8) -> dict[str, float]:
    """Mean Dice per modality (validation during training: Dice only, fast)."""
    threshold = model.config.preprocessing.mask_threshold
    scores: dict[str, list[float]] = defaultdict(list)
    for s, logits in zip(samples, predict_logits(model, samples, batch_size), strict=True):
        scores[s.modality].append(dice(mask_from_logits(logits, threshold), s.mask))
    return {m: float(np.mean(v)) for m, v in scores.items()}


def _summary(rows: Iterable[dict]) -> dict[str, dict]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["domain"], r["modality"])].append(r)
    summary: dict[str, dict] = {}
    for (domain, modality), rs in sorted(groups.items()):
        entry = {"images": len(rs)}
        for m in METRIC_NAMES:
            vals = np.array([r[m] for r in rs], dtype=np.float64)
            entry[m] = float(vals.mean())
            entry[f"{m}_std"] = float(vals.std())
        summary.setdefault(domain, {})[modality] = entry
    return summary


def _png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def evaluate(
    model: ESPMedSAM,
    samples: Sequence[Sample],
    out_dir: str | Path | None = None,
    *,
    save_predictions: bool = False,
    nsd_tolerance: float = 2.0,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Per-image Dice/IoU/HD95/NSD and per-domain, per-modality means; for modalities with a classical
    baseline, its per-image Dice (`baseline_dice`) and its own summary (`baseline`: method, summary).

    With `out_dir`: writes `per_image.csv`, `summary.json` and (with `save_predictions`)
    `predictions/<name>.png` (0/255 masks at the original image size).
    """
    threshold = model.config.preprocessing.mask_threshold
    logits = predict_logits(model, samples, batch_size)
    rows, baseline_rows = [], []
    iterator = zip(samples, logits, strict=True)
    if progress:
        from rich.progress import track

        iterator = track(iterator, total=len(samples), description="metrics")
    for s, lg in iterator:
        pred = mask_from_logits(lg, threshold)
        metrics = segmentation_metrics(pred, s.mask, nsd_tolerance=nsd_tolerance)
        row = {
            "name": s.name,
            "modality": s.modality,
            "domain": s.domain,
            "height": s.mask.shape[0],
            "width": s.mask.shape[1],
            "truth_pixels": int(s.mask.sum()),
            "pred_pixels": int(pred.sum()),
            **metrics,
            "baseline_dice": None,  # this modality has no baseline
        }
        baseline = BASELINES.get(s.modality)
        if baseline is not None:
            scores = segmentation_metrics(baseline(s.image), s.mask, nsd_tolerance=nsd_tolerance)
            row["baseline_dice"] = scores["dice"]
            baseline_rows.append({"modality": s.modality, "domain": s.domain, **scores})
        rows.append(row)
        if out_dir is not None and save_predictions:
            write_bytes(Path(out_dir) / "predictions" / f"{s.name}.png", _png(pred))
    methods = {m: BASELINES[m].name for m in sorted({r["modality"] for r in baseline_rows})}
    result = {"nsd_tolerance_px": nsd_tolerance, "summary": _summary(rows),
              "baseline": {"methods": methods, "summary": _summary(baseline_rows)}, "images": rows}
    if out_dir is not None:
        out = Path(out_dir)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()})
        write_text(out / "per_image.csv", buf.getvalue())
        write_text(out / "summary.json", json.dumps({k: v for k, v in result.items() if k != "images"}, indent=2))
    return result
