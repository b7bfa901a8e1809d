"""`triton://HOST:PORT/MODEL[/VERSION]`: a Segmenter whose graph runs on a Triton Inference Server.

gRPC through tritonclient (one channel, safe to call from many threads). Size, modality and
preprocessing come from the espmed metadata in the server's model config, which must match the
config's tensors (`triton_repository.check_config`). A model that takes images (the Python-backend
export) gets the uint8 image and returns the mask at its size, so `predict_batch` sends images and
the server batches them with other clients' requests; `run` sends the preprocessed tensor, as for
a native (ONNX Runtime, OpenVINO, TensorRT) model, whose pre/post-processing runs here.

A server that cannot be reached gives one `BackendUnavailableError` line per call; the next call
opens a new channel, and when the server is back (the same model: its metadata is checked again)
calls succeed again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from espmed.errors import ArtifactError, BackendUnavailableError, ModalityError, first_line, require

from .base import Prediction, Segmenter
from .preprocess import sigmoid, to_rgb_uint8
from .triton_repository import IMAGE_INPUT, IMAGE_OUTPUTS, check_config, metadata_of

DEFAULT_PORT = 8001
#: Longest wait for one call (seconds): a batch of large images on a busy CPU server takes seconds.
TIMEOUT_S = 120.0
#: gRPC codes that mean the server is not there (or not answering), rather than refusing the request.
_UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


def parse_url(url: str) -> tuple[str, str, str]:
    """(host:port, model, version) of `triton://HOST[:PORT]/MODEL[/VERSION]` (version "" = the server's choice)."""
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ArtifactError(f"{url}: invalid port") from None
    if not parts.hostname or not 1 <= len(path) <= 2:
        raise ArtifactError(f"{url}: expected triton://HOST[:PORT]/MODEL[/VERSION]")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}", path[0], path[1] if len(path) == 2 else ""


