"""Parameter counts per part and FLOPs: what `espmed info` reports."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .esp_medsam import ESPMedSAM


def _count(params) -> int:
    return sum(p.numel() for p in params)


def parameter_table(model: ESPMedSAM) -> dict[str, int]:
    """Live parameters per part; the shared trunk is counted once however many controllers."""
    cfg = model.config
    table = {
        "trunk (shared)": _count(model.trunk_shared_parameters()),
        "neck": _count(model.neck.parameters()),
    }
    owners: dict[int, list[str]] = {}
    for name, ctrl in zip(cfg.modalities, cfg.controller_map, strict=True):
        if ctrl >= 0:
            owners.setdefault(ctrl, []).append(name)
    for ctrl in range(cfg.num_controllers):
        names = owners.get(ctrl, [])
        label = "all modalities" if len(names) == len(cfg.modalities) and len(names) > 1 else ", ".join(names)
        table[f"controller {ctrl} ({label})"] = _count(model.controller_parameters(ctrl))
    table["SPPG"] = _count(model.sppg.parameters())
    table["decoder (QDMD)"] = _count(model.decoder.parameters())
    if model.has_box_prompts:
        table["box path: patch embed"] = _count(model.box_patch_embed.parameters())
        table["box path: prompt encoder"] = _count(model.prompt_encoder.parameters())
        table["box path: mask decoder"] = _count(model.box_decoder.parameters())
    table["total"] = _count(model.parameters())
    return table


def count_flops(model: ESPMedSAM, image_size: int | None = None, modality: int | str | None = None) -> int:
    """FLOPs (multiply and add counted separately) of one forward pass at `image_size`.

    Runs on the meta device, so it costs no real compute.
    """
    size = image_size or model.config.image_size
    if modality is None:
        modality = model.available_modalities[0]
    meta_model = ESPMedSAM(model.config).to("meta").eval()
    with FlopCounterMode(display=False) as counter:
        meta_model(torch.zeros(1, model.config.in_chans, size, size, device="meta"), modality)
    return counter.get_total_flops()


def count_box_flops(model: ESPMedSAM, image_size: int | None = None) -> tuple[int, int]:
    """FLOPs of the box-prompted path at `image_size`: (the image encoder, the prompt decoder per box)."""
    size = image_size or model.config.image_size
    meta_model = ESPMedSAM(model.config).to("meta").eval()
    with FlopCounterMode(display=False) as encoder:
        embedding = meta_model.embed_for_boxes(torch.zeros(1, model.config.in_chans, size, size, device="meta"))
    with FlopCounterMode(display=False) as decoder:
        meta_model.decode_boxes(embedding, torch.zeros(1, 4, device="meta"))
    return encoder.get_total_flops(), decoder.get_total_flops()
