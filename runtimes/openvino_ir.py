"""OpenVINO backend for IR (`.xml` + `.bin`): CPU, GPU or AUTO.

Inference precision is always set explicitly: f32 unless the caller (or the exporter, via
`metadata.runtime_precision`) asks for bf16/f16 -- the CPU plugin would otherwise pick bf16 on
CPUs with AVX512_BF16. `precision` is then what the compiled model runs: a CPU without native BF16
runs a bf16 request in f32. A pool of infer requests makes one segmenter safe for many threads.
"""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np

from espmed.errors import ArtifactError, BackendUnavailableError, first_line, require

from .base import Segmenter, check_input_shape
from .metadata import METADATA_KEY, ArtifactMetadata

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
        if not path.with_suffix(".bin").is_file():
            raise ArtifactError(f"{path}: weights file {path.with_suffix('.bin').name} is missing")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long messages
            raise ArtifactError(f"{path}: OpenVINO cannot read the IR: {first_line(exc)}") from None
        super().__init__(read_ir_metadata(model, path), path)
        inputs = {n: i.get_partial_shape() for i in model.inputs for n in i.get_names()}
        if self.metadata.input_name not in inputs:
            raise ArtifactError(f"{path}: IR has no input named {self.metadata.input_name!r}")
        shape = inputs[self.metadata.input_name]
        check_input_shape(path, self.metadata, [d.get_length() if d.is_static else None for d in shape])
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
        try:
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise ArtifactError(f"{path}: OpenVINO cannot compile the model for {device}: {first_line(exc)}") from None
        self.device = device
        self.precision = _compiled_precision(self.compiled, self.precision)
        m = self.metadata
        names = {n for out in self.compiled.outputs for n in out.get_names()}
        if any(n not in names for n in m.output_names):
            raise ArtifactError(f"{path}: IR outputs {sorted(names)} do not include {', '.join(m.output_names)}")
        self._outputs = [self.compiled.output(n) for n in m.output_names]
        try:
            n_requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        except RuntimeError:
            n_requests = 1
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, n_requests)):
            self._requests.put(self.compiled.create_infer_request())

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request = self._requests.get()  # blocks while every request is busy
        try:
            result = request.infer({self.metadata.input_name: x})
            # Copy: the request reuses its output buffers on the next call.
            lowres, patches = (np.array(result[o], dtype=np.float32, copy=True) for o in self._outputs)
        finally:
            self._requests.put(request)
        return lowres, patches

