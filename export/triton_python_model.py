"""espmed in Triton's Python backend: copied as `python/<name>/1/model.py` by `espmed export --target triton`.

It loads the wrapped espmed artifact beside it with `espmed.runtimes` and serves two inputs (one per
request): the uint8 image (`image`, (n, H, W, 3), any size; pre- and post-processing here, the
mask comes back at the image's size) or the preprocessed tensor (`images`, (n, 3, S, S)). The
requests of one dynamic batch run as one graph call. The stub runs its own interpreter: espmed must
be importable there, or listed in `ESPMED_SITE_PACKAGES` (site-packages folders, os.pathsep-separated).
Tensors go through DLPack both ways: the stub's `Tensor(name, ndarray)` predates numpy 2's array
descriptor and sends no bytes under numpy 2, and its `as_numpy()` misread large inputs.
"""

import json
import os
import site
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _add_site_packages() -> None:
    """Put `ESPMED_SITE_PACKAGES` first on sys.path (.pth files included, as for an editable install)."""
    before = list(sys.path)
    for entry in filter(None, os.environ.get("ESPMED_SITE_PACKAGES", "").split(os.pathsep)):
        site.addsitedir(entry)
    sys.path[:] = [p for p in sys.path if p not in before] + before


_add_site_packages()

from espmed.errors import ArtifactError, EspmedError, first_line  # noqa: E402
from espmed.runtimes import load  # noqa: E402
from espmed.runtimes.metadata import METADATA_KEY, ArtifactMetadata  # noqa: E402
from espmed.runtimes.triton_repository import ARTIFACT_PARAMETER, IMAGE_INPUT, IMAGE_OUTPUTS  # noqa: E402


def _device(kind: str, device_id: str, backend: str) -> str:
    if kind != "GPU":
        return "CPU"
    return f"CUDA:{device_id}" if backend == "tensorrt" else "GPU"


def _array(tensor: "pb_utils.Tensor") -> np.ndarray:
    """An input tensor's values, read through DLPack and copied out of the request's shared memory:
    under numpy 2 the stub's `as_numpy()` returned other values for a 1024^2 request (served logits
    far from what the same graph gives locally)."""
    return np.array(np.from_dlpack(tensor), copy=True)


def _response(outputs: dict) -> "pb_utils.InferenceResponse":
    tensors = [pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(v)) for name, v in outputs.items()]
    return pb_utils.InferenceResponse(tensors)


def _error(message: str) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        expected = ArtifactMetadata.from_json(params[METADATA_KEY], f"{args['model_name']} config.pbtxt")
        artifact = Path(args["model_repository"]) / args["model_version"] / params[ARTIFACT_PARAMETER]
        device = _device(args["model_instance_kind"], args["model_instance_device_id"], expected.backend)
        self.segmenter = load(artifact, device=device)
        if self.segmenter.metadata.to_json() != expected.to_json():
            raise ArtifactError(f"{artifact}: its metadata differs from the espmed metadata in config.pbtxt")
        meta = self.segmenter.metadata
        self.input_name, self.output_names = meta.input_name, list(meta.output_names)

    def execute(self, requests: list) -> list:
        """One graph call for all tensors and images of this batch of requests."""
        responses: list = [None] * len(requests)
        tensors, images = [], []
        for i, request in enumerate(requests):
            image = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT)
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if (image is None) == (tensor is None):
                responses[i] = _error(f"send exactly one of the inputs {IMAGE_INPUT!r} and {self.input_name!r}")
            elif tensor is not None:
                tensors.append((i, _array(tensor)))
            else:
                try:
                    prepared = [self.segmenter.preprocess(im) for im in _array(image)]
                except (EspmedError, ValueError) as exc:
                    responses[i] = _error(first_line(exc))
                    continue
                images.append((i, prepared))
        parts = [x for _, x in tensors] + [np.stack([x for x, _ in prepared]) for _, prepared in images]
        if not parts:
            return responses
        try:
            lowres, patches = self.segmenter.run(np.concatenate(parts))
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            return [r or _error(f"espmed runtime: {first_line(exc, with_type=True)}") for r in responses]
        start = 0
        for i, x in tensors:
            n = len(x)
            graph = (lowres[start : start + n], patches[start : start + n])
            responses[i] = _response(dict(zip(self.output_names, graph, strict=True)))
            start += n
        for i, prepared in images:
            preds = [
                self.segmenter.postprocess(lowres[start + k, 0], patches[start + k, 0], box, True)
                for k, (_, box) in enumerate(prepared)
            ]
            start += len(prepared)
            stacked = [np.stack([p.mask for p in preds]), np.stack([p.patch_map for p in preds])]
            stacked.append(np.stack([p.logits for p in preds]))
            responses[i] = _response(dict(zip(IMAGE_OUTPUTS, stacked, strict=True)))
        return responses
