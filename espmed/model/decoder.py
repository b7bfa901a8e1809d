"""QDMD, the query-decoupled modality decoder.

SAM's two-way transformer runs all learnable modality queries against the prompted image
embedding; only the query of each image's modality is turned into a mask (one-to-one decoding).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, output_upscaling
from .position_encoding import PositionEmbeddingRandom
from .transformer import TwoWayTransformer


class QueryDecoupledModalityDecoder(nn.Module):
    """Embedding + dense prompt (B, D, h, w) -> low-resolution mask logits (B, 1, 4h, 4w)."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int,
        num_queries: int,
        upscale_dims: tuple[int, int],
        num_hypernetworks: int,
    ) -> None:
        super().__init__()
        self.queries = nn.Embedding(num_queries, dim)
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.transformer = TwoWayTransformer(
            depth=depth, embedding_dim=dim, num_heads=num_heads, mlp_dim=mlp_dim,
            attention_downsample_rate=attention_downsample_rate,
        )
        u1 = upscale_dims[1]
        self.output_upscaling = output_upscaling(dim, upscale_dims)
        self.hypernetworks = nn.ModuleList(MLP(dim, dim, u1, 3) for _ in range(num_hypernetworks))

    def decode_queries(
        self, embedding: torch.Tensor, dense_prompt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer outputs for every query (B, Q, D) and the upscaled image (B, U, 4h, 4w)."""
        b, c, h, w = embedding.shape
        pos = self.pe_layer(h, w).unsqueeze(0).expand(b, -1, -1, -1)
        tokens = self.queries.weight.unsqueeze(0).expand(b, -1, -1)
        hs, src = self.transformer(embedding + dense_prompt, pos, tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        return hs, upscaled

    def query_masks(
        self, query_out: torch.Tensor, upscaled: torch.Tensor, hypernetwork: int | torch.Tensor
    ) -> torch.Tensor:
        """Mask logits (B, 1, H', W') from one query output per sample (B, D)."""
        if isinstance(hypernetwork, int):
            weights = self.hypernetworks[hypernetwork](query_out)
        else:
            all_weights = torch.stack([mlp(query_out) for mlp in self.hypernetworks])
            weights = all_weights[hypernetwork, torch.arange(query_out.shape[0], device=query_out.device)]
        b, u, h, w = upscaled.shape
        return (weights.unsqueeze(1) @ upscaled.view(b, u, h * w)).view(b, 1, h, w)

    def forward(
        self,
        embedding: torch.Tensor,
        dense_prompt: torch.Tensor,
        query: int | torch.Tensor,
        hypernetwork: int | torch.Tensor,
    ) -> torch.Tensor:
        hs, upscaled = self.decode_queries(embedding, dense_prompt)
        if isinstance(query, int):
            query_out = hs[:, query]
        else:
            query_out = hs[torch.arange(hs.shape[0], device=hs.device), query]
        return self.query_masks(query_out, upscaled, hypernetwork)
