"""The exportable graph: one modality baked in, `images -> (lowres_masks, patch_logits)`.

No prompt loop and no modality gather: the model is specialised to one controller and the query
index is a Python constant, so every exported graph is plain layers. Upsampling to the original
image size and thresholding stay outside (the runtime does them with `runtimes.preprocess`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from espmed.errors import ExportError, ModalityError
from espmed.model import ESPMedSAM
from espmed.runtimes.base import Segmenter
from espmed.runtimes.metadata import ArtifactMetadata


class ExportGraph(nn.Module):
    """A specialised ESP-MedSAM whose forward returns what every artifact outputs."""

    def __init__(self, model: ESPMedSAM, modality: str | int) -> None:
        super().__init__()
        cfg = model.config
        try:
            self.modality_index = cfg.modality_index(modality)
            self.model = model.specialize(self.modality_index).eval()
        except ModalityError as exc:
            raise ExportError(f"cannot export modality {modality!r}: {exc}") from None
        self.modality = cfg.modalities[self.modality_index]

    @property
    def config(self):
        return self.model.config

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images, self.modality_index)
        return out.lowres_masks, out.patch_logits


class GraphSegmenter(Segmenter):
    """The FP32 reference of the accuracy gate: the export graph in torch behind the runtimes'
    own preprocess, postprocess and mask rule (metadata: the artifact's, dynamic batch)."""

    backend = "torch"

    def __init__(self, graph: ExportGraph, metadata: ArtifactMetadata) -> None:
        reference = dataclasses.replace(metadata, target="torch", backend="torch", precision="fp32", batch=0)
        super().__init__(reference, Path(f"{metadata.preset}-{metadata.modality}.torch"))
        self.graph = graph

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            lowres, patches = self.graph(torch.from_numpy(x))
        return lowres.float().numpy(), patches.float().numpy()


def choose_modality(
    model: ESPMedSAM, modality: str | int | None, *, pick: Callable[[tuple[str, ...]], str] | None = None
) -> str:
    """The modality to export: the one given; else, of several, `pick(available)` when given (the
    bench picks from its data); else the model's default (`ESPMedSAM.default_modality`)."""
    available = model.available_modalities
    if modality is not None:
        try:
            return model.config.modalities[model.config.modality_index(modality)]
        except ModalityError as exc:
            raise ExportError(str(exc)) from None
    if len(available) > 1 and pick is not None:
        return pick(available)
    return model.default_modality