class TritonSegmenter(Segmenter):
    backend = "triton"

    def __init__(self, url: str, *, timeout_s: float = TIMEOUT_S) -> None:
        if not isinstance(url, str):
            raise ArtifactError(
                f"{url}: a Triton model repository is served by tritonserver; start it "
                f"(python -m espmed.runtimes.triton_server {url}) and load triton://HOST:PORT/MODEL"
            )
        self.url = url
        self.address, self.model_name, self.model_version = parse_url(url)
        self.timeout_s = timeout_s
        self._grpc = require("tritonclient.grpc", "triton")
        self._lock = threading.RLock()  # _connect holds it while a failed call in _ask drops the client
        self._client = None
        self._config = None
        self._connect()
        meta = metadata_of(self._config, url)
        self.takes_images = check_config(self._config, meta, url)
        self.max_batch = int(self._config.max_batch_size)
        super().__init__(meta, Path(self.model_name))

    @property
    def chunk_size(self) -> int:
        return self.max_batch

    def __repr__(self) -> str:
        m = self.metadata
        served = "images" if self.takes_images else "tensors"
        return f"<TritonSegmenter {self.url} {m.target} {m.modality} {m.input_size}px {served} batch<={self.max_batch}>"

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def check_modality(self, modality: str | int | None) -> None:
        try:
            super().check_modality(modality)
        except ModalityError as exc:
            raise ModalityError(f"{self.url}: {str(exc).split(': ', 1)[1]}") from None

    # -- connection ------------------------------------------------------------------------------
    def _connect(self):
        """The client; after a failure a new one, whose model must still be the one first loaded."""
        with self._lock:
            if self._client is not None:
                return self._client
            client = self._grpc.InferenceServerClient(self.address)
            try:
                config = self._model_config(client)
            except BaseException:
                client.close()
                raise
            if self._config is not None and not self._same_model(config):
                client.close()
                raise ArtifactError(f"{self.url}: the server now serves another model than the one loaded; reload it")
            self._client, self._config = client, config
            return client

    def _same_model(self, config) -> bool:
        meta = metadata_of(config, self.url)
        return meta.to_json() == self.metadata.to_json() and check_config(config, meta, self.url) == self.takes_images

    def _model_config(self, client):
        name, version = self.model_name, self.model_version
        if not self._ask(client, "is_model_ready", name, version):
            index = self._ask(client, "get_model_repository_index")
            found = [m for m in index.models if m.name == name]
            if not found:
                served = ", ".join(sorted({m.name for m in index.models})) or "none"
                raise ArtifactError(f"{self.url}: the server has no model {name!r} (it has: {served})")
            state = "; ".join(f"{m.state or 'not loaded'}: {first_line(ValueError(m.reason))}" for m in found)
            raise ArtifactError(f"{self.url}: model {name!r} is not ready on the server ({state})")
        return self._ask(client, "get_model_config", name, version).config

    def _ask(self, client, method: str, *args, **kwargs):
        """One call of `client.method`; a tritonclient error becomes one espmed error line."""
        from tritonclient.utils import InferenceServerException

        try:
            return getattr(client, method)(*args, client_timeout=self.timeout_s, **kwargs)
        except InferenceServerException as exc:
            raise self._error(exc, client) from None

    def _error(self, exc, client) -> Exception:
        status = str(exc.status() or "")
        message = first_line(ValueError(exc.message() or str(exc)))
        if any(code in status for code in _UNREACHABLE):
            with self._lock:
                if self._client is client:  # the next call opens a new channel; calls in flight keep this one
                    self._client = None
            return BackendUnavailableError(f"{self.url}: Triton server not reachable ({message})")
        return ArtifactError(f"{self.url}: the server refused the request ({message})")

    # -- inference -------------------------------------------------------------------------------
    def _request(self, client, name: str, data: np.ndarray, datatype: str, outputs: Sequence[str], done) -> None:
        """Send one request; `done(result_or_error)` is called with its outcome."""
        g = self._grpc
        tensor = g.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        wanted = [g.InferRequestedOutput(o) for o in outputs]

        def callback(result, error) -> None:
            done(self._error(error, client) if error is not None else result)

        from tritonclient.utils import InferenceServerException

        try:
            client.async_infer(
                self.model_name, [tensor], callback, model_version=self.model_version, outputs=wanted,
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            done(self._error(exc, client))

    def _send_all(self, name: str, parts: list[np.ndarray], datatype: str, outputs: Sequence[str]) -> list:
        """Send every part as its own request at once (the server batches them); their results, in order."""
        client = self._connect()
        results: list = [None] * len(parts)
        finished = threading.Semaphore(0)

        def keep(i: int):
            def done(outcome) -> None:
                results[i] = outcome
                finished.release()
            return done

        for i, part in enumerate(parts):
            self._request(client, name, part, datatype, outputs, keep(i))
        for _ in parts:
            finished.acquire()
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        return results

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.metadata
        chunks = [x[i : i + self.max_batch] for i in range(0, len(x), self.max_batch)]
        results = self._send_all(m.input_name, chunks, "FP32", m.output_names)
        lowres, patches = ([r.as_numpy(name) for r in results] for name in m.output_names)
        return np.concatenate(lowres).astype(np.float32), np.concatenate(patches).astype(np.float32)

    def predict_batch(
        self, images: Sequence[np.ndarray], return_logits: bool = False, chunk_size: int | None = None
    ) -> list[Prediction]:
        """Images to a model that takes them: one request per run of same-size images (<= max batch)."""
        if not self.takes_images:
            return super().predict_batch(images, return_logits, chunk_size)
        t0 = time.perf_counter()
        rgb = [to_rgb_uint8(im) for im in images]
        chunk = min(chunk_size or self.max_batch, self.max_batch)
        groups: list[list[np.ndarray]] = []
        for im in rgb:
            if groups and groups[-1][0].shape == im.shape and len(groups[-1]) < chunk:
                groups[-1].append(im)
            else:
                groups.append([im])
        t1 = time.perf_counter()
        results = self._send_all(IMAGE_INPUT, [np.stack(g) for g in groups], "UINT8", IMAGE_OUTPUTS)
        t2 = time.perf_counter()
        predictions = []
        n = max(1, len(rgb))
        for group, result in zip(groups, results, strict=True):
            masks, patch_maps, logits = (result.as_numpy(name) for name in IMAGE_OUTPUTS)
            for k in range(len(group)):
                t3 = time.perf_counter()
                pred = Prediction(
                    mask=masks[k].astype(bool), probability=sigmoid(logits[k]), patch_map=patch_maps[k],
                    logits=logits[k].astype(np.float32) if return_logits else None,
                )
                pred.timings = {
                    "preprocess": (t1 - t0) * 1e3 / n, "infer": (t2 - t1) * 1e3 / n,
                    "postprocess": (time.perf_counter() - t3) * 1e3,
                }
                predictions.append(pred)
        return predictions
