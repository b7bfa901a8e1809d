"""`espmed info`: what a checkpoint (or preset) holds, its size and its cost."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def model_info(
    checkpoint: Path | None = None, preset: str | None = None, image_size: int | None = None
) -> dict:
    """Parameters per part, GFLOPs, modalities, input size and preprocessing, as a dict: of
    `checkpoint`, else of `preset`'s architecture (random weights), else of the shipped model."""
    from ..errors import EspmedError, require

    require("torch", "torch")
    from ..atomic import file_sha256
    from ..model import ESPMedSAM, default_checkpoint, get_preset, load_checkpoint
    from ..model.summary import count_flops, parameter_table

    if checkpoint is not None and preset is not None:
        raise EspmedError("give --checkpoint or --preset, not both")
    if checkpoint is None and preset is None:
        checkpoint = default_checkpoint()
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, image_size=image_size)
    else:
        cfg = get_preset(preset)
        model = ESPMedSAM(cfg.with_(image_size=image_size) if image_size else cfg)
    cfg = model.config
    return {
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
        "preset": cfg.preset,
        "input_size": cfg.image_size,
        "modalities": list(cfg.modalities),
        "modalities_with_controller": list(model.available_modalities),
        "controllers": cfg.num_controllers,
        "parameters": parameter_table(model),
        "gflops": round(count_flops(model) / 1e9, 2),
        "preprocessing": cfg.preprocessing.to_dict(),
    }


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        checkpoint: Path | None = typer.Option(None, "--checkpoint", "-c", help="Release .pth or native .safetensors."),
        preset: str | None = typer.Option(
            None, help="Describe this preset's architecture (random weights) instead of a checkpoint."
        ),
        imgsz: int | None = typer.Option(None, "--imgsz", help="Input size (multiple of 32)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Parameters per part, GFLOPs, modalities, input size and preprocessing of a model (default: the
        shipped one)."""
        data = model_info(checkpoint, preset, imgsz)
        if as_json:
            typer.echo(json.dumps(data, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"ESP-MedSAM ({data['preset']}, {data['input_size']}x{data['input_size']})")
        table.add_column("part")
        table.add_column("parameters", justify="right")
        for part, n in data["parameters"].items():
            table.add_row(part, f"{n:,}", style="bold" if part == "total" else None)
        console = Console()
        console.print(table)
        pre = data["preprocessing"]
        console.print(f"GFLOPs per image: {data['gflops']:.1f}")
        console.print(f"modalities (query order): {', '.join(data['modalities'])}")
        console.print(f"controllers for: {', '.join(data['modalities_with_controller'])}")
        console.print(
            f"preprocessing: RGB 0-255, (x - mean) / std, mean={pre['mean']}, std={pre['std']}, "
            f"resize {pre['resize']}, pad {pre['pad']}; mask = logit >= {pre['mask_threshold']}"
        )
