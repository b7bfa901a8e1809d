"""`espmed bench`: every backend side by side (speed, memory, accuracy) in one table."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        checkpoint: Path | None = typer.Option(
            None, "--checkpoint", "-c",
            help="Release .pth or native .safetensors; default: the shipped model (espmed.model.default_checkpoint()).",
        ),
        random_weights: bool = typer.Option(
            False, "--random-weights",
            help="Seeded random weights of --preset instead of a checkpoint (accuracy columns: agreement with FP32).",
        ),
        modality: str | None = typer.Option(
            None, "--modality", "-m",
            help="Modality to export and run (default: the model's only one, else the one most masked in the data).",
        ),
        targets: str = typer.Option(
            "all", "--targets", "-t",
            help="'all' or a comma-separated list, e.g. onnx,openvino-int8 (torch is always run as the reference).",
        ),
        data: Path | None = typer.Option(
            None, "--data",
            help="Folder of images (masks/ or samples.json for ground truth); default: the bundled samples.",
        ),
        imgsz: int | None = typer.Option(
            None, "--imgsz", help="Input size (multiple of 32); default: the checkpoint's, or 1024.",
        ),
        runs: int = typer.Option(10, "--runs", help="Timed warm runs per backend."),
        warmup: int = typer.Option(2, "--warmup", help="Untimed warm-up runs per backend."),
        threads: int | None = typer.Option(None, "--threads", help="Threads per backend (default: all cores)."),
        batch: int = typer.Option(1, "--batch", help="Batch size for the throughput measurement."),
        max_drop: float | None = typer.Option(
            None, "--max-drop", help="Exit 1 if any backend's min Dice vs FP32 drops by more than this.",
        ),
        out: Path = typer.Option(Path("bench-results"), "--out", "-o", help="Folder for results and cached exports."),
        seed: int = typer.Option(0, "--seed", help="Seed of the --random-weights."),
        preset: str = typer.Option("esp-medsam", "--preset", help="Architecture of the --random-weights."),
        prompt: str = typer.Option(
            "self", "--prompt",
            help="self: self-prompted masks; box: box prompts, one per ground-truth component (encoder ms per "
                 "image, decoder ms per box, box Dice); --modality then picks a controller, default the shared trunk.",
        ),
    ) -> None:
        """Export and measure every backend this machine supports, each in a fresh process."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from ..errors import EspmedError, require

        require("torch", "export")
        from ..benchmark.harness import run_benchmark
        from ..benchmark.options import BenchOptions
        from ..benchmark.report import rich_table, write_all
        from ..model import default_checkpoint

        if random_weights and checkpoint is not None:
            raise EspmedError("give --checkpoint or --random-weights, not both")
        if not random_weights and checkpoint is None:
            checkpoint = default_checkpoint()
        opts = BenchOptions(
            checkpoint=checkpoint, modality=modality, targets=targets, data=data, imgsz=imgsz, runs=runs,
            warmup=warmup, threads=threads, batch=batch, max_drop=max_drop, out=out, seed=seed, preset=preset,
            prompt=prompt,
        )
        console = Console()
        if not console.is_terminal:  # logs and pipes: keep the table's rows on one line each
            console = Console(width=200)
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), _estimate_column())
        with Progress(*columns, console=console) as progress:
            def log(text: str) -> None:
                progress.console.print(text, highlight=False)

            report = run_benchmark(opts, log=log, progress=progress)
        console.print(rich_table(report))
        files = write_all(report, out)
        console.print("wrote " + ", ".join(str(p) for p in files.values()), highlight=False)
        failures = report.drop_failures(max_drop)
        if failures:
            typer.echo("error: accuracy drop over --max-drop " + f"{max_drop}: " + "; ".join(failures), err=True)
            raise typer.Exit(1)


def _estimate_column():
    """A progress column: the current stage's estimated time left, counting down, and the whole run's
    (`espmed.benchmark.eta.describe` of the fields the harness sets on its task)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    from ..benchmark.eta import describe

    class EstimateColumn(ProgressColumn):
        def render(self, task) -> Text:
            f = task.fields
            return Text(describe(
                stage_s=f.get("stage_s"), elapsed_s=task.get_time() - f.get("stage_start", 0.0),
                after_s=f.get("after_s"), unknown_after=f.get("unknown_after", False),
            ), style="progress.remaining")

    return EstimateColumn()
