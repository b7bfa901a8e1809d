"""TinyViT trunk with modality controllers (the release's `SemiTViT`), size-agnostic.

Follows MobileSAM's `tiny_vit_sam.py` layer by layer, with two changes that do not alter the
function: resolutions are read from the input (any multiple of 32 works), and transformer stages
keep tokens as (B, H, W, C) so no fixed 64x64 reshape exists.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .common import Conv2dBN
from .controller import ControllerBank, ExpertMLP

#: Which modality controller runs: one index for the batch, a (B,) tensor of indices, or None (none:
#: the shared trunk alone).
Controller = int | torch.Tensor | None


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 conv+BN with GELU between: image -> (B, C, H/4, W/4)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class PointwisePatchEmbed(nn.Module):
    """LiteMedSAM's patch embed: 1x1 conv+BN, GELU, 1x1 conv+BN; (B, 3, T, T) -> (B, C, T, T).

    With `block` > 1 it first takes the mean of each block x block tile, so that it reads a block x
    larger image as its teacher-size image: (B, 3, 4T, 4T) -> (B, C, T, T) for block 4.
    """

    def __init__(self, in_chans: int, embed_dim: int, *, block: int = 1) -> None:
        super().__init__()
        self.block = block
        half = embed_dim // 2
        self.seq = nn.Sequential(Conv2dBN(in_chans, half, 1), nn.GELU(), Conv2dBN(half, embed_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block > 1:
            x = F.avg_pool2d(x, self.block)
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, GELU after the residual add."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 conv (stride 1 or 2), 1x1 conv, GELU between; NCHW in and out."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks, then patch merging. NCHW in, NCHW out."""

    def __init__(self, *, dim: int, out_dim: int, depth: int, expand_ratio: float, merge_stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, merge_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


def relative_position_index(window_size: int) -> tuple[torch.Tensor, int]:
    """TinyViT's table index of |dy|, |dx| offsets for every pair of positions in a window."""
    points = list(itertools.product(range(window_size), range(window_size)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            if off not in offsets:
                offsets[off] = len(offsets)
            idxs.append(offsets[off])
    n = len(points)
    return torch.tensor(idxs, dtype=torch.long).view(n, n), len(offsets)


class WindowAttention(nn.Module):
    """Multi-head attention inside a window, with TinyViT's learned relative-position bias and the
    modality controller's extra key/value token."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        idx, num_offsets = relative_position_index(window_size)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        self.register_buffer("attention_bias_idxs", idx, persistent=False)

    def forward(
        self, x: torch.Tensor, kv_token: torch.Tensor | None = None, kv_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (rows, N, C) window tokens; kv_token (rows, heads, 1, hd); kv_bias (rows or 1, 1, 1, 1).
        Without a controller token: plain TinyViT window attention."""
        rows, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(rows, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=3)
        bias = self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0)  # 1, h, N, N
        if kv_token is not None:
            k = torch.cat([k, kv_token], dim=2)
            v = torch.cat([v, kv_token], dim=2)
            bias = torch.cat(  # (rows or 1, h, N, N + 1): SDPA broadcasts it over the windows
                [bias.expand(kv_bias.shape[0], -1, -1, -1), kv_bias.expand(-1, self.num_heads, n, 1)], dim=3
            )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(rows, n, -1))


class TinyViTBlock(nn.Module):
    """Window attention (+ controller token), depthwise local conv, then x + MLP(x) + expert(x)."""

    def __init__(
        self, *, dim: int, num_heads: int, window_size: int, mlp_ratio: float, num_controllers: int
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)
        self.mlp = ExpertMLP(dim, int(dim * mlp_ratio))
        self.controllers = ControllerBank(
            num_controllers=num_controllers,
            dim=dim,
            num_heads=num_heads,
            head_dim=dim // num_heads,
            mlp_ratio=mlp_ratio,
        )

    def forward(self, x: torch.Tensor, ctrl: Controller) -> torch.Tensor:
        """x: (B, H, W, C); ctrl: controller index for the batch, a (B,) tensor of them, or None
        (no controller: the shared trunk alone, plain TinyViT)."""
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b = (ws - h % ws) % ws
        pad_r = (ws - w % ws) % ws
        t = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if (pad_b or pad_r) else x
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        windows = t.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        if ctrl is None:
            t = self.attn(windows)
        else:
            token, bias = self.controllers.kv(ctrl, windows.shape[0], nh * nw)
            t = self.attn(windows, token, bias)
        t = t.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            t = t[:, :h, :w]
        x = x + t
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if ctrl is None:
            return x + self.mlp(x)
        return x + self.mlp(x) + self.controllers.expert(x, ctrl)


class TransformerStage(nn.Module):
    """TinyViT blocks, then an optional patch merging. (B, H, W, C) in and out."""

    def __init__(
        self,
        *,
        dim: int,
        out_dim: int | None,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        num_controllers: int,
        merge_stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(
                dim=dim, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
                num_controllers=num_controllers,
            )
            for _ in range(depth)
        )
        self.downsample = PatchMerging(dim, out_dim, merge_stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor, ctrl: Controller) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, ctrl)
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x


class TinyViTTrunk(nn.Module):
    """Patch embed + 1 conv stage + transformer stages: image -> (B, C_last, H/16, W/16)."""

    def __init__(
        self,
        *,
        in_chans: int,
        embed_dims: tuple[int, ...],
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        window_sizes: tuple[int, ...],
        mlp_ratio: float,
        mbconv_expand_ratio: float,
        merge_strides: tuple[int, ...],
        num_controllers: int,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        stages: list[nn.Module] = [
            ConvStage(
                dim=embed_dims[0], out_dim=embed_dims[1], depth=depths[0], expand_ratio=mbconv_expand_ratio,
                merge_stride=merge_strides[0],
            )
        ]
        for i in range(1, len(embed_dims)):
            last = i == len(embed_dims) - 1
            stages.append(
                TransformerStage(
                    dim=embed_dims[i],
                    out_dim=None if last else embed_dims[i + 1],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_sizes[i],
                    mlp_ratio=mlp_ratio,
                    num_controllers=num_controllers,
                    merge_stride=1 if last else merge_strides[i],
                )
            )
        self.layers = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor, ctrl: Controller, patch_embed: nn.Module | None = None) -> torch.Tensor:
        """`patch_embed` replaces the trunk's own (the box-prompted path's: LiteMedSAM's)."""
        x = self.layers[0]((patch_embed or self.patch_embed)(x)).permute(0, 2, 3, 1)
        for stage in self.layers[1:]:
            x = stage(x, ctrl)
        return x.permute(0, 3, 1, 2)
