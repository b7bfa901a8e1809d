"""Torch reference backend: a release `.pth` or native `.safetensors` checkpoint, run in PyTorch.

The only module of `espmed.runtimes` that imports torch, and only when a checkpoint is loaded.
It feeds the same numpy pre-processing as the exported backends, so its masks are the reference
the artifacts are compared with. A checkpoint with a box-prompted path also segments boxes: under
the named modality's controller, or with none named on the shared trunk alone (LiteMedSAM's
encoder). Forward passes run under `torch.inference_mode()` per call on an eval-mode model, which is
safe from many threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from espmed import __version__
from espmed.errors import ModalityError, require

from .base import Segmenter
from .metadata import SHARED_TRUNK, ArtifactMetadata


class TorchSegmenter(Segmenter):
    backend = "torch"

    def __init__(
        self,
        path: str | Path,
        modality: str | int | None = None,
        threads: int | None = None,
        image_size: int | None = None,
    ) -> None:
        torch = require("torch", "torch")
        from espmed.atomic import file_sha256
        from espmed.model import load_checkpoint

        path = Path(path)
        model = load_checkpoint(path, image_size=image_size)
        cfg = model.config
        given = modality is not None
        if modality is None:
            modality = model.default_modality
        try:
            index = cfg.modality_index(modality)
            self.model = model.specialize(index).eval()
        except ModalityError as exc:  # name the checkpoint, as every other load error does
            raise ModalityError(f"{path}: {exc}") from None
        self._index = index
        # Boxes run under the modality's controller when one is named, else on the shared trunk alone.
        self._box_modality = index if given else None
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)  # process-wide: torch has no per-model thread pool
        self._torch = torch
        metadata = ArtifactMetadata(
            target="torch",
            backend="torch",
            precision="fp32",
            modality=cfg.modalities[index],
            modality_index=index,
            modalities=list(cfg.modalities),
            input_size=cfg.image_size,
            batch=0,
            preprocessing=cfg.preprocessing.to_dict(),
            preset=cfg.preset,
            espmed_version=__version__,
            source_checkpoint_sha256=file_sha256(path),
            library_versions={"torch": torch.__version__},
        )
        metadata.validate(str(path))
        super().__init__(metadata, path)

    @property
    def supports_boxes(self) -> bool:
        return self.model.has_box_prompts

    @property
    def box_modality(self) -> str:
        return SHARED_TRUNK if self._box_modality is None else self.metadata.modality

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x), self._index)
        return out.lowres_masks.float().numpy(), out.patch_logits.float().numpy()

    def _embed(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model.embed_for_boxes(self._torch.from_numpy(x), self._box_modality).float().numpy()

    def _decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.model.decode_boxes(torch.from_numpy(embedding), torch.from_numpy(boxes))
        return out.lowres_masks.float().numpy(), out.iou.float().numpy()
