"""Artifact metadata: everything a runtime needs to feed an exported graph and read its outputs.

The same JSON object is embedded in every artifact (ONNX `metadata_props["espmed"]`, OpenVINO
`rt_info["espmed"]`, the JSON header of a TensorRT engine file) and written into the manifest
beside it, together with SHA-256 hashes of the artifact files. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from espmed.errors import ArtifactError

METADATA_KEY = "espmed"
SCHEMA = "espmed-artifact/1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("lowres_masks", "patch_logits")
#: What an artifact's graph is: the self-prompted model end to end (images -> lowres_masks,
#: patch_logits); or the box-prompted pair SAM deploys, an image encoder (images -> embedding) whose
#: metadata names its prompt decoder (embedding + boxes -> lowres_masks, iou) beside it.
GRAPHS = ("self-prompted", "box-encoder", "box-decoder")
EMBEDDING_NAME = "embedding"
BOXES_NAME = "boxes"
IOU_NAME = "iou"
#: The `modality` of a box graph exported without one: the shared trunk, no modality controller.
SHARED_TRUNK = "shared"
#: The names each graph kind reads and writes: (inputs, outputs).
GRAPH_IO = {
    "self-prompted": ((INPUT_NAME,), OUTPUT_NAMES),
    "box-encoder": ((INPUT_NAME,), (EMBEDDING_NAME,)),
    "box-decoder": ((EMBEDDING_NAME, BOXES_NAME), (OUTPUT_NAMES[0], IOU_NAME)),
}
#: What a box encoder and its prompt decoder must agree on for the decoder to be the encoder's.
PAIR_FIELDS = (
    "target", "backend", "modality", "modality_index", "modalities", "input_size", "preprocessing", "preset",
    "espmed_version", "source_checkpoint_sha256", "runtime_precision",
)


@dataclass
class ArtifactMetadata:
    """Describes one exported graph. `batch` is a fixed batch size, or 0 for a dynamic batch."""

    target: str  # e.g. "onnx", "openvino-int8", "trt-fp16"
    backend: str  # "onnxruntime" | "openvino" | "tensorrt" | "torch"
    precision: str  # "fp32" | "fp16" | "int8" (weights/compute of the graph)
    modality: str
    modality_index: int
    modalities: list[str]
    input_size: int
    batch: int
    preprocessing: dict[str, Any]  # espmed.model.config.Preprocessing.to_dict()
    preset: str
    espmed_version: str
    source_checkpoint_sha256: str
    input_name: str = INPUT_NAME
    output_names: list[str] = field(default_factory=lambda: list(OUTPUT_NAMES))
    # outputs: lowres_masks (B, 1, S/4, S/4) mask logits; patch_logits (B, 1, S/32, S/32)
    exporter: str = ""  # e.g. "torch.onnx dynamo" / "torch.onnx torchscript"
    opset: int | None = None
    simplifier: str = "none"
    calibration: dict[str, Any] | None = None  # {"sha256": ..., "images": n, "source": ...}
    float_layers: list[str] = field(default_factory=list)  # INT8: nodes kept in float
    accuracy: dict[str, Any] | None = None  # INT8/FP16 gate results vs FP32
    runtime_precision: str | None = None  # OpenVINO CPU inference precision pinned at run time
    library_versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # backend specifics (e.g. TRT version, GPU)
    graph: str = GRAPHS[0]
    decoder: str | None = None  # box-encoder: the file name of its prompt decoder, beside it
    schema: str = SCHEMA

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "artifact") -> ArtifactMetadata:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{source}: metadata is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            schema = data.get("schema") if isinstance(data, dict) else None
            raise ArtifactError(f"{source}: not an espmed artifact (metadata schema {schema!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            meta = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ArtifactError(f"{source}: incomplete espmed metadata ({exc})") from None
        meta.validate(source)
        return meta

    def validate(self, source: str = "artifact") -> None:
        if self.input_size <= 0 or self.input_size % 32:
            raise ArtifactError(f"{source}: invalid input size {self.input_size} in metadata")
        if self.batch < 0:
            raise ArtifactError(f"{source}: invalid batch {self.batch} in metadata")
        if self.graph not in GRAPHS:
            raise ArtifactError(f"{source}: unknown graph {self.graph!r} in metadata ({', '.join(GRAPHS)})")
        shared = self.graph != GRAPHS[0] and self.modality == SHARED_TRUNK
        if self.modality not in self.modalities and not shared:
            raise ArtifactError(f"{source}: modality {self.modality!r} not among {self.modalities}")
        if self.graph == "box-encoder" and (not self.decoder or self.decoder != self.decoder.rsplit("/", 1)[-1]):
            raise ArtifactError(f"{source}: a box encoder's metadata must name its decoder file beside it")
        for key in ("mean", "std"):
            v = self.preprocessing.get(key)
            if not isinstance(v, (list, tuple)) or len(v) != 3:
                raise ArtifactError(f"{source}: preprocessing.{key} must be 3 numbers")

    @property
    def dynamic_batch(self) -> bool:
        return self.batch == 0


def decoder_metadata(encoder: ArtifactMetadata, precision: str) -> ArtifactMetadata:
    """The metadata of a box encoder's prompt decoder: the encoder's (`PAIR_FIELDS` equal), for the decoder
    graph, with its own precision and a dynamic number of boxes (`batch` 0)."""
    inputs, outputs = GRAPH_IO["box-decoder"]
    return dataclasses.replace(
        encoder, graph="box-decoder", decoder=None, precision=precision, batch=0, input_name=inputs[0],
        output_names=list(outputs), calibration=None, float_layers=[], accuracy=None, extra={},
    )


def check_pair(encoder: ArtifactMetadata, decoder: ArtifactMetadata, source: str | Path) -> None:
    """Refuse a decoder file that is not the prompt decoder exported with this encoder."""
    if decoder.graph != "box-decoder":
        raise ArtifactError(f"{source}: not a prompt decoder (its graph is {decoder.graph!r})")
    differs = [name for name in PAIR_FIELDS if getattr(encoder, name) != getattr(decoder, name)]
    if differs:
        verb = "differs" if len(differs) == 1 else "differ"
        raise ArtifactError(f"{source}: not the prompt decoder of this box encoder ({', '.join(differs)} {verb})")
