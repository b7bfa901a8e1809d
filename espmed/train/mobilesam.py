"""Initialise the trunk (and neck) from a MobileSAM or TinyViT checkpoint.

ESP-MedSAM's trunk is MobileSAM's TinyViT plus modality controllers, so MobileSAM's
`image_encoder.*` keys are the release's `SemiTViT.*` keys: they go through the release mapping of
`espmed.model.checkpoint`. A TinyViT ImageNet checkpoint (`patch_embed.*`, `layers.*`, no neck) maps
the same way. Controllers stay as initialised (they do not exist in MobileSAM). With
`decoder=True` MobileSAM's mask decoder transformer, upscaling, first hypernetwork MLP and the
prompt encoder's positional encoding are loaded too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model import ESPMedSAM
from ..model.checkpoint import read_state_dict, release_to_native_key

#: MobileSAM / TinyViT keys with no counterpart: classification head, prompt encoder embeddings,
#: the extra multimask hypernetworks and the IoU head.
_IGNORED_PREFIXES = (
    "image_encoder.norm_head.", "image_encoder.head.", "norm_head.", "head.",
    "prompt_encoder.point_embeddings.", "prompt_encoder.not_a_point_embed.", "prompt_encoder.no_mask_embed.",
    "prompt_encoder.mask_downscaling.", "mask_decoder.iou_token.", "mask_decoder.mask_tokens.",
    "mask_decoder.iou_prediction_head.",
)


def mobilesam_to_native_key(key: str) -> str | None:
    """Native key for a MobileSAM/TinyViT key, or None when it has no counterpart."""
    if key.startswith(_IGNORED_PREFIXES) or key.endswith("attention_bias_idxs"):
        return None
    hyper = "mask_decoder.output_hypernetworks_mlps."
    if key.startswith(hyper) and not key.startswith(hyper + "0."):
        return None
    if key.startswith("image_encoder."):
        key = "SemiTViT." + key[len("image_encoder."):]
    elif key.startswith(("patch_embed.", "layers.")):
        key = "SemiTViT." + key
    return release_to_native_key(key)


def read_mobilesam_state(path: str | Path) -> dict[str, torch.Tensor]:
    return read_state_dict(path, "MobileSAM/TinyViT checkpoint")


def mapped_state(
    model: ESPMedSAM, state: dict[str, torch.Tensor], *, decoder: bool, source_name: str
) -> dict[str, torch.Tensor]:
    """{native key: tensor} for the MobileSAM/TinyViT-style keys of `state` (trunk and neck; with
    `decoder`, the decoder parts and positional encoding too).

    Every mapped tensor must exist in the model with the same shape (MobileSAM is the release
    width: use the `esp-medsam` preset); otherwise the error names them.
    """
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    for key, value in state.items():
        native = mobilesam_to_native_key(key)
        if native is None or (not decoder and not native.startswith(("trunk.", "neck."))):
            continue
        if native not in target:
            wrong.append(f"{key} (no {native} in the model)")
        elif target[native].shape != value.shape:
            wrong.append(f"{key} {tuple(value.shape)} != {tuple(target[native].shape)}")
        else:
            mapped[native] = value
    if wrong:
        more = f" (+{len(wrong) - 4} more)" if len(wrong) > 4 else ""
        raise CheckpointError(f"{source_name}: does not fit this model: {'; '.join(wrong[:4])}{more}")
    if not any(k.startswith("trunk.") for k in mapped):
        raise CheckpointError(
            f"{source_name}: no TinyViT trunk weights found (expected image_encoder.* or layers.* keys)"
        )
    return mapped


def load_mobilesam_into(model: ESPMedSAM, path: str | Path, decoder: bool = False) -> list[str]:
    """Copy MobileSAM/TinyViT weights into `model` in place; returns the native keys loaded.
    Nothing is loaded when any mapped tensor does not fit (see `mapped_state`)."""
    mapped = mapped_state(model, read_mobilesam_state(path), decoder=decoder, source_name=str(path))
    target = model.state_dict()
    with torch.no_grad():
        for k, v in mapped.items():
            target[k].copy_(v)
    return sorted(mapped)
