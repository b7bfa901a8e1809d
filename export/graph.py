"""The exportable graphs, each plain layers with names `GRAPH_IO` gives its inputs and outputs.

`ExportGraph` is the self-prompted model with one modality baked in, `images -> (lowres_masks,
patch_logits)`: no prompt loop and no modality gather, the model is specialised to one controller
and the query index is a Python constant. The box-prompted pair SAM deploys is `BoxEncoderGraph`
(`images -> embedding`, one controller baked in or the shared trunk alone) and `BoxDecoderGraph`
(`embedding (1, D, S/16, S/16), boxes (N, 4) -> lowres_masks (N, 1, S/4, S/4), iou (N, 1)`, boxes in
the model input's pixels). Upsampling to the original image size, mapping boxes through the
letterbox and thresholding stay outside (the runtime does them with `runtimes.preprocess`).
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
from espmed.runtimes.metadata import SHARED_TRUNK, ArtifactMetadata


def _specialize(model: ESPMedSAM, modality: str | int) -> tuple[ESPMedSAM, int]:
    """A copy of `model` keeping only `modality`'s controller, and the modality's index."""
    try:
        index = model.config.modality_index(modality)
        return model.specialize(index).eval(), index
    except ModalityError as exc:
        raise ExportError(f"cannot export modality {modality!r}: {exc}") from None


class Graph(nn.Module):
    """What every export graph tells the exporter: its kind (`GRAPH_IO` names its inputs and outputs),
    the modality it runs, and inputs to trace it with."""

    kind = "self-prompted"
    label = "model"
    dim = "batch"  # the name of the dynamic first dimension
    dynamic_inputs: tuple[bool, ...] = (True,)  # which inputs have it

    def __init__(self, model: ESPMedSAM, modality_index: int, modality: str) -> None:
        super().__init__()
        self.model, self.modality_index, self.modality = model, modality_index, modality

    @property
    def config(self):
        return self.model.config

    def example(self, n: int) -> tuple[torch.Tensor, ...]:
        """Inputs to trace with, `n` images."""
        s = self.config.image_size
        return (torch.zeros(n, 3, s, s),)


class ExportGraph(Graph):
    """A specialised ESP-MedSAM whose forward returns what every self-prompted artifact outputs."""

    def __init__(self, model: ESPMedSAM, modality: str | int) -> None:
        specialised, index = _specialize(model, modality)
        super().__init__(specialised, index, model.config.modalities[index])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images, self.modality_index)
        return out.lowres_masks, out.patch_logits


class BoxEncoderGraph(Graph):
    """The box path's image encoder: under `modality`'s controller, or (None) the shared trunk alone."""

    kind = "box-encoder"
    label = "image encoder"

    def __init__(self, model: ESPMedSAM, modality: str | int | None) -> None:
        if not model.has_box_prompts:
            raise ExportError("this checkpoint has no box-prompted path; export it with --prompt self")
        if modality is None:
            super().__init__(model.eval(), -1, SHARED_TRUNK)
        else:
            specialised, index = _specialize(model, modality)
            super().__init__(specialised, index, model.config.modalities[index])
        self._controller = None if modality is None else self.modality_index

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed_for_boxes(images, self._controller)


class BoxDecoderGraph(Graph):
    """The box path's prompt decoder of `encoder`'s model: one image's embedding and N boxes."""

    kind = "box-decoder"
    label = "prompt decoder"
    dim = "boxes"
    dynamic_inputs = (False, True)

    def __init__(self, encoder: BoxEncoderGraph) -> None:
        super().__init__(encoder.model, encoder.modality_index, encoder.modality)

    def example(self, n: int) -> tuple[torch.Tensor, ...]:
        """One embedding and `n` boxes (the whole input) to trace with."""
        s, g = self.config.image_size, self.config.image_size // 16
        return torch.zeros(1, self.config.prompt_dim, g, g), torch.tensor([[0.0, 0.0, s - 1.0, s - 1.0]] * n)

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.decode_boxes(embedding, boxes)
        return out.lowres_masks, out.iou


class GraphSegmenter(Segmenter):
    """The FP32 reference of the accuracy gate: the export graph in torch behind the runtimes' own
    preprocess, postprocess and mask rule (metadata: the artifact's, dynamic batch). A box encoder's
    reference runs its `decoder` graph too."""

    backend = "torch"

    def __init__(self, graph: Graph, metadata: ArtifactMetadata, decoder: BoxDecoderGraph | None = None) -> None:
        reference = dataclasses.replace(metadata, target="torch", backend="torch", precision="fp32", batch=0)
        super().__init__(reference, Path(f"{metadata.preset}-{metadata.modality}.torch"))
        self.graph = graph
        self.decoder = decoder

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            lowres, patches = self.graph(torch.from_numpy(x))
        return lowres.float().numpy(), patches.float().numpy()

    def _embed(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.graph(torch.from_numpy(x)).float().numpy()

    def _decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            lowres, iou = self.decoder(torch.from_numpy(embedding), torch.from_numpy(boxes))
        return lowres.float().numpy(), iou.float().numpy()


def export_graphs(model: ESPMedSAM, modality: str | int | None, prompt: str) -> tuple[Graph, BoxDecoderGraph | None]:
    """(the artifact's graph, the prompt decoder beside it or None) of one export: the self-prompted
    model under `modality` (given, else the default), or for box prompts the image encoder (under
    `modality`'s controller, else the shared trunk) and its decoder."""
    if prompt == "self":
        return ExportGraph(model, choose_modality(model, modality)), None
    encoder = BoxEncoderGraph(model, None if modality is None else choose_modality(model, modality))
    return encoder, BoxDecoderGraph(encoder)


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
