"""SAM's random-Fourier positional encoding (`PositionEmbeddingRandom`): a dense grid, or given points."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingRandom(nn.Module):
    """sin/cos of a Gaussian projection of normalised pixel-centre coordinates.

    The Gaussian matrix is a checkpoint buffer (release key
    `prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`).
    """

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encoding (..., C) of (x, y) coordinates (..., 2) normalised to [0, 1]."""
        projected = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def forward(self, h: int, w: int) -> torch.Tensor:
        """Dense encoding (C, h, w) for an h x w grid."""
        gauss = self.positional_encoding_gaussian_matrix
        grid = torch.ones((h, w), dtype=gauss.dtype, device=gauss.device)
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)
