"""Small building blocks shared by the trunk, SPPG and decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Conv2dBN(nn.Sequential):
    """Bias-free convolution followed by BatchNorm (TinyViT's `Conv2d_BN`; keys `c`, `bn`)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False)
        )
        self.add_module("bn", nn.BatchNorm2d(out_chans))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (SAM's LayerNorm2d, eps 1e-6).

    Written as permute + `F.layer_norm` so that ONNX export keeps one LayerNormalization op.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (SAM's hypernetwork MLP; keys `layers.N`)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def output_upscaling(dim: int, upscale_dims: tuple[int, int]) -> nn.Sequential:
    """SAM's mask-decoder upscaling (keys `0`, `1`, `3`): (B, dim, h, w) -> (B, upscale_dims[1], 4h, 4w)."""
    u0, u1 = upscale_dims
    return nn.Sequential(
        nn.ConvTranspose2d(dim, u0, kernel_size=2, stride=2),
        LayerNorm2d(u0),
        nn.GELU(),
        nn.ConvTranspose2d(u0, u1, kernel_size=2, stride=2),
        nn.GELU(),
    )
