"""The table of export targets and `export()`, the one entry point the CLI and bench build on.

Every target starts from the same FP32 ONNX graph (dynamo exporter), is checked against the torch
model on held-out real images, and is published atomically: all files are written into a hidden
staging folder beside the destination, moved over their final names, and the manifest comes last.
A box-prompted export (`prompt="box"`) makes two graphs, the image encoder (the artifact) and its
prompt decoder beside it: the decoder is built first (`_DECODERS`), so that the encoder's builder
judges the staged pair through the runtime, and one manifest lists both.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from espmed import __version__
from espmed.atomic import file_sha256
from espmed.errors import BackendUnavailableError, ExportError
from espmed.runtimes.base import Segmenter
from espmed.runtimes.formats import (
    DECODER_TAG,
    OPTION_DEFAULTS,
    PROMPTS,
    RUNTIME_PRECISIONS,
    Format,
    Prompt,
    decoder_file,
    exportable,
    is_decoder_file,
)
from espmed.runtimes.metadata import GRAPH_IO, INPUT_NAME, ArtifactMetadata, decoder_metadata

from .accuracy import JUDGES, Attempt, Gate
from .calibration import CalibrationSet, load_calibration
from .manifest import ExportResult, library_versions, publish, staging_dir
from .recipe import Recipe, find_recipe
from .triton_export import export_repository

#: An export target is an exportable row of the runtimes' format table (name, suffix, backend,
#: precision, options); the exporter adds only its builders (`_BUILDERS`, by backend).
Target = Format
TARGETS: dict[str, Target] = {f.name: f for f in exportable()}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ExportError(f"unknown export target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def get_prompt(name: str, target: Target) -> Prompt:
    """The graph kind `name` (`PROMPTS`), refused where `target` does not export it."""
    prompt = next((p for p in PROMPTS if p.name == name), None)
    if prompt is None:
        raise ExportError(f"unknown prompt {name!r}; choose from {', '.join(p.name for p in PROMPTS)}")
    if name not in target.prompts:
        raise ExportError(f"target {target.name} exports --prompt {' or '.join(target.prompts)} only, not {name}")
    return prompt


def check_options(target: Target, options: dict[str, Any], *, spell: Callable[[str], str] = str) -> None:
    """Refuse options the target does not take; `spell` names them (the CLI: as its flags)."""
    unknown = sorted(set(options) - set(target.options))
    if unknown:
        accepted = ", ".join(map(spell, target.options)) if target.options else "none"
        raise ExportError(
            f"target {target.name} does not accept {', '.join(map(spell, unknown))} (accepted: {accepted})"
        )


def _load_model(checkpoint_or_model, imgsz: int | None):
    from espmed.model import ESPMedSAM, load_checkpoint

    if isinstance(checkpoint_or_model, ESPMedSAM):
        model = checkpoint_or_model
        if imgsz is not None and imgsz != model.config.image_size:
            raise ExportError("imgsz applies to a checkpoint file; build the in-memory model at the size to export")
        return model.eval(), "", "in-memory model"
    path = Path(checkpoint_or_model)
    model = load_checkpoint(path, image_size=imgsz)
    return model, file_sha256(path), path.stem


def default_output(stem: str, modality: str, target: Target, prompt: Prompt = PROMPTS[0]) -> Path:
    return Path("_".join(part for part in (stem, modality, prompt.tag, target.name) if part) + target.suffix)


def _resolve_output(out: Path | None, stem: str, modality: str, target: Target, prompt: Prompt) -> Path:
    if out is None:
        return default_output(stem, modality, target, prompt).resolve()
    out = Path(out)
    if out.is_dir() or not out.suffix:  # a folder (existing, or a name without a suffix)
        return (out / default_output(stem, modality, target, prompt)).resolve()
    if out.suffix != target.suffix:
        raise ExportError(f"{out}: a {target.name} artifact must end in {target.suffix}")
    if is_decoder_file(out):
        raise ExportError(f"{out}: *{DECODER_TAG}{out.suffix} names a prompt decoder; give the artifact's own name")
    return out.resolve()


def _check_backend(target: Target) -> None:
    """A GPU target's library must be there before any work is done (only TensorRT's today)."""
    if not target.needs_gpu:
        return
    try:
        importlib.import_module(target.module)
    except ImportError:
        raise BackendUnavailableError(
            f"target {target.name} needs TensorRT 10 and an NVIDIA GPU (pip install 'espmed[tensorrt]' "
            f"from NVIDIA's index); {target.module} is not installed here"
        ) from None


#: `progress(event, text)`: event "start" or "finish" of a stage (text: its description), or "note"
#: (text: a line of results). The CLI shows them with rich; the library prints nothing itself.
Progress = Callable[[str, str], None]


def export(
    checkpoint_or_model,
    target: str,
    out: Path | None = None,
    *,
    modality: str | int | None = None,
    imgsz: int | None = None,
    batch: int = 1,
    dynamic: bool = False,
    simplify: str = "onnxsim",
    opset: int = 18,
    calib: str | Path | None = None,
    max_drop: float = 0.02,
    prompt: str = PROMPTS[0].name,
    progress: Progress | None = None,
    **options,
) -> ExportResult:
    """Export a checkpoint (path) or an ESPMedSAM model to `target`; see `TARGETS`.

    `prompt`: "self", the self-prompted model (one artifact, `modality` baked in; default the model's);
    or "box", the image encoder (under `modality`'s controller, or None: the shared trunk) with its
    prompt decoder beside it. A wrapping target (`_WRAPPERS`: triton) also takes an exported artifact
    as `checkpoint_or_model`.
    """
    from .graph import GraphSegmenter, export_graphs

    tgt = get_target(target)
    kind = get_prompt(prompt, tgt)
    check_options(tgt, options)
    if tgt.backend in _WRAPPERS:
        return _WRAPPERS[tgt.backend](
            checkpoint_or_model, out, modality=modality, imgsz=imgsz, batch=batch, dynamic=dynamic,
            simplify=simplify, opset=opset, calib=calib, max_drop=max_drop, progress=progress,
            export_checkpoint=export, **options,
        )
    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    if dynamic and batch != 1:
        raise ExportError("give either a fixed --batch or --dynamic, not both")
    if not 0.0 <= max_drop < 1.0:
        raise ExportError(f"max_drop must be in [0, 1), got {max_drop}")
    runtime_precision = options.get("runtime_precision")
    if runtime_precision not in (None, *RUNTIME_PRECISIONS):
        raise ExportError(f"runtime_precision must be {' or '.join(RUNTIME_PRECISIONS)}, got {runtime_precision!r}")
    if kind.name != "self" and batch != 1:
        raise ExportError("a box encoder embeds one image per call: give --batch 1 (the default) or --dynamic")
    if kind.name != "self" and options.get("accuracy_control"):
        raise ExportError("accuracy_control validates self-prompted masks only; a box export takes the gate's search")
    _check_backend(tgt)

    stages = _Stages(progress)
    with stages.stage("load checkpoint"):
        model, ckpt_sha, stem = _load_model(checkpoint_or_model, imgsz)
        graph, decoder = export_graphs(model, modality, kind.name)
    if modality is None:
        others = ", ".join(m for m in model.available_modalities if m != graph.modality)
        if graph.modality_index < 0:
            stages.note(f"  modality: none, the shared trunk (the model also has {others}: choose with --modality)")
        elif others:
            stages.note(
                f"  modality: {graph.modality} (the model's default; it also has {others}: choose with --modality)"
            )
    final = _resolve_output(out, stem, graph.modality, tgt, kind)
    meta = _metadata(
        tgt, graph, batch=0 if dynamic else batch, checkpoint_sha256=ckpt_sha, opset=opset, simplify=simplify
    )
    if decoder is not None:
        meta.decoder = decoder_file(final)
    pre = graph.config.preprocessing
    held_modality = None if graph.modality_index < 0 else graph.modality
    with stages.stage(f"read {'calibration and ' if tgt.calibrated else ''}held-out images"):
        images = load_calibration(calib, meta.input_size, pre.mean, pre.std, pre.resize, modality=held_modality)
        gate = Gate.build(
            GraphSegmenter(graph, meta, decoder), {im.path.name: im.image for im in images.held_out},
            max_drop=max_drop, threshold=pre.mask_threshold, batch=meta.batch, judge=JUDGES[kind.name],
            on_attempt=stages.attempt,
        )
    recipe = None
    if tgt.calibrated:
        meta.calibration = images.describe()
        # no hash: an in-memory model; a box encoder: the recipe beside the checkpoint ranked the
        # self-prompted graph's masks, so only one named explicitly applies
        source = Path(checkpoint_or_model) if ckpt_sha and kind.name == "self" else None
        recipe = find_recipe(options.get("recipe"), source, ckpt_sha)
        if recipe is not None:
            meta.extra["recipe"] = recipe.describe()
            stages.note(f"  float-layer recipe: {recipe.source}")
            if tgt.backend == "openvino" and runtime_precision is None:
                runtime_precision = recipe.runtime_precision  # the mix the ranking chose and gated
    runtime_precision = runtime_precision or RUNTIME_PRECISIONS[0]

    with staging_dir(final) as tmp:
        staged_decoder = []
        if decoder is not None:  # first, so that the encoder's gate runs the staged pair
            staged_decoder = _stage_decoder(
                decoder, decoder_metadata(meta, tgt.decoder_precision), tgt, tmp / meta.decoder, runtime_precision,
                options, opset=opset, simplify=simplify, stages=stages,
            )
        fp32_onnx = tmp / (final.stem + ".fp32-work.onnx")
        proto = _export_fp32_onnx(
            graph, fp32_onnx, tgt, batch=batch, dynamic=dynamic, opset=opset, simplify=simplify, stages=stages
        )
        ctx = _Context(
            target=tgt, tmp=tmp, final=final, fp32_onnx=fp32_onnx, proto=proto, images=images, gate=gate, stages=stages,
            recipe=recipe,
        )
        staged = _BUILDERS[tgt.backend](ctx, meta, runtime_precision, options) + staged_decoder
        with stages.stage("publish (atomic)"):
            files, manifest = publish(staged, final.parent, meta, final.name)
    return ExportResult(files[0], manifest, meta, files)


def _metadata(
    target: Target, graph, *, batch: int, checkpoint_sha256: str, opset: int, simplify: str
) -> ArtifactMetadata:
    from .onnx_export import EXPORTER

    cfg = graph.config
    inputs, outputs = GRAPH_IO[graph.kind]
    return ArtifactMetadata(
        target=target.name, backend=target.backend, precision=target.precision, modality=graph.modality,
        modality_index=graph.modality_index, modalities=list(cfg.modalities), input_size=cfg.image_size,
        batch=batch, preprocessing=cfg.preprocessing.to_dict(), preset=cfg.preset, espmed_version=__version__,
        source_checkpoint_sha256=checkpoint_sha256, exporter=EXPORTER, opset=opset, simplifier=simplify,
        library_versions=library_versions(), graph=graph.kind, input_name=inputs[0], output_names=list(outputs),
    )


def _export_fp32_onnx(
    graph, path: Path, target: Target, *, batch: int, dynamic: bool, opset: int, simplify: str, stages: _Stages
):
    """The FP32 ONNX every target starts from, saved at `path`; returns the ModelProto."""
    from . import onnx_export

    # OpenVINO FP32 and INT8 convert from a dynamic-batch graph and are then fixed to the
    # batch asked for: from a static graph the converter folds every window-attention bias,
    # expanded over all windows, into the IR, which multiplies its size. FP16 keeps the static
    # graph: FP16-compressing the unfolded bias path loses far more Dice than the folded one
    # (the accuracy gate judges each export).
    onnx_dynamic = dynamic or (target.backend == "openvino" and target.precision in ("fp32", "int8"))
    shape = f"dynamic {graph.dim}" if onnx_dynamic else f"batch {batch}"
    what = "" if graph.kind == "self-prompted" else f" of the {graph.label}"
    with stages.stage(f"export ONNX{what} ({onnx_export.EXPORTER}, opset {opset}, {shape}, simplify: {simplify})"):
        proto = onnx_export.export_onnx(graph, path, batch=batch, dynamic=onnx_dynamic, opset=opset, simplify=simplify)
        onnx_export.save_onnx(proto, path)
    return proto


class _Stages:
    """Stage and note events for the caller's `progress` callback (None: silent)."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        self._emit("start", description)
        yield
        self._emit("finish", description)

    def note(self, text: str) -> None:
        self._emit("note", text)

    def attempt(self, attempt: Attempt) -> None:
        c = attempt.comparison
        layers = len(attempt.float_layers)
        self.note(f"  INT8 try '{attempt.label}' ({layers} float layers): min Dice {min(c.dice):.4f}")

    def _emit(self, event: str, text: str) -> None:
        if self._progress is not None:
            self._progress(event, text)


@dataclass(kw_only=True)
class _Context:
    target: Target
    tmp: Path
    final: Path
    fp32_onnx: Path
    proto: Any
    images: CalibrationSet
    gate: Gate
    stages: _Stages
    recipe: Recipe | None = None  # INT8: the model's float-layer recipe

    def staged(self, name: str | None = None) -> Path:
        return self.tmp / (name or self.final.name)

    def check(self, candidate: Segmenter, meta: ArtifactMetadata, what: str) -> None:
        """Judge the staged candidate against torch FP32 on the gated images; refuse one that fails."""
        result = self.gate.check(candidate, self.target.name)
        meta.accuracy = self.gate.describe(result)
        skipped = self.gate.without_foreground
        side = self.gate.judge.keys[1].removeprefix("max_abs_").removesuffix("_logit")
        masks = "image" if self.gate.judge is JUDGES["self"] else "box mask"
        self.stages.note(
            f"  {what}: max |Δ logit| {result.max_abs_logit:.2e} ({side} {result.max_abs_side:.2e}), "
            f"Dice vs FP32 min {min(result.dice):.4f} on {len(result.dice)} held-out "
            f"{masks}{'s' if len(result.dice) != 1 else ''}"
            + (f" ({len(skipped)} without FP32 foreground not gated)" if skipped else "")
        )

    def record_gate(self, meta: ArtifactMetadata, best: Attempt, attempts: list[Attempt], extra: dict) -> None:
        meta.float_layers = list(best.float_layers)
        meta.accuracy = self.gate.describe_search(best, attempts)
        meta.extra.update(extra)
        self.stages.note(self.gate.table(attempts))


def _build_onnx(ctx: _Context, meta: ArtifactMetadata, runtime_precision: str, options: dict) -> list[Path]:
    import onnx

    from . import onnx_export, quantize

    out = ctx.staged()
    prec = ctx.target.precision
    if prec == "fp32":
        model = ctx.proto
        with ctx.stages.stage("check ONNX Runtime vs torch"):
            ctx.check(onnx_export.save_and_open(model, meta, out), meta, "onnxruntime fp32")
    elif prec == "fp16":
        with ctx.stages.stage("convert to FP16 (FP32 inputs/outputs)"):
            model = onnx_export.to_fp16(ctx.proto)
        with ctx.stages.stage("check FP16 vs FP32"):
            ctx.check(onnx_export.save_and_open(model, meta, out), meta, "onnxruntime fp16")
        meta.float_layers = [f"op:{t}" for t in onnx_export.FP16_KEEP_FLOAT_OPS]
    else:
        n = len(ctx.images.calibration)
        label = f"quantize INT8 (ORT static QDQ, per-channel, symmetric; {n} calibration images) + accuracy gate"
        with ctx.stages.stage(label):
            best, attempts = quantize.quantize_onnx_int8(
                source=ctx.fp32_onnx, out=out, calibration=ctx.images.calibration, gate=ctx.gate, metadata=meta,
                recipe=ctx.recipe,
            )
        ctx.record_gate(meta, best, attempts, {
            "quantized_op_types": list(quantize.QUANTIZED_OP_TYPES),
            "quantization": "onnxruntime static QDQ, per-channel, symmetric int8, MinMax",
        })
        model = onnx.load(str(out))
    onnx_export.embed_metadata(model, meta)
    return onnx_export.save_onnx(model, out)


def _build_openvino(ctx: _Context, meta: ArtifactMetadata, runtime_precision: str, options: dict) -> list[Path]:
    from . import openvino_export as ovx

    meta.runtime_precision = runtime_precision
    prec = ctx.target.precision
    with ctx.stages.stage("convert ONNX -> OpenVINO"):
        model = ovx.convert_onnx(ctx.fp32_onnx)
        if meta.batch:
            model.reshape({INPUT_NAME: [meta.batch, 3, meta.input_size, meta.input_size]})
    xml = ctx.staged()
    if prec == "int8":
        model = ovx.with_fp16_weights(model, ctx.staged(f"fp16-weights-{xml.name}"))
        n = len(ctx.images.calibration)
        settings = _nncf_settings(options, ctx.recipe)
        loop = "NNCF accuracy control" if settings.accuracy_control else "accuracy gate"
        if settings.accuracy_control and runtime_precision != RUNTIME_PRECISIONS[0]:
            ctx.stages.note(  # NNCF compiles every candidate it validates with f32 inference precision
                f"  note: NNCF's accuracy control validates at f32, the gate judges its result at {runtime_precision} "
                "and may refuse it; --runtime-precision f32 matches the two"
            )
        with ctx.stages.stage(f"quantize INT8 (NNCF, symmetric; {n} calibration images) + {loop}"):
            model, best, attempts = ovx.quantize_nncf(
                source=model, out=xml, calibration=ctx.images.calibration, gate=ctx.gate, metadata=meta,
                runtime_precision=runtime_precision, settings=settings, recipe=ctx.recipe,
            )
        ctx.record_gate(meta, best, attempts, {"quantization": settings.describe()})
    else:
        weights = "FP16 weights, " if prec == "fp16" else ""
        with ctx.stages.stage(f"check OpenVINO ({weights}{runtime_precision}) vs torch"):
            probe = xml.with_name(f"{xml.stem}.probe{xml.suffix}")
            candidate = ovx.save_and_open(
                model, meta, probe, compress_to_fp16=prec == "fp16", precision=runtime_precision
            )
            ctx.check(candidate, meta, f"openvino {prec} ({runtime_precision})")
    ovx.embed_metadata(model, meta)
    return ovx.save_ir(model, xml, compress_to_fp16=prec == "fp16")


def _nncf_settings(options: dict, recipe: Recipe | None):
    """NNCF knobs from the export options, else the recipe's SmoothQuant alpha."""
    from .openvino_export import NncfSettings

    alpha = options.get("smooth_quant_alpha", recipe.smooth_quant_alpha if recipe else None)
    if alpha is not None and not (alpha == -1 or 0.0 <= float(alpha) <= 1.0):
        raise ExportError(f"smooth_quant_alpha must be in [0, 1] (or -1: SmoothQuant off), got {alpha}")
    control = options.get("accuracy_control", False)
    if not isinstance(control, bool):
        raise ExportError(f"accuracy_control must be true or false, got {control!r}")
    return NncfSettings(smooth_quant_alpha=None if alpha is None else float(alpha), accuracy_control=control)


def _build_tensorrt(ctx: _Context, meta: ArtifactMetadata, runtime_precision: str, options: dict) -> list[Path]:
    from espmed.runtimes import engine_header, load

    from . import quantize
    from . import tensorrt_export as trtx

    source = ctx.fp32_onnx
    if ctx.target.precision == "int8":
        qdq = ctx.staged(ctx.final.stem + ".qdq-work.onnx")
        with ctx.stages.stage("quantize INT8 QDQ for TensorRT (ORT, symmetric) + accuracy gate"):
            best, attempts = quantize.quantize_onnx_int8(
                source=ctx.fp32_onnx, out=qdq, calibration=ctx.images.calibration, gate=ctx.gate, metadata=meta,
                recipe=ctx.recipe,
            )
        ctx.record_gate(meta, best, attempts, {"quantization": "explicit QDQ from onnxruntime static quantization"})
        source = qdq
    with ctx.stages.stage("TensorRT preflight"):
        import onnx

        trtx.preflight(onnx.load(str(source), load_external_data=False), dynamic=meta.batch == 0)
    with ctx.stages.stage(f"build TensorRT {ctx.target.precision} engine"):
        max_batch = int(options.get("max_batch", OPTION_DEFAULTS["max_batch"]))
        engine, info, plan = trtx.build_engine(
            source, ctx.target.precision, profiles=trtx.batch_profiles(meta.input_size, meta.batch, max_batch),
            workspace_mb=options.get("workspace_mb"),
            timing_cache=options.get("timing_cache"),
        )
    meta.extra.update(info.to_extra())
    meta.extra["fp32_pinned_layers"] = len(plan)
    if ctx.target.precision != "int8":
        meta.float_layers = plan
    out = ctx.staged()
    with ctx.stages.stage("check TensorRT vs torch"):
        engine_header.write_engine(out, meta, engine)
        ctx.check(load(out, verify=False), meta, f"tensorrt {ctx.target.precision}")
    engine_header.write_engine(out, meta, engine)
    return [out]


_BUILDERS = {"onnxruntime": _build_onnx, "openvino": _build_openvino, "tensorrt": _build_tensorrt}


def _stage_decoder(
    graph, meta: ArtifactMetadata, target: Target, out: Path, runtime_precision: str, options: dict, *, opset: int,
    simplify: str, stages: _Stages,
) -> list[Path]:
    """The prompt decoder exported to FP32 ONNX (N boxes dynamic) and built for `target` at
    `meta.precision`, staged at `out` (the name its encoder's metadata gives it)."""
    work = out.with_name(out.stem + ".fp32-work.onnx")
    proto = _export_fp32_onnx(graph, work, target, batch=0, dynamic=True, opset=opset, simplify=simplify, stages=stages)
    with stages.stage(f"build the prompt decoder ({target.backend}, {meta.precision})"):
        return _DECODERS[target.backend](work, proto, out, meta, runtime_precision, options)


def _decoder_onnx(
    work: Path, proto, out: Path, meta: ArtifactMetadata, runtime_precision: str, options: dict
) -> list[Path]:
    from . import onnx_export

    model = proto
    if meta.precision == "fp16":
        model = onnx_export.to_fp16(proto)
        meta.float_layers = [f"op:{t}" for t in onnx_export.FP16_KEEP_FLOAT_OPS]
    onnx_export.embed_metadata(model, meta)
    return onnx_export.save_onnx(model, out)


def _decoder_openvino(
    work: Path, proto, out: Path, meta: ArtifactMetadata, runtime_precision: str, options: dict
) -> list[Path]:
    from . import openvino_export as ovx

    meta.runtime_precision = runtime_precision  # the encoder's: the runtime compiles both with it
    model = ovx.convert_onnx(work)
    ovx.embed_metadata(model, meta)
    return ovx.save_ir(model, out, compress_to_fp16=meta.precision == "fp16")


def _decoder_tensorrt(
    work: Path, proto, out: Path, meta: ArtifactMetadata, runtime_precision: str, options: dict
) -> list[Path]:
    from espmed.runtimes import engine_header

    from . import tensorrt_export as trtx

    trtx.preflight(proto, dynamic=True)
    engine, info, plan = trtx.build_engine(
        work, meta.precision, profiles=trtx.box_profiles(), workspace_mb=options.get("workspace_mb"),
        timing_cache=options.get("timing_cache"),
    )
    meta.extra.update(info.to_extra())
    meta.extra["fp32_pinned_layers"] = len(plan)
    meta.float_layers = plan
    engine_header.write_engine(out, meta, engine)
    return [out]


#: A box export's prompt decoder, by backend: (FP32 ONNX path, its ModelProto, staged path, metadata,
#: runtime precision, options) -> the staged files. Float only (`Format.decoder_precision`).
_DECODERS = {"onnxruntime": _decoder_onnx, "openvino": _decoder_openvino, "tensorrt": _decoder_tensorrt}


#: Targets that wrap an exported artifact (a checkpoint is exported to ONNX first), by backend. A
#: wrapper is given `export` as `export_checkpoint`, so that its module need not import this one.
_WRAPPERS = {"triton": export_repository}
