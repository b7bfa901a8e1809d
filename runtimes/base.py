"""The backend-independent part of a runtime: pre-process, run the graph, post-process.

A backend implements `_infer(x)` for one chunk whose batch size the artifact accepts; everything
else (input checks, chunking, letterboxing, restoring logits to the image size, thresholding,
timings) lives here so that every backend behaves identically. Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from espmed.errors import ArtifactError, ModalityError, PromptError

from .boxes import check_boxes, label_image, to_input_frame
from .masks import mask_from_logits
from .metadata import BOXES_NAME, EMBEDDING_NAME, GRAPH_IO, ArtifactMetadata, check_pair
from .preprocess import (
    RESIZE_MODES,
    Letterbox,
    patch_region,
    preprocess,
    restore_box_logits,
    restore_logits,
    sigmoid,
)

#: Images per graph call in `predict_batch` when the artifact's batch is dynamic.
DEFAULT_DYNAMIC_CHUNK = 8
#: Boxes per prompt-decoder call: the decoder's transformer runs on one copy of the embedding per
#: box (about 20 MB of activations each at 1024²), so `decode` bounds them.
BOX_CHUNK = 16


@dataclass(frozen=True)
class Chunk:
    """One graph call of `Segmenter.run_chunks`: its images' letterboxes and raw outputs."""

    boxes: list[Letterbox]
    lowres: np.ndarray  # (n, 1, S/4, S/4) mask logits
    patches: np.ndarray  # (n, 1, S/32, S/32) SPPG patch logits
    preprocess_ms: float
    infer_ms: float


@dataclass
class Prediction:
    """One image's segmentation at the image's own size."""

    mask: np.ndarray  # bool (H, W)
    probability: np.ndarray  # float32 (H, W), sigmoid of the logits
    patch_map: np.ndarray  # float32 SPPG patch probabilities covering the image (h/32-ish, w/32-ish)
    logits: np.ndarray | None = None  # float32 (H, W), only when asked for
    timings: dict[str, float] = field(default_factory=dict)  # ms: preprocess / infer / postprocess


@dataclass(frozen=True)
class ImageEmbedding:
    """`Segmenter.embed`'s result: what `decode` needs to segment any number of boxes on one image."""

    embedding: np.ndarray  # float32 (1, D, S/16, S/16)
    letterbox: Letterbox
    timings: dict[str, float] = field(default_factory=dict)  # ms: preprocess / encoder


@dataclass
class BoxPrediction:
    """One mask and one IoU estimate per box, at the image's own size."""

    masks: np.ndarray  # bool (N, H, W), mask k from box k
    iou: np.ndarray  # float32 (N,), the decoder's estimate of each mask's IoU
    boxes: np.ndarray  # float64 (N, 4), the boxes as clipped to the image
    logits: np.ndarray | None = None  # float32 (N, H, W), only when asked for
    timings: dict[str, float] = field(default_factory=dict)  # ms: decoder / postprocess (+ embed's)

    @property
    def pixels(self) -> np.ndarray:
        """Foreground pixels of each mask (N,)."""
        return self.masks.reshape(len(self.masks), -1).sum(axis=1)

    def label_image(self) -> np.ndarray:
        """Value k = box k's mask (1-based; overlaps: higher IoU estimate, then lower index)."""
        return label_image(self.masks, self.iou)


