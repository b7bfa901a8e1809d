"""Neck: project the trunk's features to the decoder width (SAM-style, bias-free convs)."""

from __future__ import annotations

from torch import nn

from .common import LayerNorm2d


class Neck(nn.Sequential):
    """conv1x1 -> LayerNorm2d -> conv3x3 -> LayerNorm2d (release keys `neck.0..3`)."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__(
            nn.Conv2d(in_chans, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
