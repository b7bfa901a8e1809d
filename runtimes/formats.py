"""The one table of formats: every way espmed runs the model, and what `espmed export` makes.

A row names a format (`onnx-int8`, `openvino-bf16`, `torch`, ...), how its artifact is found (a
checkpoint or file by suffix, a folder by a marker file inside it, a remote model by URL scheme),
the backend and Python package that run it, the precision it computes in, the export options it
accepts and the label reports show. The loader, the CLI help, the benchmark rows and the
exporter all read it; the exporter adds only its builders (`espmed.export.targets`). Torch-free.

A run-time variant (`openvino-bf16`) has no artifact of its own: `artifact_of` names the row
whose artifact it runs, at its `runtime_precision`.

A second, small table, `PROMPTS`, lists the graph kinds an export makes (`espmed export --prompt`):
the self-prompted model as one artifact, or SAM's deployment pair for box prompts, an image encoder
artifact with its prompt decoder beside it (`decoder_file`). A row's `prompts` says which it exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from espmed.errors import ArtifactError, EspmedError

from .metadata import GRAPHS
from .triton_repository import MANIFEST as TRITON_MANIFEST


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """A graph kind an export makes: its files' metadata graphs (the artifact's first, the loaded one)."""

    name: str  # `espmed export --prompt NAME`
    label: str
    graphs: tuple[str, ...]  # one per file: the artifact, then what it opens beside it
    tag: str = ""  # in the default artifact name, <stem>_<modality>_<tag>_<target>


#: Every graph kind, the default first.
PROMPTS: tuple[Prompt, ...] = (
    Prompt(name="self", label="the self-prompted model, one artifact", graphs=(GRAPHS[0],)),
    Prompt(
        name="box", label="an image encoder and its prompt decoder beside it, for box prompts", graphs=GRAPHS[1:],
        tag="box",
    ),
)
#: A prompt decoder's file is its encoder's name with this before the suffix: model.decoder.onnx.
DECODER_TAG = ".decoder"


def decoder_file(encoder: str | Path) -> str:
    """The file name of a box encoder's prompt decoder (OpenVINO: its .xml; the .bin follows)."""
    path = Path(encoder)
    return f"{path.stem}{DECODER_TAG}{path.suffix}"


def is_decoder_file(path: str | Path) -> bool:
    """`path` is named as a prompt decoder: the loader never takes it for an artifact of its own."""
    return Path(path).stem.endswith(DECODER_TAG)


#: How a format's artifact is found: a checkpoint file (the torch reference), an artifact file, a
#: folder holding `marker`, or a remote model addressed as `scheme://...`.
KINDS = ("checkpoint", "file", "folder", "remote")


@dataclass(frozen=True, kw_only=True)
class Format:
    """One row of the table. `precision` is what the graph computes in: fp32 | fp16 | bf16 | int8."""

    name: str
    label: str
    backend: str  # the runtime: torch | onnxruntime | openvino | tensorrt | triton
    module: str  # the Python package the backend needs
    precision: str
    kind: str = "file"
    suffixes: tuple[str, ...] = ()  # checkpoint/file: name endings; export writes the first
    marker: str | None = None  # folder: the file inside that makes the folder this format's artifact
    scheme: str | None = None  # remote, or a folder served remotely: the URL scheme its models are loaded by
    options: tuple[str, ...] = ()  # export options the target accepts
    needs_gpu: bool = False
    runtime_precision: str | None = None  # asked of the backend when run (OpenVINO's precision hint)
    artifact_of: str | None = None  # a run-time variant: the row whose artifact it runs
    prompts: tuple[str, ...] = tuple(p.name for p in PROMPTS)  # the graph kinds it runs (and exports)

    @property
    def suffix(self) -> str:
        """The suffix `espmed export` gives the artifact ("" for a folder)."""
        return self.suffixes[0] if self.suffixes else ""

    @property
    def exportable(self) -> bool:
        return self.kind in ("file", "folder") and self.artifact_of is None

    @property
    def calibrated(self) -> bool:
        """Export needs calibration images."""
        return self.precision == "int8"

    @property
    def decoder_precision(self) -> str:
        """What a box export's prompt decoder computes in: the target's float precision (INT8: FP32; the
        decoder is small, and INT8 is for the encoder)."""
        return "fp32" if self.precision == "int8" else self.precision

    @property
    def export_target(self) -> str | None:
        """The exportable row whose artifact this row runs; None for the torch reference."""
        return self.artifact_of or (self.name if self.exportable else None)


_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt")
#: OpenVINO's CPU inference precisions an export may record (its `runtime_precision` option); the
#: first is the default.
RUNTIME_PRECISIONS = ("f32", "bf16")
_OV_OPTIONS = ("runtime_precision",)
_TRT_OPTIONS = ("workspace_mb", "timing_cache", "max_batch")
#: Export options' defaults where an exporter needs one (the CLI's help states these): the largest
#: batch of a dynamic TensorRT engine, the Triton dynamic batcher's max_batch_size, model instances.
OPTION_DEFAULTS = {"max_batch": 8, "triton_max_batch": 8, "instances": 1}
#: INT8 targets: a float-layer recipe (`espmed.export.recipe`); OpenVINO's NNCF adds its own knobs.
_INT8_OPTIONS = ("recipe",)
_NNCF_OPTIONS = ("smooth_quant_alpha", "accuracy_control")


