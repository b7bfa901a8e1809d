"""TensorRT backend: an espmed engine file, run with pycuda buffers and `execute_async_v3`.

The engine file format (magic, length-prefixed JSON header, serialised engine) and the
TensorRT-version / GPU compatibility check live in `engine_header` beside this module, which the
exporter imports too, so writer and reader share one definition. A mismatching engine is refused
before deserialising. A box encoder's prompt decoder (named in its metadata, beside it) is a second
engine file, checked the same way. Running needs an NVIDIA GPU with `tensorrt` and `pycuda` installed.
Written against the TensorRT 10 Python API; it could not be run where it was written (no GPU).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from espmed.errors import ArtifactError, BackendUnavailableError

from .base import BOX_CHUNK, Segmenter, check_decoder, decoder_path
from .engine_header import EngineBuildInfo, check_compatible, read_engine
from .metadata import BOXES_NAME, EMBEDDING_NAME, GRAPH_IO


def _import_tensorrt():
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT engines need an NVIDIA GPU with tensorrt and pycuda installed ({exc.name} is missing)"
        ) from None
    return trt, cuda


class _Engine:
    """One deserialised engine, its execution context and buffers for its largest shapes (an input's
    largest is the first optimisation profile's max where the input is dynamic). The caller holds
    the CUDA context; `run` serialises calls (one context, one set of buffers)."""

    def __init__(self, trt, cuda, engine_bytes: bytes, path: Path) -> None:
        self._cuda = cuda
        self.path = path
        self._lock = threading.Lock()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise ArtifactError(f"{path}: TensorRT could not deserialise the engine")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.largest: dict[str, tuple[int, ...]] = {}
        for name in self.inputs:
            shape = tuple(self.engine.get_tensor_shape(name))
            if -1 in shape:
                shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])
            self.largest[name] = shape
            self.context.set_input_shape(name, shape)
        for name in self.outputs:
            self.largest[name] = tuple(self.context.get_tensor_shape(name))
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, object] = {}
        for name, shape in self.largest.items():
            self._host[name] = cuda.pagelocked_empty(shape, trt.nptype(self.engine.get_tensor_dtype(name)))
            self._device[name] = cuda.mem_alloc(self._host[name].nbytes)
            self.context.set_tensor_address(name, int(self._device[name]))

    def dims(self) -> dict[str, list[int | None]]:
        """Every input's shape as built, None for a dynamic dimension."""
        return {n: [None if d == -1 else int(d) for d in self.engine.get_tensor_shape(n)] for n in self.inputs}

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """`outputs` (float32 copies) for `feeds`, each within its largest shape."""
        cuda = self._cuda
        with self._lock:
            for name, x in feeds.items():
                host = self._host[name].reshape(-1)[: x.size]
                host[:] = x.reshape(-1)
                self.context.set_input_shape(name, x.shape)
                cuda.memcpy_htod_async(self._device[name], host, self.stream)
            if not self.context.execute_async_v3(stream_handle=self.stream.handle):
                raise ArtifactError(f"{self.path}: TensorRT execution failed")
            shapes = {name: tuple(self.context.get_tensor_shape(name)) for name in outputs}
            views = {name: self._host[name].reshape(-1)[: int(np.prod(shapes[name]))] for name in outputs}
            for name in outputs:
                cuda.memcpy_dtoh_async(views[name], self._device[name], self.stream)
            self.stream.synchronize()
            return [np.array(views[name].reshape(shapes[name]), np.float32) for name in outputs]


class TensorRtSegmenter(Segmenter):
    backend = "tensorrt"

    def __init__(self, path: str | Path, device: str = "CUDA:0") -> None:
        path = Path(path)
        meta, engine_bytes = read_engine(path)
        super().__init__(meta, path)
        trt, cuda = _import_tensorrt()
        cuda.init()
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= cuda.Device.count():
            raise BackendUnavailableError(f"no CUDA device {index} (this machine has {cuda.Device.count()})")
        gpu = cuda.Device(index)
        here = EngineBuildInfo(trt.__version__, gpu.name(), "{}.{}".format(*gpu.compute_capability()))
        check_compatible(meta, here, str(path))
        self._context = gpu.retain_primary_context()
        self._context.push()
        try:
            self._graph = _Engine(trt, cuda, engine_bytes, path)
            m = self.metadata
            if m.input_name not in self._graph.inputs or any(n not in self._graph.outputs for n in m.output_names):
                raise ArtifactError(
                    f"{path}: engine tensors {self._graph.inputs + self._graph.outputs} do not match the metadata"
                )
            self.max_batch = self._graph.largest[m.input_name][0]
            if self.supports_boxes:
                self._decoder = self._open_decoder(trt, cuda, here)
        finally:
            self._context.pop()

    def _open_decoder(self, trt, cuda, here: EngineBuildInfo) -> _Engine:
        """The box encoder's prompt decoder engine, checked to be this encoder's and to run on this GPU."""
        path = decoder_path(self.source, self.metadata)
        meta, engine_bytes = read_engine(path)
        check_compatible(meta, here, str(path))
        decoder = _Engine(trt, cuda, engine_bytes, path)
        check_decoder(path, self.metadata, meta, decoder.dims(), decoder.outputs)
        if decoder.largest[BOXES_NAME][0] < BOX_CHUNK:
            raise ArtifactError(f"{path}: the decoder engine takes at most {decoder.largest[BOXES_NAME][0]} boxes "
                                f"per call; the runtime sends up to {BOX_CHUNK}")
        return decoder

    def _run(self, graph: _Engine, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        self._context.push()
        try:
            return graph.run(feeds, outputs)
        finally:
            self._context.pop()

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if x.shape[0] > self.max_batch:
            parts = [self._infer(x[i : i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        m = self.metadata
        lowres, patches = self._run(self._graph, {m.input_name: x}, list(m.output_names))
        return lowres, patches

    def _embed(self, x: np.ndarray) -> np.ndarray:
        return self._run(self._graph, {self.metadata.input_name: x}, [EMBEDDING_NAME])[0]

    def _decode(self, embedding: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feeds = {EMBEDDING_NAME: embedding, BOXES_NAME: boxes}
        lowres, iou = self._run(self._decoder, feeds, list(GRAPH_IO["box-decoder"][1]))
        return lowres, iou
