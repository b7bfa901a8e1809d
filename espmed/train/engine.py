"""The training engine: AMP, gradient accumulation, LR schedules, exact resume, best-model export,
JSONL metrics and torchrun/DDP (gloo on CPU, NCCL on CUDA).

Run directory (`[train] out_dir`):
  model.safetensors            best model by mean validation Dice (native format)
  metrics.jsonl                one JSON object per optimizer step / validation
  checkpoints/step-NNNNNNN/    training state: model.safetensors (weights + config),
                               trainer_state.pt (optimizer, scheduler, RNG; `weights_only=True`),
                               state.json (epoch, step, best Dice: for people and tools)
  checkpoints/latest.json      the newest complete checkpoint (written last, atomically)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_path, write_text
from ..data import EpochSampler, SegmentationDataset, TrainItem
from ..data.sources import Sample
from ..errors import CheckpointError, EspmedError, TimeLimitError, first_line
from ..model import ESPMedSAM, get_preset, load_checkpoint, save_checkpoint
from .config import PARTS, RunConfig, TrainSettings
from .evaluate import mean_dice_by_modality
from .losses import SegmentationLoss


# -- distributed ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EspmedError("device 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CPU; on CUDA bf16 where supported, else fp16; None = full precision."""
    if amp == "none":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or device.type == "cpu":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# -- model ---------------------------------------------------------------------------------------
def build_model(cfg: RunConfig) -> ESPMedSAM:
    """The model a config describes, optionally initialised from a checkpoint or MobileSAM."""
    m = cfg.model
    try:
        model_cfg = get_preset(
            m.preset, image_size=m.image_size, modalities=tuple(m.modalities),
            controller_map=tuple(m.controller_map), num_queries=m.num_queries, **dict(m.overrides),
        )
    except (ValueError, TypeError) as exc:
        raise EspmedError(f"[model]: {exc}") from None
    model = ESPMedSAM(model_cfg)
    if m.init:
        src = load_checkpoint(_resolve(cfg, m.init))
        if src.config.with_(image_size=model_cfg.image_size) != model_cfg:
            raise CheckpointError(f"{m.init}: its model config differs from [model] (preset {src.config.preset})")
        model.load_state_dict(src.state_dict())
    if m.mobilesam:
        from .mobilesam import load_mobilesam_into

        load_mobilesam_into(model, _resolve(cfg, m.mobilesam))
    return model