def _int8(precision: str, *extra: str) -> tuple[str, ...]:
    return (_INT8_OPTIONS + extra) if precision == "int8" else ()


def _onnx(name: str, precision: str, label: str) -> Format:
    return Format(
        name=name, label=label, backend="onnxruntime", module="onnxruntime", precision=precision, suffixes=(".onnx",),
        options=_int8(precision),
    )


def _openvino(name: str, precision: str, label: str) -> Format:
    return Format(
        name=name, label=label, backend="openvino", module="openvino", precision=precision, suffixes=(".xml",),
        options=_OV_OPTIONS + _int8(precision, *_NNCF_OPTIONS), runtime_precision=RUNTIME_PRECISIONS[0],
    )


def _tensorrt(name: str, precision: str, label: str) -> Format:
    return Format(
        name=name, label=label, backend="tensorrt", module="tensorrt", precision=precision, suffixes=(".engine",),
        options=_TRT_OPTIONS + _int8(precision), needs_gpu=True,
    )


#: Every format, in the order the benchmark shows them; the torch reference first.
FORMATS: tuple[Format, ...] = (
    Format(
        name="torch", label="torch eager FP32 (reference)", backend="torch", module="torch", precision="fp32",
        kind="checkpoint", suffixes=_CHECKPOINT_SUFFIXES,
    ),
    _onnx("onnx", "fp32", "ONNX Runtime FP32"),
    _onnx("onnx-fp16", "fp16", "ONNX Runtime FP16"),
    _onnx("onnx-int8", "int8", "ONNX Runtime INT8 (QDQ)"),
    _openvino("openvino", "fp32", "OpenVINO FP32"),
    Format(
        name="openvino-bf16", label="OpenVINO FP32 IR, BF16 runtime precision", backend="openvino", module="openvino",
        precision="bf16", runtime_precision="bf16", artifact_of="openvino",
    ),
    _openvino("openvino-fp16", "fp16", "OpenVINO FP16 weights (f32 compute)"),
    _openvino("openvino-int8", "int8", "OpenVINO INT8 (NNCF)"),
    Format(
        name="openvino-int8-bf16", label="OpenVINO INT8 IR, BF16 runtime precision (float ops in BF16)",
        backend="openvino", module="openvino", precision="int8", runtime_precision="bf16",
        artifact_of="openvino-int8",
    ),
    _tensorrt("trt-fp32", "fp32", "TensorRT FP32"),
    _tensorrt("trt-fp16", "fp16", "TensorRT FP16"),
    _tensorrt("trt-int8", "int8", "TensorRT INT8"),
    # Model repositories around an exported artifact (precision: the artifact's), run by a Triton
    # server and loaded as triton://HOST:PORT/MODEL.
    Format(
        name="triton", label="Triton server (dynamic batching)", backend="triton", module="tritonclient",
        precision="fp32", kind="folder", marker=TRITON_MANIFEST, scheme="triton",
        options=("triton_max_batch", "instances"), prompts=(PROMPTS[0].name,),
    ),
)


def format_named(name: str) -> Format:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise EspmedError(f"unknown format {name!r}; choose from {', '.join(f.name for f in FORMATS)}")


def reference() -> Format:
    """The torch reference: the row that runs a checkpoint, which every other row is compared with."""
    return next(f for f in FORMATS if f.kind == "checkpoint")


def exportable() -> list[Format]:
    """The rows `espmed export --target` accepts, in table order."""
    return [f for f in FORMATS if f.exportable]


def export_options() -> list[str]:
    """Every export option some target accepts, in table order (`espmed export` spells `max_batch`
    as `--max-batch`)."""
    return list(dict.fromkeys(o for f in exportable() for o in f.options))


def artifact_suffixes() -> list[str]:
    """Every file suffix the loader recognises (artifacts and checkpoints), in table order."""
    return list(dict.fromkeys(s for f in FORMATS if f.artifact_of is None for s in f.suffixes))


def format_for_url(text: str) -> Format | None:
    """The row whose scheme `text` starts with (`scheme://...`), or None."""
    scheme, sep, _ = text.partition("://")
    if not sep:
        return None
    return next((f for f in FORMATS if f.scheme is not None and f.scheme == scheme.lower()), None)


def folder_format(path: Path) -> Format | None:
    """The folder row whose marker file `path` holds, or None."""
    return next((f for f in FORMATS if f.kind == "folder" and (path / f.marker).is_file()), None)


def format_for_path(path: str | Path) -> Format:
    """The row that runs the artifact at `path`: a marked folder, else a file by its suffix.

    Several rows share a file type (onnx, onnx-fp16, onnx-int8): the first one is returned, which
    fixes the backend and kind; the precision of an artifact is the one in its own metadata.
    """
    path = Path(path)
    found = folder_format(path) if path.is_dir() else None
    suffix = path.suffix.lower()
    found = found or next((f for f in FORMATS if f.artifact_of is None and suffix in f.suffixes), None)
    if found is None:
        raise ArtifactError(
            f"{path}: unknown artifact type {path.suffix!r}; expected one of {', '.join(artifact_suffixes())}"
        )
    return found
