"""`espmed export --target triton`: Triton model repositories around an exported artifact.

From an ONNX file, OpenVINO IR or TensorRT engine (`--from`; a checkpoint is first exported to a
dynamic-batch FP32 ONNX, gate-checked as usual) it writes, under one folder (layout in
`espmed.runtimes.triton_repository`):

- `<native>/<name>/`: Triton's own backend for the artifact (`onnxruntime_onnx`, the `openvino`
  backend, `tensorrt_plan`: the engine without espmed's header, whose metadata goes into the
  config); the client sends the preprocessed tensor and does pre- and post-processing;
- `python/<name>/`: the Python backend wrapping `espmed.runtimes` (the artifact copied beside
  model.py): it takes the uint8 image and returns the mask at its size. A repository of its own,
  since a Triton without the native backend refuses to start on a repository that names it.

Both configs have dynamic batching (a preferred batch and a queue delay), an instance group (CPU,
GPU for an engine) and the artifact's metadata; the folder's manifest lists every file. Built in a
hidden staging folder and moved into place whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from espmed.atomic import file_sha256, write_bytes, write_text
from espmed.errors import EspmedError, ExportError
from espmed.runtimes import engine_header
from espmed.runtimes.base import Segmenter
from espmed.runtimes.formats import OPTION_DEFAULTS, format_for_path
from espmed.runtimes.loader import find_artifact
from espmed.runtimes.manifest import check_manifest_metadata, manifest_path, verify_manifest
from espmed.runtimes.metadata import GRAPHS, METADATA_KEY, ArtifactMetadata
from espmed.runtimes.triton_repository import (
    ARTIFACT_PARAMETER,
    IMAGE_INPUT,
    IMAGE_OUTPUTS,
    MANIFEST,
    PYTHON_REPOSITORY,
    check_config,
)

from .manifest import ExportResult, manifest_dict, staging_dir

#: espmed backend -> (repository folder, config field, its value, the model file Triton looks for).
NATIVE = {
    "onnxruntime": ("onnxruntime", "platform", "onnxruntime_onnx", "model.onnx"),
    "openvino": ("openvino", "backend", "openvino", "model.xml"),
    "tensorrt": ("tensorrt", "platform", "tensorrt_plan", "model.plan"),
}
DEFAULT_MAX_BATCH = OPTION_DEFAULTS["triton_max_batch"]
DEFAULT_INSTANCES = OPTION_DEFAULTS["instances"]
#: How long the dynamic batcher waits for more requests before running a smaller batch.
QUEUE_DELAY_US = 1000


def export_repository(
    source,
    out: Path | None = None,
    *,
    triton_max_batch: int = DEFAULT_MAX_BATCH,
    instances: int = DEFAULT_INSTANCES,
    modality: str | int | None = None,
    imgsz: int | None = None,
    batch: int = 1,
    progress=None,
    export_checkpoint: Callable[..., ExportResult],
    **checkpoint_options,
) -> ExportResult:
    """Write the repositories for `source` (an artifact, or a checkpoint / model to export to ONNX first).

    `export_checkpoint` is `espmed.export.targets.export` (which calls this function for the triton
    target and passes itself, so neither module imports the other); `checkpoint_options` (dynamic,
    simplify, opset, calib, max_drop) apply to a checkpoint only.
    """
    if triton_max_batch < 1 or instances < 1:
        raise ExportError(f"--triton-max-batch and --instances must be >= 1, got {triton_max_batch} and {instances}")
    if batch != 1:
        raise ExportError("Triton batches a dynamic-batch graph: give --triton-max-batch, not --batch")
    with staging_dir(Path(out or "triton").resolve()) as work:
        if _is_checkpoint(source):
            checkpoint_options["dynamic"] = True
            onnx = export_checkpoint(
                source, "onnx", work / "onnx", modality=modality, imgsz=imgsz, progress=progress, **checkpoint_options
            )
            source, modality, imgsz = onnx.artifact, None, None
        path = find_artifact(source)
        if imgsz is not None:
            raise ExportError(f"{path}: an exported artifact's input size is fixed; --imgsz applies to a checkpoint")
        meta, backend = _artifact_metadata(path, modality)
        final = Path(out).resolve() if out is not None else Path(f"{path.stem}_triton").resolve()
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
        settings = {
            "model": name, "max_batch_size": triton_max_batch, "preferred_batch_size": _preferred(triton_max_batch),
            "max_queue_delay_microseconds": QUEUE_DELAY_US, "instances": instances,
            "instance_kind": "KIND_GPU" if backend == "tensorrt" else "KIND_CPU",
        }
        tree = work / "tree"
        native = NATIVE[backend][0]
        _note(progress, f"  Triton repositories {native}/ and {PYTHON_REPOSITORY}/ for model {name!r}")
        _write_native(tree / native / name, path, meta, backend, settings)
        _write_python(tree / PYTHON_REPOSITORY / name, path, meta, settings)
        files = sorted(p for p in tree.rglob("*") if p.is_file())
        listed = {
            "metadata": json.loads(meta.to_json()),
            "files": {p.relative_to(tree).as_posix(): file_sha256(p) for p in files},
        }
        listed["triton"] = {**settings, "repositories": {native: NATIVE[backend][2], PYTHON_REPOSITORY: "python"}}
        write_text(tree / MANIFEST, json.dumps(listed, indent=2, sort_keys=True) + "\n")
        _replace_folder(tree, final, work)
    published = sorted(p for p in final.rglob("*") if p.is_file() and p.name != MANIFEST)
    return ExportResult(final, final / MANIFEST, meta, published)


def _is_checkpoint(source) -> bool:
    if not isinstance(source, (str, Path)):
        return True  # an in-memory model
    path = Path(source)
    return path.is_file() and format_for_path(path).kind == "checkpoint"


def _note(progress, text: str) -> None:
    if progress is not None:
        progress("note", text)


def _preferred(max_batch: int) -> list[int]:
    return sorted({max(1, max_batch // 2), max_batch})


def _artifact_metadata(path: Path, modality) -> tuple[ArtifactMetadata, str]:
    """The artifact's verified metadata and backend; a fixed batch is refused."""
    from espmed.runtimes import load

    fmt = format_for_path(path)
    if fmt.backend not in NATIVE:
        raise ExportError(f"{path}: --from takes an exported .onnx, .xml or .engine artifact (or --checkpoint)")
    if fmt.needs_gpu:  # the engine's header is read without TensorRT; the engine runs on the server
        listed = verify_manifest(path)
        meta = engine_header.read_metadata(path)
        if listed is not None:
            check_manifest_metadata(path, listed, meta)
        Segmenter(meta, path).check_modality(modality)
    else:
        segmenter = load(path)
        segmenter.check_modality(modality)
        meta = segmenter.metadata
    if meta.graph != GRAPHS[0]:
        raise ExportError(f"{path}: a {meta.graph} artifact; Triton serves self-prompted ones only (--prompt self)")
    if meta.batch:
        raise ExportError(
            f"{path}: the artifact has a fixed batch of {meta.batch}; Triton's dynamic batching needs a "
            f"dynamic-batch artifact: export it again with --dynamic"
        )
    return meta, fmt.backend


