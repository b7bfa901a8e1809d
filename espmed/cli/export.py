"""`espmed export`: a checkpoint -> one deployable artifact (the exportable rows of `espmed.runtimes.formats`),
or with `--prompt box` the box-prompted pair, an image encoder and its prompt decoder."""

from __future__ import annotations

from pathlib import Path

import typer

from ..runtimes.formats import OPTION_DEFAULTS, PROMPTS, RUNTIME_PRECISIONS, export_options, exportable

_TARGET_NAMES = ", ".join(f.name for f in exportable())
_PROMPT_HELP = "; ".join(f"{p.name}, {p.label}" for p in PROMPTS)
_SELF_ONLY = ", ".join(f.name for f in exportable() if f.prompts == (PROMPTS[0].name,))


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        ctx: typer.Context,
        checkpoint: Path | None = typer.Option(
            None, "--checkpoint", "-c",
            help="Release .pth or native .safetensors checkpoint (default: the shipped model).",
        ),
        source: Path | None = typer.Option(
            None, "--from", help="triton only: an exported .onnx, .xml or .engine to serve (instead of --checkpoint).",
        ),
        target: str = typer.Option(..., "--target", "-t", help=f"One of: {_TARGET_NAMES}."),
        modality: str | None = typer.Option(
            None, "--modality", "-m",
            help="Modality to bake in (default: the model's first with a controller, in query order; "
            "the shipped model: microscopy; --prompt box: none, the shared trunk).",
        ),
        prompt: str = typer.Option(
            PROMPTS[0].name, "--prompt", help=f"What to export: {_PROMPT_HELP} ({_SELF_ONLY}: self only).",
        ),
        imgsz: int | None = typer.Option(
            None, "--imgsz", min=32, help="Input size (multiple of 32; default: the checkpoint's).",
        ),
        batch: int = typer.Option(1, "--batch", min=1, help="Fixed batch size."),
        dynamic: bool = typer.Option(False, "--dynamic", help="Dynamic batch size (instead of --batch)."),
        simplify: str = typer.Option("onnxsim", "--simplify", help="Graph simplifier: onnxsim, onnxslim or none."),
        opset: int = typer.Option(18, "--opset", min=17, help="ONNX opset."),
        calib: Path | None = typer.Option(
            None, "--calib",
            help="Folder of real images for INT8 calibration and the accuracy check (default: bundled samples).",
        ),
        max_drop: float = typer.Option(
            0.02, "--max-drop", min=0.0, max=0.99, help="Largest allowed per-image Dice drop vs FP32.",
        ),
        out: Path | None = typer.Option(None, "--out", "-o", help="Artifact file, or a folder for the default name."),
        runtime_precision: str | None = typer.Option(
            None, "--runtime-precision",
            help=f"OpenVINO only: {RUNTIME_PRECISIONS[0]} (default) or {' or '.join(RUNTIME_PRECISIONS[1:])} "
            "CPU inference precision to record.",
        ),
        recipe: str | None = typer.Option(
            None, "--recipe",
            help="INT8 only: float-layer recipe JSON (default: <checkpoint>.quantization.json if present; 'none').",
        ),
        smooth_quant_alpha: float | None = typer.Option(
            None, "--smooth-quant-alpha", help="openvino-int8 only: NNCF SmoothQuant alpha (default: recipe's/NNCF's).",
        ),
        accuracy_control: bool | None = typer.Option(
            None, "--accuracy-control",
            help="openvino-int8 only: let NNCF's accuracy-control loop pick float layers (metric: Dice vs FP32).",
        ),
        workspace_mb: int | None = typer.Option(
            None, "--workspace-mb", help="TensorRT only: workspace limit (default: chosen by TensorRT).",
        ),
        timing_cache: Path | None = typer.Option(
            None, "--timing-cache", help="TensorRT only: timing cache file to reuse and update.",
        ),
        max_batch: int | None = typer.Option(
            None, "--max-batch", help="TensorRT only: largest batch of a --dynamic engine "
            f"(default {OPTION_DEFAULTS['max_batch']}).",
        ),
        triton_max_batch: int | None = typer.Option(
            None, "--triton-max-batch", help="triton only: max_batch_size of the dynamic batcher "
            f"(default {OPTION_DEFAULTS['triton_max_batch']}).",
        ),
        instances: int | None = typer.Option(
            None, "--instances", help="triton only: model instances per server "
            f"(default {OPTION_DEFAULTS['instances']}).",
        ),
    ) -> None:
        """Export a checkpoint to ONNX, OpenVINO IR or a TensorRT engine, checked against the model; or
        wrap one (--from) in Triton model repositories (--target triton)."""
        from ..errors import EspmedError, require

        require("torch", "export")
        from ..export import export
        from .progress import Stages

        if checkpoint is None and source is None and target != "triton":
            from ..model import default_checkpoint

            checkpoint = default_checkpoint()
        if (checkpoint is None) == (source is None):
            raise EspmedError("give --checkpoint, or --from ARTIFACT for --target triton")
        if source is not None and target != "triton":
            raise EspmedError("--from wraps an exported artifact for --target triton; other targets take --checkpoint")

        # The table's export options, each a flag of this command named after it.
        options = {name: ctx.params[name] for name in export_options() if ctx.params[name] is not None}
        from ..export.targets import check_options, get_target

        check_options(get_target(target), options, spell=lambda name: "--" + name.replace("_", "-"))
        if runtime_precision not in (None, *RUNTIME_PRECISIONS):
            raise typer.BadParameter(" or ".join(RUNTIME_PRECISIONS), param_hint="--runtime-precision")
        with Stages() as stages:
            result = export(
                checkpoint or source, target, out, modality=modality, imgsz=imgsz, batch=batch, dynamic=dynamic,
                simplify=simplify, opset=opset, calib=calib, max_drop=max_drop, prompt=prompt, progress=stages,
                **options,
            )
        size = result.size_bytes / 1e6
        if result.artifact.is_dir():  # a Triton export: a folder of model repositories
            _print_triton(result, size)
            return
        others = f" (+ {', '.join(f.name for f in result.files[1:])})" if len(result.files) > 1 else ""
        typer.echo(f"artifact: {result.artifact}{others}  {size:.1f} MB  manifest: {result.manifest.name}")
        boxes = " --box X0,Y0,X1,Y1" if result.metadata.decoder else ""
        typer.echo(f"run it:   espmed predict IMAGE --model {result.artifact}{boxes} --out out/")


def _print_triton(result, size_mb: float) -> None:
    import json

    model = json.loads(result.manifest.read_text(encoding="utf-8"))["triton"]["model"]
    files = f"{len(result.files)} files, {size_mb:.1f} MB"
    typer.echo(f"repositories: {result.artifact}  {files}  manifest: {result.manifest.name}")
    typer.echo(f"serve it:     python -m espmed.runtimes.triton_server {result.artifact}   (CPU, loopback, port 8001)")
    typer.echo(f"run it:       espmed predict IMAGE --model triton://127.0.0.1:8001/{model} --out out/")
