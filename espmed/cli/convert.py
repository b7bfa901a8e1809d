"""`espmed convert`: release `.pth` file(s) -> one native safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def convert(
        release: list[str] = typer.Option(
            ..., "--release", "-r",
            help="MODALITY=FILE.pth (repeat to merge one controller per modality), or FILE.pth alone.",
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Native checkpoint to write (.safetensors)."),
        imgsz: int | None = typer.Option(None, "--imgsz", help="Input size to record (default 1024)."),
    ) -> None:
        """Convert the authors' release checkpoint(s) to espmed's native format."""
        from ..errors import CheckpointError, require

        require("torch", "torch")
        from ..model import load_release_checkpoint, merge_release_checkpoints, save_checkpoint

        pairs = [r.split("=", 1) if "=" in r else (None, r) for r in release]
        if len(pairs) == 1:
            modality, path = pairs[0]
            model = load_release_checkpoint(path, modality, imgsz)
        else:
            if any(m is None for m, _ in pairs):
                raise CheckpointError("to merge several release files, give each as MODALITY=FILE")
            model = merge_release_checkpoints({m: p for m, p in pairs}, imgsz)
        save_checkpoint(model, out)
        controllers = ", ".join(model.available_modalities)
        typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; controllers for {controllers})")