def _artifact_files(path: Path) -> list[Path]:
    """The artifact's files: those its manifest lists, else the file (and an IR's weights)."""
    mp = manifest_path(path)
    if mp.is_file():
        return [path.with_name(n) for n in json.loads(mp.read_text(encoding="utf-8"))["files"]]
    return [path, path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [path]


def _config(name: str, meta: ArtifactMetadata, settings: dict, *, images: bool):
    """The model config (a `model_config_pb2.ModelConfig`): the tensor interface, and the image one."""
    from tritonclient.grpc import model_config_pb2 as pb

    s = meta.input_size
    config = pb.ModelConfig(name=name, max_batch_size=settings["max_batch_size"])
    config.input.add(name=meta.input_name, data_type=pb.TYPE_FP32, dims=[3, s, s], optional=images)
    for out, size in zip(meta.output_names, (s // 4, s // 32), strict=True):
        config.output.add(name=out, data_type=pb.TYPE_FP32, dims=[1, size, size])
    if images:
        image = {"data_type": pb.TYPE_UINT8, "dims": [-1, -1, 3], "allow_ragged_batch": True, "optional": True}
        config.input.add(name=IMAGE_INPUT, **image)
        for out, kind in zip(IMAGE_OUTPUTS, (pb.TYPE_BOOL, pb.TYPE_FP32, pb.TYPE_FP32), strict=True):
            config.output.add(name=out, data_type=kind, dims=[-1, -1])
    config.dynamic_batching.preferred_batch_size.extend(settings["preferred_batch_size"])
    config.dynamic_batching.max_queue_delay_microseconds = settings["max_queue_delay_microseconds"]
    kind = pb.ModelInstanceGroup.Kind.Value(settings["instance_kind"])
    config.instance_group.add(count=settings["instances"], kind=kind)
    config.parameters[METADATA_KEY].string_value = meta.to_json()
    return config


def _write_config(folder: Path, config, meta: ArtifactMetadata) -> None:
    """config.pbtxt, read back and checked as the client will check it."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    path = folder / "config.pbtxt"
    write_text(path, text_format.MessageToString(config))
    check_config(text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig()), meta, str(path))


def _write_native(folder: Path, artifact: Path, meta: ArtifactMetadata, backend: str, settings: dict) -> None:
    _, field, value, model_file = NATIVE[backend]
    version = folder / "1"
    version.mkdir(parents=True)
    config = _config(folder.name, meta, settings, images=False)
    setattr(config, field, value)
    _write_config(folder, config, meta)
    if backend == "tensorrt":
        write_bytes(version / model_file, engine_header.read_engine(artifact)[1])
        return
    for f in _artifact_files(artifact):
        # Triton looks for model.onnx / model.xml (+ model.bin beside it); external ONNX data keeps its name.
        renamed = model_file if f == artifact else ("model.bin" if f.suffix.lower() == ".bin" else f.name)
        shutil.copyfile(f, version / renamed)


def _write_python(folder: Path, artifact: Path, meta: ArtifactMetadata, settings: dict) -> None:
    version = folder / "1"
    version.mkdir(parents=True)
    config = _config(folder.name, meta, settings, images=True)
    config.backend = "python"
    config.parameters[ARTIFACT_PARAMETER].string_value = artifact.name
    _write_config(folder, config, meta)
    shutil.copyfile(Path(__file__).with_name("triton_python_model.py"), version / "model.py")
    copies = []
    for f in _artifact_files(artifact):
        shutil.copyfile(f, version / f.name)
        copies.append(version / f.name)
    listed = json.dumps(manifest_dict(meta, copies), indent=2, sort_keys=True)
    write_text(manifest_path(version / artifact.name), listed + "\n")


def _replace_folder(tree: Path, final: Path, work: Path) -> None:
    """Move the finished tree to `final`; a previous export there is moved aside first, then removed."""
    if final.exists():
        if not (final / MANIFEST).is_file() and (not final.is_dir() or any(final.iterdir())):
            raise ExportError(f"{final}: exists and is not an espmed Triton export; choose another --out")
        os.replace(final, work / "previous")
    try:
        os.replace(tree, final)
    except OSError as exc:
        raise EspmedError(f"{final}: cannot publish the repository ({exc.strerror})") from None