class Segmenter:
    """A loaded artifact. Safe to call from many threads at once (backends guarantee `_infer`)."""

    backend = "base"

    def __init__(self, metadata: ArtifactMetadata, source: Path) -> None:
        if metadata.graph == "box-decoder":
            raise ArtifactError(f"{source}: a prompt decoder runs beside its box encoder; load the encoder")
        self.metadata = metadata
        self.source = Path(source)
        pre = metadata.preprocessing
        self._resize = pre.get("resize", RESIZE_MODES[0])
        if self._resize not in RESIZE_MODES or pre.get("pad", "bottom-right") != "bottom-right":
            raise ArtifactError(
                f"{source}: unsupported preprocessing (resize {pre.get('resize')!r}, pad {pre.get('pad')!r}); "
                f"this runtime resizes {' or '.join(RESIZE_MODES)} with bottom-right padding"
            )
        self._mean = tuple(float(v) for v in pre["mean"])
        self._std = tuple(float(v) for v in pre["std"])
        self._threshold = float(pre.get("mask_threshold", 0.0))

    # -- backend hooks -------------------------------------------------------------------------
    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lowres_masks, patch_logits) for `x` (B, 3, S, S) float32 with B the artifact accepts."""
        raise NotImplementedError

    def _embed(self, x: np.ndarray) -> np.ndarray:
        """Box path: embedding (1, D, S/16, S/16) of one pre-processed image `x` (1, 3, S, S)."""
        raise NotImplementedError

    def _decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Box path: (lowres_masks (N, 1, S/4, S/4), iou (N, 1)) for one embedding and boxes (N, 4)
        float32 in the model input's pixels, 1 <= N <= BOX_CHUNK."""
        raise NotImplementedError

    @property
    def supports_boxes(self) -> bool:
        """The artifact is a box-prompted encoder (its decoder beside it)."""
        return self.metadata.graph == "box-encoder"

    @property
    def self_prompted(self) -> bool:
        """The artifact segments without prompts (`predict(image)`)."""
        return self.metadata.graph == "self-prompted"

    @property
    def box_modality(self) -> str:
        """Whose controller box prompts run under: a modality, or `SHARED_TRUNK` (none)."""
        return self.metadata.modality

    # -- properties ----------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.metadata.input_size

    @property
    def modality(self) -> str:
        return self.metadata.modality

    @property
    def chunk_size(self) -> int:
        """Images per graph call: the fixed batch, or `DEFAULT_DYNAMIC_CHUNK` for a dynamic one."""
        return self.metadata.batch or DEFAULT_DYNAMIC_CHUNK

    def __repr__(self) -> str:
        m = self.metadata
        batch = "dynamic" if m.dynamic_batch else m.batch
        return f"<{type(self).__name__} {self.source.name} {m.target} {m.modality} {m.input_size}px batch={batch}>"

    # -- raw graph -----------------------------------------------------------------------------
    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw graph call on a pre-processed batch (B, 3, S, S) float32, any B >= 1.

        A fixed-batch artifact gets the batch in chunks of its size, the last one zero-padded.
        """
        if not self.self_prompted:
            raise PromptError(f"{self.source.name}: a box-prompted artifact segments boxes only: give boxes")
        s = self.input_size
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != (3, s, s) or x.shape[0] < 1:
            raise ValueError(f"expected input of shape (B, 3, {s}, {s}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        fixed = self.metadata.batch
        if not fixed or x.shape[0] == fixed:
            return self._infer(x)
        lowres, patches = [], []
        for start in range(0, x.shape[0], fixed):
            part = x[start : start + fixed]
            n = part.shape[0]
            if n < fixed:
                part = np.concatenate([part, np.zeros((fixed - n, 3, s, s), np.float32)])
            lo, pa = self._infer(part)
            lowres.append(lo[:n])
            patches.append(pa[:n])
        return np.concatenate(lowres), np.concatenate(patches)

    # -- images --------------------------------------------------------------------------------
    def predict(self, image: np.ndarray, return_logits: bool = False, *, boxes=None) -> Prediction | BoxPrediction:
        """Segment one 2-D image (gray, RGB or RGBA, any numeric dtype); masks at its own size.

        Without `boxes`: the self-prompted mask (a `Prediction`). With `boxes` (N x 4, x0, y0, x1, y1
        in the image's pixels, see `runtimes.boxes`): one mask per box (a `BoxPrediction`).
        """
        if boxes is not None:
            return self.decode(self.embed(image), boxes, return_logits)
        return self.predict_batch([image], return_logits)[0]

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """The box path's embedding of one image: run once, then `decode` any number of boxes."""
        self._require_boxes()
        t0 = time.perf_counter()
        x, box = self.preprocess(image)
        t1 = time.perf_counter()
        embedding = np.asarray(self._embed(x[None]), np.float32)
        t2 = time.perf_counter()
        return ImageEmbedding(embedding, box, {"preprocess": (t1 - t0) * 1e3, "encoder": (t2 - t1) * 1e3})

    def decode(
        self, embedding: ImageEmbedding, boxes, return_logits: bool = False, *, source: str = ""
    ) -> BoxPrediction:
        """One mask (at the image's size) and one IoU estimate per box, from `embed`'s result."""
        self._require_boxes()
        letterbox = embedding.letterbox
        clipped = check_boxes(boxes, letterbox.original_hw, source)
        frame = to_input_frame(clipped, letterbox)
        t0 = time.perf_counter()
        lowres, iou = [], []
        for start in range(0, len(frame), BOX_CHUNK):
            lo, q = self._decode(embedding.embedding, frame[start : start + BOX_CHUNK])
            lowres.append(np.asarray(lo, np.float32))
            iou.append(np.asarray(q, np.float32).reshape(-1))
        t1 = time.perf_counter()
        logits = np.stack([restore_box_logits(lo[0], letterbox) for part in lowres for lo in part])
        result = BoxPrediction(
            masks=mask_from_logits(logits, self._threshold), iou=np.concatenate(iou), boxes=clipped,
            logits=logits if return_logits else None,
        )
        result.timings = {
            **embedding.timings, "decoder": (t1 - t0) * 1e3, "postprocess": (time.perf_counter() - t1) * 1e3,
        }
        return result

    def _require_boxes(self) -> None:
        if not self.supports_boxes:
            raise PromptError(
                f"{self.source.name}: this {'model' if self.backend == 'torch' else 'artifact'} has no "
                "box-prompted path; export the box pair (espmed export --prompt box) from a checkpoint that has one"
            )

    def predict_batch(
        self, images: Sequence[np.ndarray], return_logits: bool = False, chunk_size: int | None = None
    ) -> list[Prediction]:
        """Segment several images, `chunk_size` (default `self.chunk_size`) per graph call.

        Each prediction's `timings["infer"]` is its share of its chunk's graph time.
        """
        results: list[Prediction] = []
        for part in self.run_chunks(images, chunk_size or self.chunk_size):
            n = len(part.boxes)
            for i, box in enumerate(part.boxes):
                t3 = time.perf_counter()
                pred = self.postprocess(part.lowres[i, 0], part.patches[i, 0], box, return_logits)
                pred.timings = {
                    "preprocess": part.preprocess_ms / n,
                    "infer": part.infer_ms / n,
                    "postprocess": (time.perf_counter() - t3) * 1e3,
                }
                results.append(pred)
        return results

    def run_chunks(self, images: Sequence[np.ndarray], chunk: int) -> Iterator[Chunk]:
        """`images` preprocessed and run through the graph `chunk` per call (the artifact's fixed
        batch where `chunk` is not a multiple of it), in order: the loop `predict_batch` and the
        export gate (which judges raw graph outputs too) share."""
        images = list(images)
        if self.metadata.batch and chunk % self.metadata.batch:
            chunk = self.metadata.batch
        for start in range(0, len(images), chunk):
            t0 = time.perf_counter()
            pre = [self.preprocess(im) for im in images[start : start + chunk]]
            t1 = time.perf_counter()
            lowres, patches = self.run(np.stack([x for x, _ in pre]))
            yield Chunk([box for _, box in pre], lowres, patches, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """One image -> model input (3, S, S) float32 with this artifact's normalisation, and its letterbox."""
        return preprocess(image, self.input_size, self._mean, self._std, self._resize)

    def postprocess(
        self, lowres: np.ndarray, patches: np.ndarray, box: Letterbox, keep_logits: bool = False
    ) -> Prediction:
        """One image's graph outputs (lowres (S/4, S/4), patches (S/32, S/32)) -> its Prediction.

        Public so that the export gate judges an artifact by exactly this step.
        """
        logits = restore_logits(lowres, box)
        return Prediction(
            mask=mask_from_logits(logits, self._threshold),
            probability=sigmoid(logits),
            patch_map=sigmoid(patch_region(patches, box)),
            logits=logits if keep_logits else None,
        )

    def check_modality(self, modality: str | int | None) -> None:
        """Refuse a modality other than the one the artifact was exported for."""
        if modality is None:
            return
        m = self.metadata
        if isinstance(modality, int) or (isinstance(modality, str) and modality.strip().isdigit()):
            ok = int(modality) == m.modality_index
        else:
            ok = modality.strip().lower() == m.modality
        if not ok:
            raise ModalityError(
                f"{self.source}: artifact was exported for modality {m.modality!r}, not {modality!r}"
            )


def check_input_shape(path: Path, metadata: ArtifactMetadata, dims: Sequence[int | None]) -> None:
    """The graph's input shape (None = dynamic dimension) must be what the metadata promises."""
    s = metadata.input_size
    expected = [metadata.batch or None, 3, s, s]
    if len(dims) != 4 or any(d is not None and d != e for d, e in zip(dims[1:], expected[1:], strict=True)):
        raise ArtifactError(f"{path}: graph input shape {list(dims)} does not match the metadata's (B, 3, {s}, {s})")
    if metadata.batch and dims[0] not in (None, metadata.batch):
        raise ArtifactError(f"{path}: graph batch {dims[0]} does not match the metadata's batch {metadata.batch}")
    if not metadata.batch and dims[0] is not None:
        raise ArtifactError(f"{path}: metadata says dynamic batch but the graph's batch is fixed at {dims[0]}")


def decoder_path(path: Path, metadata: ArtifactMetadata) -> Path:
    """The prompt decoder file a box encoder's metadata names, beside it."""
    decoder = Path(path).with_name(str(metadata.decoder))
    if not decoder.is_file():
        raise ArtifactError(f"{path}: its prompt decoder {decoder.name} is missing beside it")
    return decoder


def check_decoder(
    path: Path, encoder: ArtifactMetadata, decoder: ArtifactMetadata, inputs: dict[str, Sequence[int | None]],
    outputs: Sequence[str],
) -> None:
    """A decoder file (its metadata, graph inputs' shapes with None = dynamic, output names) must be
    this encoder's: embedding (1, D, S/16, S/16) and boxes (N, 4), N dynamic -> lowres_masks, iou."""
    check_pair(encoder, decoder, path)
    names_in, names_out = GRAPH_IO["box-decoder"]
    g = encoder.input_size // 16
    shapes = {name: list(inputs.get(name, ())) for name in names_in}
    embedding, boxes = shapes[EMBEDDING_NAME], shapes[BOXES_NAME]
    if (
        len(embedding) != 4 or embedding[0] != 1 or embedding[2:] != [g, g] or boxes[1:] != [4]
        or boxes[0] is not None or any(n not in outputs for n in names_out)
    ):
        raise ArtifactError(
            f"{path}: decoder graph {shapes} -> {list(outputs)} is not embedding (1, D, {g}, {g}) and boxes (N, 4), "
            f"N dynamic -> {', '.join(names_out)}"
        )
