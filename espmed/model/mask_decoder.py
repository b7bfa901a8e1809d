"""SAM's mask decoder for box prompts (LiteMedSAM's `mask_decoder`, same structure and keys).

An IoU token and `num_mask_tokens` mask tokens run with the prompt's sparse tokens through the
two-way transformer; as LiteMedSAM runs it (multimask output off), mask token 0 through hypernetwork
0 gives the mask and the IoU head's first output its quality estimate. The other mask tokens stay:
they attend with token 0 in every layer, so the single-mask output depends on them.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, output_upscaling
from .transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Embedding (N, D, h, w) + prompts -> low-resolution mask logits (N, 1, 4h, 4w), IoU estimates (N, 1)."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int,
        upscale_dims: tuple[int, int],
        num_mask_tokens: int,
        iou_head_depth: int,
        iou_head_hidden_dim: int,
    ) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(
            depth=depth, embedding_dim=dim, num_heads=num_heads, mlp_dim=mlp_dim,
            attention_downsample_rate=attention_downsample_rate,
        )
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(num_mask_tokens, dim)
        u1 = upscale_dims[1]
        self.output_upscaling = output_upscaling(dim, upscale_dims)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, u1, 3) for _ in range(num_mask_tokens))
        self.iou_prediction_head = MLP(dim, iou_head_hidden_dim, num_mask_tokens, iou_head_depth)

    def forward(
        self, embedding: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (1 or N, D, h, w), image_pe and dense (1, D, h, w), sparse (N, T, D)."""
        n = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = (embedding + dense).expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, keys = self.transformer(src, image_pe.expand(n, -1, -1, -1), tokens)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        weights = self.output_hypernetworks_mlps[0](hs[:, 1])
        _, u, uh, uw = upscaled.shape
        masks = (weights.unsqueeze(1) @ upscaled.reshape(b, u, uh * uw)).reshape(b, 1, uh, uw)
        iou = self.iou_prediction_head(hs[:, 0])[:, :1]
        return masks, iou