def _resolve(cfg: RunConfig, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else cfg.base_dir / p


def part_parameters(model: ESPMedSAM, part: str) -> list[nn.Parameter]:
    if part == "trunk":
        return model.trunk_shared_parameters()
    if part == "controllers":
        return [p for bank in model.controller_banks() for p in bank.parameters()]
    return list(getattr(model, part).parameters())


def set_trainable(model: ESPMedSAM, parts: Sequence[str]) -> list[nn.Parameter]:
    """Freeze everything but `parts`; returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for part in parts:
        if part not in PARTS:
            raise EspmedError(f"unknown model part {part!r}; choose from {', '.join(PARTS)}")
        for p in part_parameters(model, part):
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise EspmedError("nothing to train: the trainable parts have no parameters")
    return params


def make_scheduler(
    optimizer: torch.optim.Optimizer, t: TrainSettings, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR factor: linear warmup, then cosine to `min_lr_ratio` or `gamma` per epoch."""
    total = max(1, t.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        if t.schedule == "exponential":
            return t.gamma ** (step / steps_per_epoch)
        progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- RNG -----------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors/lists (loadable with `weights_only=True`)."""
    np_state = np.random.get_state()
    state = {
        "python": _listify(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


# -- checkpoints ---------------------------------------------------------------------------------
@dataclass
class RunProgress:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_dice: float = -1.0
    best_step: int = -1


def save_training_state(
    run_dir: Path, model: ESPMedSAM, optimizer, scheduler, progress: RunProgress, keep: int = 2
) -> Path:
    """Write a complete training checkpoint, then point `latest.json` at it; prune old ones."""
    ckpt_root = run_dir / "checkpoints"
    folder = ckpt_root / f"step-{progress.global_step:07d}"
    save_checkpoint(model, folder / "model.safetensors")
    with atomic_path(folder / "trainer_state.pt") as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp)
    write_text(folder / "state.json", json.dumps(progress.__dict__, indent=2))
    write_text(ckpt_root / "latest.json", json.dumps({"checkpoint": folder.name, **progress.__dict__}, indent=2))
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p != folder)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return folder


def load_training_state(run_dir: Path, model: ESPMedSAM, optimizer, scheduler) -> RunProgress:
    """Restore model, optimizer, scheduler and RNG from `checkpoints/latest.json`."""
    latest = run_dir / "checkpoints" / "latest.json"
    if not latest.is_file():
        raise CheckpointError(f"{latest}: no training checkpoint to resume from")
    pointer = json.loads(latest.read_text())
    folder = latest.parent / pointer["checkpoint"]
    saved = load_checkpoint(folder / "model.safetensors")
    if saved.config != model.config:
        raise CheckpointError(f"{folder}: checkpoint model config differs from this run's model")
    model.load_state_dict(saved.state_dict())
    try:
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals and corrupt files raise assorted types
        raise CheckpointError(f"{folder / 'trainer_state.pt'}: cannot load ({first_line(exc)})") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    fields = RunProgress.__dataclass_fields__
    return RunProgress(**{k: v for k, v in pointer.items() if k in fields})


# -- trainer -------------------------------------------------------------------------------------
class JsonlLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


def train(
    cfg: RunConfig,
    train_items: Sequence[TrainItem],
    valid_samples: Sequence[Sample] = (),
    resume: bool = False,
    show_progress: bool = True,
    model: ESPMedSAM | None = None,
) -> dict:
    """Segmentation training (stage 3). Returns a summary dict (final step, best Dice, losses).

    Under torchrun each process trains on its shard of every global batch and DDP averages the
    gradients; rank 0 alone validates, writes checkpoints and logs. `[train] threads` applies for
    the run only: torch's thread count is restored afterwards.
    """
    previous = torch.get_num_threads()
    owns_group = not dist.is_initialized()
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        return _train(cfg, train_items, valid_samples, resume, show_progress, model)
    finally:
        torch.set_num_threads(previous)
        if owns_group and dist.is_initialized():  # leave a process group we created, as torchrun expects
            dist.destroy_process_group()


@dataclass
class _Run:
    """Everything one training run holds, built once by `_setup`."""

    cfg: RunConfig
    info: DistInfo
    device: torch.device
    model: ESPMedSAM
    net: nn.Module  # the model, or its DDP wrapper
    params: list[nn.Parameter]
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    criterion: SegmentationLoss
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    run_dir: Path
    log: JsonlLog
    progress: RunProgress
    total_steps: int

    def checkpoint(self) -> None:
        if self.info.is_main:
            save_training_state(self.run_dir, self.model, self.optimizer, self.scheduler, self.progress,
                                self.cfg.train.keep_checkpoints)
        _barrier(self.info)


def _train(cfg, train_items, valid_samples, resume, show_progress, model) -> dict:
    run = _setup(cfg, train_items, resume, model)
    started = time.monotonic()
    losses = _loop(run, valid_samples, show_progress, started)
    if not valid_samples and run.info.is_main:
        save_checkpoint(
            run.model, run.run_dir / "model.safetensors", {"espmed.train.step": str(run.progress.global_step)}
        )
    return {
        "steps": run.progress.global_step,
        "epochs_completed": run.progress.epoch,
        "best_valid_dice": run.progress.best_dice if valid_samples else None,
        "best_step": run.progress.best_step if valid_samples else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "seconds": round(time.monotonic() - started, 1),
        "world_size": run.info.world,
    }


def _setup(cfg: RunConfig, train_items, resume: bool, model: ESPMedSAM | None) -> _Run:
    t = cfg.train
    dev_kind = "cuda" if (t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())) else "cpu"
    info = init_distributed(dev_kind)
    device = resolve_device(t.device, info)
    seed_everything(t.seed)
    model = (model if model is not None else build_model(cfg)).to(device)
    params = set_trainable(model, t.trainable)
    mc = model.config
    dataset = SegmentationDataset(
        train_items, mc.modalities, mc.image_size, mc.preprocessing.mean, mc.preprocessing.std, mc.preprocessing.resize
    )
    sampler = EpochSampler(len(dataset), t.batch_size, t.grad_accum, info.world, info.rank, t.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers, drop_last=True,
        persistent_workers=False,
    )
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, t, sampler.steps_per_epoch)
    run_dir = Path(t.out_dir)
    progress = load_training_state(run_dir, model, optimizer, scheduler) if resume else RunProgress()
    net: nn.Module = model
    if info.world > 1:
        # A batch of one modality leaves the other controllers unused: DDP must be told.
        some_unused = mc.num_controllers > 1 or not mc.shared_hypernetwork
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=some_unused
        )
    amp_dtype = autocast_dtype(t.amp, device)
    if info.is_main:
        write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    total_steps = t.epochs * sampler.steps_per_epoch
    return _Run(
        cfg=cfg, info=info, device=device, model=model, net=net, params=params, sampler=sampler, loader=loader,
        optimizer=optimizer, scheduler=scheduler, criterion=SegmentationLoss(cfg.loss), amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), run_dir=run_dir,
        log=JsonlLog(run_dir / "metrics.jsonl" if info.is_main else None), progress=progress,
        total_steps=min(total_steps, t.max_steps) if t.max_steps else total_steps,
    )


def _progress_bar(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]train[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn())


def _loop(run: _Run, valid_samples, show_progress: bool, started: float) -> list[float]:
    """Optimizer steps until the step count is reached. The step count alone decides the model;
    `max_minutes` only guards: when it is hit the state is saved and `TimeLimitError` raised."""
    t, progress = run.cfg.train, run.progress
    eval_every = t.eval_every or run.sampler.steps_per_epoch
    ckpt_every = t.checkpoint_every or run.sampler.steps_per_epoch
    losses: list[float] = []
    with _progress_bar(show_progress and run.info.is_main) as bar:
        task = bar.add_task("", total=run.total_steps, completed=progress.global_step) if bar else None
        while progress.global_step < run.total_steps and progress.epoch < t.epochs:
            run.sampler.set_epoch(progress.epoch, progress.step_in_epoch)
            run.model.train()
            batches = iter(run.loader)
            while progress.step_in_epoch < run.sampler.steps_per_epoch and progress.global_step < run.total_steps:
                step_loss = _logged_step(run, batches, started)
                losses.append(step_loss)
                if bar:
                    description = f"epoch {progress.epoch + 1}/{t.epochs} loss {step_loss:.4f}"
                    bar.update(task, advance=1, description=description)
                epoch_done = progress.step_in_epoch == run.sampler.steps_per_epoch
                if epoch_done:
                    progress.epoch += 1
                    progress.step_in_epoch = 0
                out_of_time = bool(t.max_minutes) and time.monotonic() - started > 60 * t.max_minutes
                finished = progress.global_step >= run.total_steps
                if valid_samples and (progress.global_step % eval_every == 0 or finished):
                    _validate(run, valid_samples)
                if progress.global_step % ckpt_every == 0 or finished or out_of_time:
                    run.checkpoint()
                if out_of_time and not finished:
                    raise TimeLimitError(
                        f"time limit [train] max_minutes = {t.max_minutes:g} reached after step {progress.global_step} "
                        f"of {run.total_steps}; the state is saved in {run.run_dir / 'checkpoints'}: "
                        "continue with --resume (the model is not finished)"
                    )
                if epoch_done:
                    break
    return losses


def _logged_step(run: _Run, batches, started: float) -> float:
    step_loss, parts = _optimizer_step(run, batches)
    run.scheduler.step()
    run.progress.step_in_epoch += 1
    run.progress.global_step += 1
    run.log.write({"event": "step", "step": run.progress.global_step, "epoch": run.progress.epoch,
                   "lr": run.optimizer.param_groups[0]["lr"], "loss": step_loss, **parts,
                   "elapsed_s": round(time.monotonic() - started, 2)})
    return step_loss


def _optimizer_step(run: _Run, batches) -> tuple[float, dict[str, float]]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss, mean loss parts)."""
    net, optimizer, scaler, t, device = run.net, run.optimizer, run.scaler, run.cfg.train, run.device
    amp_dtype = run.amp_dtype
    total = 0.0
    parts_sum: dict[str, float] = {}
    for a in range(t.grad_accum):
        batch = next(batches)
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        modality = batch["modality"].to(device)
        sync = a == t.grad_accum - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
        with (contextlib.nullcontext() if sync else net.no_sync()):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = net(images, modality)
            loss, parts = run.criterion(out, masks)
            scaler.scale(loss / t.grad_accum).backward()
        total += float(loss.detach()) / t.grad_accum
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v / t.grad_accum
    if t.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, t.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if isinstance(net, nn.parallel.DistributedDataParallel):  # log the global-batch loss, not this rank's
        keys = sorted(parts_sum)
        values = torch.tensor([total] + [parts_sum[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        values /= dist.get_world_size()
        total, parts_sum = float(values[0]), {k: float(v) for k, v in zip(keys, values[1:], strict=True)}
    return total, parts_sum


def _validate(run: _Run, samples) -> None:
    """Mean validation Dice per modality; a better mean saves the best model (rank 0 only)."""
    model, progress, run_dir, log, info = run.model, run.progress, run.run_dir, run.log, run.info
    if info.is_main:
        per_modality = mean_dice_by_modality(model, samples, run.cfg.train.batch_size)
        mean = float(np.mean(list(per_modality.values())))
        improved = mean > progress.best_dice
        if improved:
            progress.best_dice, progress.best_step = mean, progress.global_step
            save_checkpoint(model, run_dir / "model.safetensors", {
                "espmed.train.step": str(progress.global_step),
                "espmed.train.valid_dice": json.dumps(per_modality),
            })
        log.write({
            "event": "valid", "step": progress.global_step, "dice": per_modality, "mean_dice": mean, "best": improved
        })
    if info.world > 1:
        best = [progress.best_dice, float(progress.best_step)]
        dist.broadcast_object_list(best, src=0)
        progress.best_dice, progress.best_step = best[0], int(best[1])


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()
