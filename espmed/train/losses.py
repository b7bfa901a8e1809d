"""Segmentation losses: MONAI Dice + focal (or BCE) on the final mask, BCE on the SPPG patch map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import SegmentationOutput
from .config import LossWeights


class SegmentationLoss(nn.Module):
    """`weights.dice * Dice + weights.focal * focal + weights.bce * BCE` on the mask logits at input
    size, plus `weights.patch * BCE(patch_logits, max_pool(gt))`: a patch is foreground when any of
    its pixels is (the SPPG target of the release). Dice is per image (`batch=False`), so the loss
    of a batch is the mean of per-image losses and splitting a batch across processes or
    micro-batches does not change it."""

    def __init__(self, weights: LossWeights) -> None:
        super().__init__()
        from monai.losses import DiceLoss, FocalLoss

        self.weights = weights
        self.dice = DiceLoss(sigmoid=True, batch=False)
        self.focal = FocalLoss(gamma=2.0, use_softmax=False)

    def forward(self, out: SegmentationOutput, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.weights
        logits = out.masks.float()
        parts: dict[str, torch.Tensor] = {}
        if w.dice:
            parts["dice"] = w.dice * self.dice(logits, mask)
        if w.focal:
            parts["focal"] = w.focal * self.focal(logits, mask)
        if w.bce:
            parts["bce"] = w.bce * F.binary_cross_entropy_with_logits(logits, mask)
        if w.patch:
            stride = mask.shape[-1] // out.patch_logits.shape[-1]
            target = F.max_pool2d(mask, kernel_size=stride, stride=stride)
            parts["patch"] = w.patch * F.binary_cross_entropy_with_logits(out.patch_logits.float(), target)
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}
