"""SAM's prompt encoder, box prompts only (LiteMedSAM's `prompt_encoder`, keys renamed).

A box becomes two sparse tokens (its corners' positional encodings plus a learned corner embedding
each); without a mask prompt the dense prompt is the learned `no_mask_embed` everywhere. Points and
mask prompts are not built: espmed prompts with boxes only.
"""

from __future__ import annotations

import torch
from torch import nn

from .position_encoding import PositionEmbeddingRandom


class BoxPromptEncoder(nn.Module):
    """Boxes (N, 4) in the prompt frame -> sparse tokens (N, 2, D); dense prompt and image PE (1, D, h, w).

    The prompt frame is the image the encoder was trained to see at `frame_stride` pixels per
    embedding cell (LiteMedSAM: a 256² image for a 64² embedding, stride 4); coordinates are pixel
    indices of that frame, x = column, y = row, shifted to pixel centres as SAM does.
    """

    def __init__(self, *, dim: int, frame_stride: int) -> None:
        super().__init__()
        self.frame_stride = frame_stride
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.corner_embeddings = nn.Embedding(2, dim)  # SAM's point_embeddings[2] and [3]
        self.no_mask_embed = nn.Embedding(1, dim)

    def forward(self, boxes: torch.Tensor, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse (N, 2, D), dense (1, D, h, w)) for boxes (N, 4) = x0, y0, x1, y1."""
        h, w = grid_hw
        frame = torch.tensor([w, h], dtype=boxes.dtype, device=boxes.device) * self.frame_stride
        corners = (boxes.reshape(-1, 2, 2) + 0.5) / frame
        sparse = self.pe_layer.encode(corners) + self.corner_embeddings.weight
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
        return sparse, dense
