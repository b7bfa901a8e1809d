"""TensorRT backend: an espmed engine file, run with pycuda buffers and `execute_async_v3`.

The engine file format (magic, length-prefixed JSON header, serialised engine) and the
TensorRT-version / GPU compatibility check live in `engine_header` beside this module, which the
exporter imports too, so writer and reader share one definition. A mismatching engine is refused
before deserialising. Running needs an NVIDIA GPU with `tensorrt` and `pycuda` installed.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from espmed.errors import ArtifactError, BackendUnavailableError

from .base import Segmenter
from .engine_header import EngineBuildInfo, check_compatible, read_engine


def _import_tensorrt():
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT engines need an NVIDIA GPU with tensorrt and pycuda installed ({exc.name} is missing)"
        ) from None
    return trt, cuda


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
        cc = "{}.{}".format(*gpu.compute_capability())
        check_compatible(meta, EngineBuildInfo(trt.__version__, gpu.name(), cc), str(path))
        self._cuda = cuda
        self._context = gpu.retain_primary_context()
        self._lock = threading.Lock()  # one execution context and one set of buffers
        self._context.push()
        try:
            logger = trt.Logger(trt.Logger.WARNING)
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise ArtifactError(f"{path}: TensorRT could not deserialise the engine")
            self.execution = self.engine.create_execution_context()
            self.stream = cuda.Stream()
            m = self.metadata
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            if m.input_name not in names or any(n not in names for n in m.output_names):
                raise ArtifactError(f"{path}: engine tensors {names} do not match the metadata")
            if m.batch:
                self.max_batch = m.batch
            else:  # dynamic: the largest batch of the first optimisation profile
                self.max_batch = int(self.engine.get_tensor_profile_shape(m.input_name, 0)[2][0])
            self._host: dict[str, np.ndarray] = {}
            self._device: dict[str, object] = {}
            s = m.input_size
            shapes = {
                m.input_name: (self.max_batch, 3, s, s),
                m.output_names[0]: (self.max_batch, 1, s // 4, s // 4),
                m.output_names[1]: (self.max_batch, 1, s // 32, s // 32),
            }
            for name, shape in shapes.items():
                dtype = trt.nptype(self.engine.get_tensor_dtype(name))
                self._host[name] = cuda.pagelocked_empty(shape, dtype)
                self._device[name] = cuda.mem_alloc(self._host[name].nbytes)
                self.execution.set_tensor_address(name, int(self._device[name]))
        finally:
            self._context.pop()

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if x.shape[0] > self.max_batch:
            parts = [self._infer(x[i : i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        m = self.metadata
        cuda = self._cuda
        n = x.shape[0]
        with self._lock:
            self._context.push()
            try:
                host_in = self._host[m.input_name]
                host_in[:n] = x.astype(host_in.dtype, copy=False)
                self.execution.set_input_shape(m.input_name, x.shape)
                cuda.memcpy_htod_async(self._device[m.input_name], host_in, self.stream)
                if not self.execution.execute_async_v3(stream_handle=self.stream.handle):
                    raise ArtifactError(f"{self.source}: TensorRT execution failed")
                for name in m.output_names:
                    cuda.memcpy_dtoh_async(self._host[name], self._device[name], self.stream)
                self.stream.synchronize()
                lowres, patches = (np.array(self._host[name][:n], np.float32) for name in m.output_names)
            finally:
                self._context.pop()
        return lowres, patches
