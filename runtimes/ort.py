"""ONNX Runtime backend: CPU execution provider, CUDA / TensorRT providers where installed.

An `InferenceSession` may be `run` from many threads at once, so the segmenter needs no lock. A box
encoder opens its prompt decoder (named in its metadata, beside it) in a second session with the
same options.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from espmed.errors import ArtifactError, BackendUnavailableError, first_line, require

from .base import Segmenter, check_decoder, check_input_shape, decoder_path
from .metadata import BOXES_NAME, EMBEDDING_NAME, IOU_NAME, METADATA_KEY, OUTPUT_NAMES, ArtifactMetadata

#: `device` argument -> execution providers, in preference order (CPU always last as fallback).
DEVICE_PROVIDERS = {
    "CPU": ["CPUExecutionProvider"],
    "CUDA": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "GPU": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "TENSORRT": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def select_providers(device: str, available: list[str]) -> list[str]:
    """Execution providers for `device` ("CPU", "CUDA"/"GPU", "TensorRT" or "AUTO")."""
    key = device.strip().upper()
    if key == "AUTO":
        order = DEVICE_PROVIDERS["TENSORRT"]
        return [p for p in order if p in available]
    if key not in DEVICE_PROVIDERS:
        raise BackendUnavailableError(
            f"unknown ONNX Runtime device {device!r}; choose CPU, CUDA, TensorRT or AUTO"
        )
    wanted = DEVICE_PROVIDERS[key][0]
    if wanted not in available:
        raise BackendUnavailableError(
            f"ONNX Runtime has no {wanted} here (available: {', '.join(available)})"
        )
    return [p for p in DEVICE_PROVIDERS[key] if p in available]


def _open_session(ort, path: Path, opts, providers: list[str]):
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/NoSuchFile types
        raise ArtifactError(f"{path}: ONNX Runtime cannot load the model: {first_line(exc)}") from None


def _metadata_of(session, path: Path) -> ArtifactMetadata:
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise ArtifactError(f"{path}: ONNX model has no espmed metadata (metadata_props['{METADATA_KEY}'])")
    return ArtifactMetadata.from_json(props[METADATA_KEY], str(path))


class OnnxRuntimeSegmenter(Segmenter):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "CPU", threads: int | None = None) -> None:
        ort = require("onnxruntime", "onnx")
        path = Path(path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.providers = select_providers(device, ort.get_available_providers())
        self.session = _open_session(ort, path, opts, self.providers)
        super().__init__(_metadata_of(self.session, path), path)
        names = [o.name for o in self.session.get_outputs()]
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        m = self.metadata
        if m.input_name not in inputs or any(n not in names for n in m.output_names):
            raise ArtifactError(
                f"{path}: graph inputs {list(inputs)} / outputs {names} do not match the metadata "
                f"({m.input_name} -> {', '.join(m.output_names)})"
            )
        check_input_shape(path, m, [d if isinstance(d, int) else None for d in inputs[m.input_name]])
        if self.supports_boxes:
            self.decoder = self._open_decoder(ort, opts)

    def _open_decoder(self, ort, opts):
        """The box encoder's prompt decoder session, checked to be this encoder's."""
        path = decoder_path(self.source, self.metadata)
        session = _open_session(ort, path, opts, self.providers)
        inputs = {i.name: [d if isinstance(d, int) else None for d in i.shape] for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        check_decoder(path, self.metadata, _metadata_of(session, path), inputs, outputs)
        return session

    def _embed(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([EMBEDDING_NAME], {self.metadata.input_name: x})[0], np.float32)

    def _decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lowres, iou = self.decoder.run([OUTPUT_NAMES[0], IOU_NAME], {EMBEDDING_NAME: embedding, BOXES_NAME: boxes})
        return np.asarray(lowres, np.float32), np.asarray(iou, np.float32)

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lowres, patches = self.session.run(list(self.metadata.output_names), {self.metadata.input_name: x})
        return np.asarray(lowres, np.float32), np.asarray(patches, np.float32)
