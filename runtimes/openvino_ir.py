"""OpenVINO backend for IR (`.xml` + `.bin`): CPU, GPU or AUTO.

Inference precision is always set explicitly: f32 unless the caller (or the exporter, via
`metadata.runtime_precision`) asks for bf16/f16 -- the CPU plugin would otherwise pick bf16 on
CPUs with AVX512_BF16. `precision` is then what the compiled model runs: a CPU without native BF16
runs a bf16 request in f32. A pool of infer requests makes one segmenter safe for many threads. A
box encoder's prompt decoder (named in its metadata, beside it) is compiled with the same device,
precision hint, threads and cache.
"""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np

from espmed.errors import ArtifactError, BackendUnavailableError, first_line, require

from .base import Segmenter, check_decoder, check_input_shape, decoder_path
from .metadata import BOXES_NAME, EMBEDDING_NAME, GRAPH_IO, METADATA_KEY, ArtifactMetadata

#: Accepted spellings -> OpenVINO's `INFERENCE_PRECISION_HINT` values.
PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}
DEVICES = ("CPU", "GPU", "AUTO", "NPU")


def _compiled_precision(compiled, requested: str) -> str:
    """The precision the compiled model runs at, in `PRECISIONS`' spelling (`requested` where the
    device does not report one, e.g. AUTO)."""
    try:
        actual = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    except (RuntimeError, AttributeError):
        return requested
    return PRECISIONS.get(actual.lower(), requested)


def inference_precision(requested: str | None, metadata: ArtifactMetadata) -> str:
    """The precision hint to compile with: the request, else the exporter's pin, else f32."""
    value = requested or metadata.runtime_precision or "f32"
    key = value.strip().lower()
    if key not in PRECISIONS:
        raise ArtifactError(f"unknown OpenVINO inference precision {value!r}; choose f32, bf16 or f16")
    return PRECISIONS[key]


def read_ir_metadata(model, path: Path) -> ArtifactMetadata:
    if not model.has_rt_info(METADATA_KEY):
        raise ArtifactError(f"{path}: OpenVINO IR has no espmed metadata (rt_info['{METADATA_KEY}'])")
    return ArtifactMetadata.from_json(model.get_rt_info(METADATA_KEY).astype(str), str(path))


def _read_ir(core, path: Path):
    if not path.with_suffix(".bin").is_file():
        raise ArtifactError(f"{path}: weights file {path.with_suffix('.bin').name} is missing")
    try:
        return core.read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long messages
        raise ArtifactError(f"{path}: OpenVINO cannot read the IR: {first_line(exc)}") from None


def _dims(model) -> dict[str, list[int | None]]:
    """Every input name of `model` -> its shape, None for a dynamic dimension."""
    return {
        n: [d.get_length() if d.is_static else None for d in i.get_partial_shape()] for i in model.inputs
        for n in i.get_names()
    }


class _Compiled:
    """A compiled model and a pool of infer requests: one may be called from many threads at once."""

    def __init__(self, core, model, device: str, config: dict[str, str], path: Path, outputs: list[str]) -> None:
        try:
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise ArtifactError(f"{path}: OpenVINO cannot compile the model for {device}: {first_line(exc)}") from None
        names = {n for out in self.compiled.outputs for n in out.get_names()}
        if any(n not in names for n in outputs):
            raise ArtifactError(f"{path}: IR outputs {sorted(names)} do not include {', '.join(outputs)}")
        self._outputs = [self.compiled.output(n) for n in outputs]
        try:
            n_requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        except RuntimeError:
            n_requests = 1
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, n_requests)):
            self._requests.put(self.compiled.create_infer_request())

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs, in the order asked for at construction, as float32 copies."""
        request = self._requests.get()  # blocks while every request is busy
        try:
            result = request.infer(inputs)
            # Copy: the request reuses its output buffers on the next call.
            return [np.array(result[o], dtype=np.float32, copy=True) for o in self._outputs]
        finally:
            self._requests.put(request)


class OpenVinoSegmenter(Segmenter):
    backend = "openvino"

    def __init__(
        self,
        path: str | Path,
        device: str = "CPU",
        threads: int | None = None,
        precision: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        ov = require("openvino", "openvino")
        path = Path(path)
        core = ov.Core()
        model = _read_ir(core, path)
        super().__init__(read_ir_metadata(model, path), path)
        inputs = _dims(model)
        if self.metadata.input_name not in inputs:
            raise ArtifactError(f"{path}: IR has no input named {self.metadata.input_name!r}")
        check_input_shape(path, self.metadata, inputs[self.metadata.input_name])
        device = device.strip().upper()
        if device.split(":")[0].split(".")[0] not in DEVICES:
            raise BackendUnavailableError(f"unknown OpenVINO device {device!r}; choose CPU, GPU or AUTO")
        if device != "AUTO" and device.split(".")[0] not in [d.split(".")[0] for d in core.available_devices]:
            raise BackendUnavailableError(
                f"OpenVINO device {device} is not available here (available: {', '.join(core.available_devices)})"
            )
        self.precision = inference_precision(precision, self.metadata)
        config: dict[str, str] = {"INFERENCE_PRECISION_HINT": self.precision}
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
        if device == "AUTO":
            # AUTO forwards device properties only through DEVICE_PROPERTIES.
            config = {k: v for k, v in config.items() if k == "CACHE_DIR"}
            core.set_property("CPU", {"INFERENCE_PRECISION_HINT": self.precision})
        self._graph = _Compiled(core, model, device, config, path, list(self.metadata.output_names))
        self.compiled = self._graph.compiled
        self.device = device
        self.precision = _compiled_precision(self.compiled, self.precision)
        if self.supports_boxes:  # the decoder compiled as the encoder: same device, precision, threads, cache
            self._decoder = self._open_decoder(core, device, config)

    def _open_decoder(self, core, device: str, config: dict[str, str]) -> _Compiled:
        """The box encoder's prompt decoder, checked to be this encoder's."""
        path = decoder_path(self.source, self.metadata)
        model = _read_ir(core, path)
        outputs = list(GRAPH_IO["box-decoder"][1])
        names = [n for out in model.outputs for n in out.get_names()]
        check_decoder(path, self.metadata, read_ir_metadata(model, path), _dims(model), names)
        return _Compiled(core, model, device, config, path, outputs)

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lowres, patches = self._graph({self.metadata.input_name: x})
        return lowres, patches

    def _embed(self, x: np.ndarray) -> np.ndarray:
        return self._graph({self.metadata.input_name: x})[0]

    def _decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lowres, iou = self._decoder({EMBEDDING_NAME: embedding, BOXES_NAME: boxes})
        return lowres, iou
