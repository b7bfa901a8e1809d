"""What an espmed Triton model repository holds, checked the same way by the exporter, the local
server, the Python-backend model and the remote client. Torch-free; tritonclient only to check a
config (its `model_config_pb2` messages).

An export (`espmed export --target triton`) is a folder of model repositories, one per Triton
backend, each serving the same model name:

    <export>/espmed-triton.manifest.json    metadata, Triton settings, SHA-256 of every file below
    <export>/<native>/<name>/config.pbtxt   onnxruntime | openvino | tensorrt: the preprocessed tensor in
    <export>/<native>/<name>/1/model.*
    <export>/python/<name>/config.pbtxt     Python backend: the uint8 image in, mask out (and the tensor)
    <export>/python/<name>/1/model.py + the wrapped espmed artifact and its manifest

Every config carries the artifact's metadata as the parameter `espmed` (JSON). A model takes the
preprocessed tensor (`images`, FP32 (B, 3, S, S) -> `lowres_masks`, `patch_logits`); the Python one
also takes the image (`image`, UINT8 (B, H, W, 3), any H, W -> `mask` BOOL (B, H, W), `patch_map`
FP32, `logits` FP32 (B, H, W)).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from espmed.errors import ArtifactError

from .manifest import check_listed_file, read_listing
from .metadata import METADATA_KEY, ArtifactMetadata

MANIFEST = "espmed-triton.manifest.json"
PYTHON_REPOSITORY = "python"
ARTIFACT_PARAMETER = "espmed_artifact"  # Python backend: the wrapped artifact's file name in 1/
IMAGE_INPUT = "image"
IMAGE_OUTPUTS = ("mask", "patch_map", "logits")
_IMAGE_OUTPUT_TYPES = {"mask": "TYPE_BOOL", "patch_map": "TYPE_FP32", "logits": "TYPE_FP32"}


def metadata_of(config, source: str) -> ArtifactMetadata:
    """The espmed metadata a model config carries (parameter `espmed`)."""
    if METADATA_KEY not in config.parameters:
        raise ArtifactError(f"{source}: model config has no espmed metadata (parameter '{METADATA_KEY}')")
    return ArtifactMetadata.from_json(config.parameters[METADATA_KEY].string_value, source)


def check_config(config, meta: ArtifactMetadata, source: str) -> bool:
    """Refuse a config whose tensors are not what the metadata describes; True when it takes images.

    `config` is a `tritonclient.grpc.model_config_pb2.ModelConfig` (parsed config.pbtxt, or the
    server's `get_model_config(...).config`).
    """
    from tritonclient.grpc import model_config_pb2 as pb

    def fail(problem: str) -> ArtifactError:
        return ArtifactError(f"{source}: model config does not match its espmed metadata: {problem}")

    if meta.batch:
        raise fail(f"the metadata has a fixed batch of {meta.batch}; dynamic batching needs a dynamic-batch graph")
    if config.max_batch_size < 1:
        raise fail(f"max_batch_size is {config.max_batch_size}; a dynamic-batch model needs >= 1")
    inputs = {t.name: t for t in config.input}
    outputs = {t.name: t for t in config.output}
    s = meta.input_size
    tensors = {meta.input_name: (inputs, [3, s, s])}
    outs = [(outputs, [1, s // 4, s // 4]), (outputs, [1, s // 32, s // 32])]
    tensors |= dict(zip(meta.output_names, outs, strict=True))
    for name, (table, dims) in tensors.items():
        if name not in table:
            raise fail(f"no tensor {name!r} (has {', '.join(sorted(table)) or 'none'})")
        kind = pb.DataType.Name(table[name].data_type)
        if kind != "TYPE_FP32" or list(table[name].dims) != dims:
            raise fail(f"{name} is {kind} {list(table[name].dims)}, the metadata says TYPE_FP32 {dims}")
    takes_images = IMAGE_INPUT in inputs
    if takes_images:
        image = inputs[IMAGE_INPUT]
        if pb.DataType.Name(image.data_type) != "TYPE_UINT8" or list(image.dims) != [-1, -1, 3]:
            kind = pb.DataType.Name(image.data_type)
            raise fail(f"{IMAGE_INPUT} is {kind} {list(image.dims)}, expected TYPE_UINT8 [-1, -1, 3]")
        for name, kind in _IMAGE_OUTPUT_TYPES.items():
            got = outputs.get(name)
            if got is None or pb.DataType.Name(got.data_type) != kind or list(got.dims) != [-1, -1]:
                have = "missing" if got is None else f"{pb.DataType.Name(got.data_type)} {list(got.dims)}"
                raise fail(f"image output {name} is {have}, expected {kind} [-1, -1]")
    return takes_images


def _member(folder: Path, name: str, manifest: Path) -> Path:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ArtifactError(f"{manifest}: entry {name!r} is not a path inside the repository")
    return folder.joinpath(*relative.parts)


def verify_repository(folder: str | Path) -> dict:
    """Check every file of an exported repository folder against its manifest; returns the manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    data, files = read_listing(path, "Triton repository manifest")
    for name, expected in files.items():
        check_listed_file(_member(folder, name, path), expected, path, "the file")
    ArtifactMetadata.from_json(json.dumps(data.get("metadata")), str(path))
    return data
