"""`espmed predict`: options and the summary; the work is `espmed.pipeline`'s.

A file that cannot be read or segmented is reported and skipped; the others continue, and the
exit code is 1 when any failed. Every output is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import typer


def describe_runtime(seg) -> str:
    """The target, the backend where it is not the target's name, and an OpenVINO precision other
    than f32: `openvino`, `onnx-int8 on onnxruntime`, `openvino, bf16`."""
    target = seg.metadata.target
    text = target if target == seg.backend else f"{target} on {seg.backend}"
    precision = getattr(seg, "precision", "f32")
    return text if precision == "f32" else f"{text}, {precision}"


def _trunk(modality: str) -> str:
    from ..runtimes.metadata import SHARED_TRUNK

    return "the shared trunk (no modality controller)" if modality == SHARED_TRUNK else f"the {modality} controller"


def print_summary(console, outcomes: list, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"espmed predict -> {out}")
    boxes = any(o.boxes for o in outcomes)  # the column only where boxes were segmented
    columns = (("input", "left"), ("frames", "right"), *((("boxes", "right"),) if boxes else ()),
               ("mask %", "right"), ("ms/frame", "right"), ("outputs", "right"), ("status", "left"))
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for o in outcomes:
        count = (str(o.boxes or ""),) if boxes else ()
        if o.error:
            table.add_row(o.label.name, "", *("",) * len(count), "", "", "", "[red]failed[/red]")
        else:
            table.add_row(o.label.name, str(o.frames), *count, f"{100 * o.foreground:.1f}", f"{o.infer_ms:.1f}",
                          str(len(o.outputs)), "[green]ok[/green]")
    console.print(table)
    for o in outcomes:
        if o.warning:
            console.print(f"[yellow]warning[/yellow] {o.label}: {o.warning}", soft_wrap=True, highlight=False)
    failed = [o for o in outcomes if o.error]
    for o in failed:
        message = o.error if o.error.startswith(str(o.label)) else f"{o.label}: {o.error}"
        console.print(f"[red]failed[/red] {message}", soft_wrap=True, highlight=False)
    console.print(f"{len(outcomes) - len(failed)} segmented, {len(failed)} failed; outputs in {out}", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command()
    def predict(
        inputs: list[Path] = typer.Argument(
            ..., help="Image files, folders (walked recursively) or DICOM series folders."
        ),
        model: str = typer.Option(
            ..., "--model", "-m",
            help="Artifact (.onnx, .xml, .engine), checkpoint (.safetensors, .pth) or triton://HOST:PORT/MODEL.",
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
        fmt: str = typer.Option(
            "auto", "--format", "-f",
            help="png | nifti | dicom-seg | auto (png for images, nifti for NIfTI, dicom-seg for DICOM).",
        ),
        overlay: bool = typer.Option(False, "--overlay", help="Also write the mask contour over each image as PNG."),
        device: str = typer.Option(
            "CPU", "--device", help="CPU, GPU/CUDA, TensorRT (ONNX Runtime) or AUTO (OpenVINO)."
        ),
        threads: int | None = typer.Option(None, "--threads", min=1, help="Backend intra-op threads."),
        precision: str | None = typer.Option(
            None, "--precision", help="OpenVINO inference precision: f32 (default) or bf16/f16."
        ),
        modality: str | None = typer.Option(
            None, "--modality",
            help="Checkpoints with several controllers: which modality to run (default: the first, in query order).",
        ),
        axis: int = typer.Option(2, "--axis", min=0, max=2, help="NIfTI volumes: the axis to slice along."),
        imgsz: int | None = typer.Option(
            None, "--imgsz", help="Checkpoints only: input size to run at (multiple of 32)."
        ),
        no_verify: bool = typer.Option(False, "--no-verify", help="Skip the artifact manifest hash check."),
        box: list[str] = typer.Option(
            [], "--box",
            help="Box prompt x0,y0,x1,y1 in the image's pixels (x = column, 0-based, x1/y1 inclusive); repeatable; "
                 "one image input only.",
        ),
        boxes_file: Path | None = typer.Option(
            None, "--boxes", help='Box prompts per input: JSON {"<input path or file name>": [[x0, y0, x1, y1], ...]}.'
        ),
    ) -> None:
        """Segment medical images with an exported artifact (or a checkpoint)."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..errors import EspmedError
        from ..io.npz import is_npz
        from ..pipeline import FORMATS, PredictOptions, check_prompts, collect_jobs, model_hash, prompt_boxes, run_job
        from ..runtimes import load

        if fmt not in FORMATS:
            raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
        console = Console(stderr=True)
        jobs, outcomes, ignored = collect_jobs(list(inputs))
        if not jobs and not outcomes:
            raise EspmedError("no supported images found in the inputs")
        boxes = prompt_boxes(list(inputs), jobs, box, boxes_file)  # before the model loads: a bad box fails fast
        seg = load(model, device=device, threads=threads, precision=precision, verify=not no_verify,
                   modality=modality, image_size=imgsz)
        prompted = bool(boxes) or any(is_npz(job.label) for job in jobs)
        runs = f"boxes on {_trunk(seg.box_modality)}" if prompted else f"modality {seg.modality}"
        console.print(f"model: {seg.source.name} ({describe_runtime(seg)}, {runs}, {seg.input_size} px)",
                      soft_wrap=True, highlight=False)
        if ignored:
            console.print(f"ignoring {len(ignored)} file(s) that are not images (e.g. {ignored[0]})", highlight=False)
        check_prompts(seg, jobs, boxes)
        out.mkdir(parents=True, exist_ok=True)
        opts = PredictOptions(out, fmt=fmt, overlay=overlay, axis=axis, model_hash=model_hash(seg.source, seg.metadata),
                              boxes=boxes)
        used: set[str] = set()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("segmenting", total=len(jobs))
            for job in jobs:
                progress.update(task, description=f"segmenting {job.label.name}")
                outcomes.append(run_job(job, seg, opts, used))
                progress.advance(task)
        print_summary(Console(), outcomes, out)
        if any(o.error for o in outcomes):
            raise typer.Exit(1)
