"""`load(artifact)`: pick the backend from the format table, verify the artifact, return a `Segmenter`."""

from __future__ import annotations

from pathlib import Path

from espmed.errors import ArtifactError

from .base import Segmenter
from .formats import Format, artifact_suffixes, folder_format, format_for_path, format_for_url, is_decoder_file
from .manifest import check_manifest_metadata, verify_manifest


def find_artifact(path: str | Path) -> Path:
    """The artifact file itself, a folder that is an artifact, or the single artifact file inside a folder
    (a box encoder's prompt decoder beside it is not an artifact of its own)."""
    path = Path(path)
    if path.is_dir():
        if folder_format(path) is not None:
            return path
        suffixes = artifact_suffixes()
        found = sorted(
            p for p in path.iterdir() if p.suffix.lower() in suffixes and not is_decoder_file(p) and p.is_file()
        )
        if len(found) != 1:
            listed = ", ".join(p.name for p in found) or "none"
            raise ArtifactError(f"{path}: expected exactly one artifact file in the folder, found {listed}")
        return found[0]
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    return path


def locate(artifact: str | Path) -> tuple[Format, str | Path]:
    """(format, where): a remote model by its URL scheme, else a local artifact by `find_artifact`."""
    remote = format_for_url(artifact) if isinstance(artifact, str) else None
    if remote is not None:
        return remote, artifact
    path = find_artifact(artifact)
    return format_for_path(path), path


def load(
    artifact: str | Path,
    *,
    device: str = "CPU",
    threads: int | None = None,
    precision: str | None = None,
    verify: bool = True,
    cache_dir: str | Path | None = None,
    modality: str | int | None = None,
    image_size: int | None = None,
) -> Segmenter:
    """Load an exported artifact (or a checkpoint, as the torch reference; or `triton://HOST:PORT/MODEL`,
    a model served by Triton) ready to `predict`.

    device: "CPU" (default), "GPU"/"CUDA", "TensorRT" (ONNX Runtime provider) or "AUTO" (OpenVINO,
        ONNX Runtime); ignored by the torch reference, which runs on CPU.
    threads: intra-op threads of the backend (None: the backend's default).
    precision: OpenVINO inference precision ("f32" default, "bf16"/"f16" opt-in); other backends
        run the precision baked into the artifact and refuse a different request.
    verify: check `<artifact>.manifest.json` hashes when the manifest is present.
    cache_dir: OpenVINO compiled-model cache (fast second start).
    modality: for a checkpoint with several controllers, the one to run; for an artifact, a
        check that it was exported for this modality.
    image_size: checkpoint only: the input size to run the weights at (multiple of 32).
    """
    fmt, path = locate(artifact)
    backend = fmt.backend
    if image_size is not None and fmt.kind != "checkpoint":
        raise ArtifactError(f"{path}: the input size of an exported artifact is fixed ({backend})")
    listed = verify_manifest(path) if verify and fmt.kind == "file" else None
    if backend == "torch":
        from .torch_reference import TorchSegmenter

        segmenter: Segmenter = TorchSegmenter(path, modality=modality, threads=threads, image_size=image_size)
    elif backend == "onnxruntime":
        from .ort import OnnxRuntimeSegmenter

        segmenter = OnnxRuntimeSegmenter(path, device=device, threads=threads)
    elif backend == "openvino":
        from .openvino_ir import OpenVinoSegmenter

        segmenter = OpenVinoSegmenter(path, device=device, threads=threads, precision=precision, cache_dir=cache_dir)
    elif backend == "triton":
        from .triton_remote import TritonSegmenter

        segmenter = TritonSegmenter(path)
    else:
        from .tensorrt_engine import TensorRtSegmenter

        gpu = device if device.upper().startswith("CUDA:") else "CUDA:0"
        segmenter = TensorRtSegmenter(path, device=gpu)
    fixed = fmt.runtime_precision is None  # the precision is the artifact's own
    if precision is not None and fixed and precision.lower() not in _aliases(segmenter.metadata.precision):
        raise ArtifactError(
            f"{path}: artifact precision is {segmenter.metadata.precision}; "
            "only OpenVINO sets the precision at run time"
        )
    if fmt.kind != "checkpoint":
        segmenter.check_modality(modality)
    if listed is not None:
        check_manifest_metadata(path, listed, segmenter.metadata)
    return segmenter


def _aliases(precision: str) -> set[str]:
    p = precision.lower()
    return {p, p.replace("fp", "f")}
