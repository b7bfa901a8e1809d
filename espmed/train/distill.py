"""MMDKD: multi-modal decoupled knowledge distillation of the image encoder (trunk + neck).

Stage 1 distils the shared trunk and the neck from a SAM ViT teacher on all images (every image
runs through its own modality's controller, which stays frozen). Stage 2 distils one modality
controller at a time, with the trunk and the neck frozen (eval mode, so BatchNorm statistics do not
move either), usually from a medically adapted SAM teacher. Loss: MSE between the student's image
embedding and the teacher's, pooled to the student's grid. When the student's embedding width
differs from the teacher's (narrow presets), a 1x1 convolution adapter maps one onto the other; it
is trained with the student and discarded afterwards. Optimiser: Adam with exponential decay per
epoch (the release's distillation script: lr 5e-4, gamma 0.98).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.sources import Sample
from ..errors import EspmedError
from ..model import ESPMedSAM
from ..runtimes.preprocess import preprocess
from .engine import JsonlLog, autocast_dtype
from .teacher import TeacherEmbeddings


class EmbeddingAdapter(nn.Module):
    """Student embedding width -> teacher width (identity when they match)."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = nn.Identity() if student_dim == teacher_dim else nn.Conv2d(student_dim, teacher_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def student_embedding(model: ESPMedSAM, images: torch.Tensor, controller: int | torch.Tensor) -> torch.Tensor:
    """The image embedding (neck output) alone: distillation never runs SPPG or the decoder."""
    return model.neck(model.trunk(images, controller))


def _targets(samples: Sequence[Sample], model: ESPMedSAM, teacher: TeacherEmbeddings) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    grid = cfg.image_size // 16
    inputs, targets = [], []
    for s in samples:
        x, _ = preprocess(s.image, cfg.image_size, cfg.preprocessing.mean, cfg.preprocessing.std)
        emb = teacher(s.image)[None]
        emb = F.adaptive_avg_pool2d(emb, grid) if emb.shape[-1] >= grid else F.interpolate(emb, size=(grid, grid), mode="bilinear", align_corners=False)
        inputs.append(torch.from_numpy(x))
        targets.append(emb[0])
    return torch.stack(inputs), torch.stack(targets)


def _controllers(model: ESPMedSAM, samples: Sequence[Sample]) -> torch.Tensor:
    cfg = model.config
    out = []
    for s in samples:
        idx = cfg.modality_index(s.modality)
        ctrl = cfg.controller_map[idx]
        if ctrl < 0:
            raise EspmedError(f"sample {s.name}: the model has no controller for modality {s.modality!r}")
        out.append(ctrl)
    return torch.tensor(out, dtype=torch.long)


def _fit(
    model: ESPMedSAM,
    adapter: EmbeddingAdapter,
    params: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    controllers: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    gamma: float,
    amp: str,
    seed: int,
    log: JsonlLog,
    label: str,
    bar=None,
) -> list[float]:
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
    dtype = autocast_dtype(amp, device)
    epoch_losses = []
    task = bar.add_task(label, total=epochs) if bar else None
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ctrl = controllers[idx]
            c = int(ctrl[0]) if bool((ctrl == ctrl[0]).all()) else ctrl.to(device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                pred = adapter(student_embedding(model, inputs[idx].to(device), c))
            loss = F.mse_loss(pred.float(), targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        scheduler.step()
        epoch_losses.append(total / count)
        log.write({"event": "distill", "stage": label, "epoch": epoch, "mse": epoch_losses[-1], "lr": optimizer.param_groups[0]["lr"]})
        if bar:
            bar.update(task, advance=1, description=f"{label} mse {epoch_losses[-1]:.5f}")
    return epoch_losses


def distill(
    model: ESPMedSAM,
    samples: Sequence[Sample],
    stage1_teacher: TeacherEmbeddings | None,
    stage2_teacher: TeacherEmbeddings | None,
    stage1_epochs: int = 5,
    stage2_epochs: int = 5,
    batch_size: int = 4,
    lr: float = 5e-4,
    gamma: float = 0.98,
    amp: str = "auto",
    seed: int = 0,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
) -> dict:
    """Run stage 1 (when `stage1_teacher`) then stage 2 (when `stage2_teacher`); trains `model` in
    place. Returns MSE per epoch for each stage (`stage1`, `stage2/<controller>`) and cache stats.
    With `out_dir`, writes `distilled.safetensors` and `metrics.jsonl` there."""
    from ..model import save_checkpoint

    if not samples:
        raise EspmedError("distillation needs images: no samples given")
    torch.manual_seed(seed)
    log = JsonlLog(Path(out_dir) / "metrics.jsonl" if out_dir else None)
    controllers = _controllers(model, samples)
    result: dict = {"images": len(samples), "seconds": {}}
    bar_ctx = contextlib.nullcontext(None)
    if show_progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar_ctx = Progress(TextColumn("[bold]distill[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    device = next(model.parameters()).device
    stage1_adapter, stage1_targets_dim = None, -1
    with bar_ctx as bar:
        if stage1_teacher is not None:
            started = time.monotonic()
            inputs, targets = _targets(samples, model, stage1_teacher)
            adapter = stage1_adapter = EmbeddingAdapter(model.config.prompt_dim, targets.shape[1]).to(device)
            for p in model.parameters():
                p.requires_grad_(False)
            params = model.trunk_shared_parameters() + list(model.neck.parameters())
            for p in params:
                p.requires_grad_(True)
            model.train()
            result["stage1"] = _fit(model, adapter, params + list(adapter.parameters()), inputs, targets, controllers,
                                    stage1_epochs, batch_size, lr, gamma, amp, seed, log, "stage1", bar)
            stage1_targets_dim = targets.shape[1]
            result["seconds"]["stage1"] = round(time.monotonic() - started, 2)
        if stage2_teacher is not None:
            started = time.monotonic()
            inputs, targets = _targets(samples, model, stage2_teacher)
            model.eval()  # frozen trunk: BatchNorm uses (and keeps) its running statistics
            for ctrl in sorted(set(controllers.tolist())):
                mine = (controllers == ctrl).nonzero().flatten()
                for p in model.parameters():
                    p.requires_grad_(False)
                params = model.controller_parameters(ctrl)
                for p in params:
                    p.requires_grad_(True)
                adapter = EmbeddingAdapter(model.config.prompt_dim, targets.shape[1]).to(device)
                if stage1_adapter is not None and targets.shape[1] == stage1_targets_dim:
                    adapter.load_state_dict(stage1_adapter.state_dict())  # start where stage 1 ended
                names = [m for m, k in zip(model.config.modalities, model.config.controller_map) if k == ctrl]
                result[f"stage2/{ctrl}"] = _fit(
                    model, adapter, params + list(adapter.parameters()), inputs[mine], targets[mine], controllers[mine],
                    stage2_epochs, batch_size, lr, gamma, amp, seed, log, f"stage2 controller {ctrl} ({', '.join(names)})", bar,
                )
            result["seconds"]["stage2"] = round(time.monotonic() - started, 2)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    for name, t in (("stage1", stage1_teacher), ("stage2", stage2_teacher)):
        if t is not None:
            result[f"{name}_cache"] = {"hits": t.hits, "misses": t.misses}
    if out_dir is not None:
        save_checkpoint(model, Path(out_dir) / "distilled.safetensors", {"espmed.distill.stages": ",".join(
            s for s, t in (("1", stage1_teacher), ("2", stage2_teacher)) if t is not None)})
    return result

