"""SPPG, the self-patch prompt generator: a coarse foreground patch map turned into a dense prompt."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class SelfPatchPromptGenerator(nn.Module):
    """Embedding (B, D, h, w) -> patch logits (B, 1, h/2, w/2) and dense prompt (B, D, h, w).

    The patch map is thresholded at logit >= 0 (sigmoid >= 0.5) without gradient, upsampled by
    nearest x2 and embedded. Release keys: `patch_decoder.{0,1,3}`, `dense_prompter.{0,1}`.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.patch_head = nn.Sequential(
            nn.Conv2d(dim, hidden, 2, stride=2),
            LayerNorm2d(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, 1, 1),
        )
        self.prompt_embed = nn.Sequential(nn.Conv2d(1, dim, 1), LayerNorm2d(dim), nn.GELU())

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch_logits = self.patch_head(embedding)
        patch_mask = (patch_logits.detach() >= 0).to(embedding.dtype)
        patch_mask = F.interpolate(patch_mask, scale_factor=2.0, mode="nearest")
        return patch_logits, self.prompt_embed(patch_mask)
