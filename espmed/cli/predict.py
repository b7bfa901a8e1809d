"""`espmed predict`: segment image files, folders and DICOM series with an artifact or checkpoint.

A file that cannot be read or segmented is reported and skipped; the others continue, and the
exit code is 1 when any failed. Every output is written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import typer

FORMATS = ("auto", "png", "nifti", "dicom-seg")


@dataclass
class Job:
    """One thing to segment: a file, or the instances of one DICOM series."""

    label: Path
    paths: list[Path]
    series: bool = False


@dataclass
class Outcome:
    label: Path
    frames: int = 0
    foreground: float = 0.0  # fraction of mask pixels over all frames
    infer_ms: float = 0.0  # mean graph time per frame
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    warning: str | None = None  # segmented, but written in another form than asked (one line)


def collect_jobs(inputs: list[Path]) -> tuple[list[Job], list[Outcome], list[Path]]:
    """(jobs, missing inputs, ignored files): files as given; folders walked recursively (files
    of unsupported types ignored), DICOM instances grouped into series."""
    from ..io import is_supported
    from ..io.dicom import DICOM_SUFFIXES, group_series, is_dicom_file

    jobs: list[Job] = []
    missing: list[Outcome] = []
    ignored: list[Path] = []
    for item in inputs:
        if item.is_file():
            jobs.append(Job(item, [item]))
            continue
        if not item.is_dir():
            missing.append(Outcome(item, error="no such file or folder"))
            continue
        files = sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
        dicom = [p for p in files if p.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(p)]
        dicom_set = set(dicom)
        series, singles = group_series(dicom)
        singles += [paths[0] for paths in series.values() if len(paths) == 1]  # named after its file
        series = {uid: paths for uid, paths in series.items() if len(paths) > 1}
        for uid, paths in series.items():
            folder = paths[0].parent
            label = folder / f"series-{uid}" if len(series) > 1 else folder
            jobs.append(Job(label, paths, series=True))
        jobs.extend(Job(p, [p]) for p in singles)
        for p in files:
            if p in dicom_set:
                continue
            if is_supported(p):
                jobs.append(Job(p, [p]))
            else:
                ignored.append(p)
    return jobs, missing, ignored


def output_format(requested: str, kind: str) -> str:
    from ..errors import ImageReadError

    if requested == "auto":
        return {"raster": "png", "nifti": "nifti", "dicom": "dicom-seg"}[kind]
    if requested == "nifti" and kind != "nifti":
        raise ImageReadError("--format nifti needs a NIfTI input (its affine and header are reused)")
    if requested == "dicom-seg" and kind != "dicom":
        raise ImageReadError("--format dicom-seg needs a DICOM input (the SEG references its instances)")
    return requested


def unique_name(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate


def segment_job(job: Job, seg, out: Path, *, fmt: str, want_overlay: bool, axis: int, used: set[str]) -> Outcome:
    """Read, segment and write one job; raises EspmedError on a bad input."""
    import numpy as np

    from ..io import read_dicom_series, read_image, write_mask_png, write_nifti_mask, write_overlay_png
    from ..io.dicom import dicom_results, save_dicom
    from ..runtimes.preprocess import to_rgb_uint8

    image = read_dicom_series(job.paths, job.label) if job.series else read_image(job.paths[0], axis)
    fmt = output_format(fmt, image.kind)
    predictions = seg.predict_batch(image.frames)
    masks = [p.mask for p in predictions]
    name = unique_name(image.path.name if job.series else image.name, used)
    outputs: list[Path] = []
    warning = None
    many = len(masks) > 1
    if fmt == "png":
        for i, mask in enumerate(masks):
            outputs.append(write_mask_png(out / f"{name}{f'_{i:04d}' if many else ''}_mask.png", mask))
    elif fmt == "nifti":
        outputs.append(write_nifti_mask(out / f"{name}_mask.nii.gz", image, masks))
    else:
        datasets, warning = dicom_results(image.source, image.frames, masks, modality_name=seg.modality)
        if warning is None:
            outputs.append(save_dicom(out / f"{name}_seg.dcm", datasets[0]))
        else:
            outputs.extend(save_dicom(out / f"{name}_{i:04d}_overlay_sc.dcm", ds) for i, ds in enumerate(datasets))
    if want_overlay:
        for i, (frame, mask) in enumerate(zip(image.frames, masks, strict=True)):
            overlay_path = out / f"{name}{f'_{i:04d}' if many else ''}_overlay.png"
            outputs.append(write_overlay_png(overlay_path, to_rgb_uint8(frame), mask))
    pixels = sum(m.size for m in masks)
    return Outcome(
        label=job.label,
        frames=len(masks),
        foreground=float(sum(int(np.count_nonzero(m)) for m in masks) / pixels),
        infer_ms=float(np.mean([p.timings["infer"] for p in predictions])),
        outputs=outputs,
        warning=warning,
    )


def describe_runtime(seg) -> str:
    """The target, the backend where it is not the target's name, and an OpenVINO precision other
    than f32: `openvino`, `onnx-int8 on onnxruntime`, `openvino, bf16`."""
    target = seg.metadata.target
    text = target if target == seg.backend else f"{target} on {seg.backend}"
    precision = getattr(seg, "precision", "f32")
    return text if precision == "f32" else f"{text}, {precision}"


def print_summary(console, outcomes: list[Outcome], out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"espmed predict -> {out}")
    columns = (("input", "left"), ("frames", "right"), ("mask %", "right"), ("ms/frame", "right"),
               ("outputs", "right"), ("status", "left"))
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for o in outcomes:
        if o.error:
            table.add_row(o.label.name, "", "", "", "", "[red]failed[/red]")
        else:
            table.add_row(o.label.name, str(o.frames), f"{100 * o.foreground:.1f}", f"{o.infer_ms:.1f}",
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
    ) -> None:
        """Segment medical images with an exported artifact (or a checkpoint)."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..errors import EspmedError, first_line
        from ..runtimes import load

        if fmt not in FORMATS:
            raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
        console = Console(stderr=True)
        seg = load(model, device=device, threads=threads, precision=precision, verify=not no_verify,
                   modality=modality, image_size=imgsz)
        console.print(f"model: {seg.source.name} ({describe_runtime(seg)}, modality {seg.modality}, "
                      f"{seg.input_size} px)", soft_wrap=True, highlight=False)
        jobs, outcomes, ignored = collect_jobs(list(inputs))
        if ignored:
            console.print(f"ignoring {len(ignored)} file(s) that are not images (e.g. {ignored[0]})", highlight=False)
        if not jobs and not outcomes:
            raise EspmedError("no supported images found in the inputs")
        out.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("segmenting", total=len(jobs))
            for job in jobs:
                progress.update(task, description=f"segmenting {job.label.name}")
                try:
                    outcomes.append(segment_job(job, seg, out, fmt=fmt, want_overlay=overlay, axis=axis, used=used))
                except (EspmedError, ValueError, OSError) as exc:  # a bad input: report, go on
                    outcomes.append(Outcome(job.label, error=first_line(exc)))
                progress.advance(task)
        print_summary(Console(), outcomes, out)
        if any(o.error for o in outcomes):
            raise typer.Exit(1)
