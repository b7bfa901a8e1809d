"""MMDKD: multi-modal decoupled knowledge distillation of the image encoder (trunk + neck).

Stage 1 distils the shared trunk and the neck from a teacher on all images (every image runs
through its own modality's controller, which stays frozen). Stage 2 distils one modality
controller at a time, with the trunk and the neck frozen (eval mode, so BatchNorm statistics do not
move either). Teachers (`espmed.train.teacher`): LiteMedSAM, which sees the image at a quarter of
the student's size, or a SAM ViT at 1024²; their embeddings are pooled to the student's grid when
they differ.

Loss: MSE between the student's image embedding and the teacher's, plus `cosine_weight` x (1 -
per-position cosine), both over the grid positions the image covers (letterbox padding excluded),
averaged per image. When the student's embedding width differs from the teacher's (narrow presets),
a 1x1 convolution adapter maps one onto the other; it is trained with the student and discarded
afterwards. Optimiser: Adam with exponential decay per epoch (the release's distillation script:
lr 5e-4, gamma 0.98). Autocast bf16 on CPUs with bf16 instructions (`amp="auto"`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.sources import Sample
from ..errors import EspmedError
from ..model import ESPMedSAM
from ..runtimes.preprocess import Letterbox, patch_region, preprocess
from .engine import JsonlLog, autocast_dtype
from .teacher import TeacherEmbeddings


class EmbeddingAdapter(nn.Module):
    """Student embedding width -> teacher width (identity when they match)."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = nn.Identity() if student_dim == teacher_dim else nn.Conv2d(student_dim, teacher_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# -- the measure -----------------------------------------------------------------------------------
def valid_grid(box: Letterbox, grid: int) -> torch.Tensor:
    """(grid, grid) bool: the embedding positions that cover the image, not its zero padding
    (the rule `patch_region` applies to the SPPG grid)."""
    rows, cols = patch_region(np.empty((grid, grid)), box).shape
    valid = torch.zeros(grid, grid, dtype=torch.bool)
    valid[:rows, :cols] = True
    return valid


def embedding_cosine(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) per-image mean over the `valid` (B, h, w) positions of the cosine between the (B, D, h, w)
    embeddings' channel vectors."""
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=1)
    v = valid.to(cos.dtype)
    return (cos * v).sum(dim=(1, 2)) / v.sum(dim=(1, 2))


def embedding_loss(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, cosine_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mse, cosine), each a batch mean of per-image values over the valid positions."""
    v = valid.to(torch.float32)
    sq = (student.float() - teacher.float()).pow(2).mean(dim=1)
    mse = ((sq * v).sum(dim=(1, 2)) / v.sum(dim=(1, 2))).mean()
    cosine = embedding_cosine(student, teacher, valid).mean()
    return mse + cosine_weight * (1.0 - cosine), mse, cosine


def distill_autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """`autocast_dtype`, except that `auto` on a CPU without bf16 instructions runs in fp32
    (emulated bf16 is slower than fp32 there)."""
    if amp == "auto" and device.type == "cpu":
        from ..machine import cpu_info

        if not cpu_info()["bf16"]:
            return None
    return autocast_dtype(amp, device)


# -- data ------------------------------------------------------------------------------------------
@dataclass
class _Targets:
    """Everything one stage trains on, in sample order."""

    inputs: torch.Tensor  # (N, 3, S, S) student inputs
    targets: torch.Tensor  # (N, D_teacher, S/16, S/16) teacher embeddings on the student's grid
    valid: torch.Tensor  # (N, S/16, S/16) bool, positions that cover the image
    modalities: torch.Tensor  # (N,) modality index
    controllers: torch.Tensor  # (N,) controller index

    def subset(self, idx: torch.Tensor) -> _Targets:
        return _Targets(
            self.inputs[idx], self.targets[idx], self.valid[idx], self.modalities[idx], self.controllers[idx]
        )


def _targets(samples: Sequence[Sample], model: ESPMedSAM, teacher: TeacherEmbeddings) -> _Targets:
    cfg = model.config
    pre = cfg.preprocessing
    grid = cfg.image_size // 16
    inputs, targets, valid = [], [], []
    for s in samples:
        x, box = preprocess(s.image, cfg.image_size, pre.mean, pre.std, pre.resize)
        emb = teacher(s.image)[None]
        if emb.shape[-1] > grid:
            emb = F.adaptive_avg_pool2d(emb, grid)
        elif emb.shape[-1] < grid:
            emb = F.interpolate(emb, size=(grid, grid), mode="bilinear", align_corners=False)
        inputs.append(torch.from_numpy(x))
        targets.append(emb[0])
        valid.append(valid_grid(box, grid))
    modalities, controllers = _indices(model, samples)
    return _Targets(torch.stack(inputs), torch.stack(targets), torch.stack(valid), modalities, controllers)


def _indices(model: ESPMedSAM, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(modality, controller) index per sample; every sample's modality must have a controller."""
    cfg = model.config
    modalities, controllers = [], []
    for s in samples:
        idx = cfg.modality_index(s.modality)
        if cfg.controller_map[idx] < 0:
            raise EspmedError(f"sample {s.name}: the model has no controller for modality {s.modality!r}")
        modalities.append(idx)
        controllers.append(cfg.controller_map[idx])
    return torch.tensor(modalities, dtype=torch.long), torch.tensor(controllers, dtype=torch.long)


# -- one stage -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitSettings:
    epochs: int
    batch_size: int
    lr: float
    gamma: float
    cosine_weight: float
    amp: str
    seed: int


def _fit(
    *,
    model: ESPMedSAM,
    adapter: EmbeddingAdapter,
    params: list[nn.Parameter],
    data: _Targets,
    settings: FitSettings,
    log: JsonlLog,
    label: str,
    bar=None,
) -> dict[str, list[float]]:
    """Train `params` on `data`; returns the per-epoch means {"loss", "mse", "cosine"}."""
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, settings.gamma)
    dtype = distill_autocast_dtype(settings.amp, device)
    history: dict[str, list[float]] = {"loss": [], "mse": [], "cosine": []}
    task = bar.add_task(label, total=settings.epochs) if bar else None
    n = len(data.inputs)
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 7919 + epoch))
        sums = dict.fromkeys(history, 0.0)
        for start in range(0, n, settings.batch_size):
            batch = data.subset(order[start : start + settings.batch_size])
            mods = batch.modalities
            modality = int(mods[0]) if bool((mods == mods[0]).all()) else mods.to(device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                pred = adapter(model.embed(batch.inputs.to(device), modality))
            loss, mse, cosine = embedding_loss(
                pred, batch.targets.to(device), batch.valid.to(device), settings.cosine_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in (("loss", loss), ("mse", mse), ("cosine", cosine)):
                sums[k] += float(v.detach()) * len(mods)
        scheduler.step()
        for k in history:
            history[k].append(sums[k] / n)
        log.write({"event": "distill", "stage": label, "epoch": epoch, **{k: v[-1] for k, v in history.items()},
                   "lr": optimizer.param_groups[0]["lr"]})
        if bar:
            loss, cos = history["loss"][-1], history["cosine"][-1]
            bar.update(task, advance=1, description=f"{label} loss {loss:.5f} cosine {cos:.4f}")
    return history


def _train_only(model: ESPMedSAM, params: list[nn.Parameter]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def _record(result: dict, name: str, history: dict[str, list[float]]) -> None:
    result[name] = history["loss"]
    result[f"{name}_mse"] = history["mse"]
    result[f"{name}_cosine"] = history["cosine"]


def distill(
    model: ESPMedSAM,
    samples: Sequence[Sample],
    *,
    stage1_teacher: TeacherEmbeddings | None = None,
    stage2_teacher: TeacherEmbeddings | None = None,
    stage1_epochs: int = 5,
    stage2_epochs: int = 5,
    batch_size: int = 4,
    lr: float = 5e-4,
    gamma: float = 0.98,
    cosine_weight: float = 0.0,
    amp: str = "auto",
    seed: int = 0,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
) -> dict:
    """Run stage 1 (when `stage1_teacher`) then stage 2 (when `stage2_teacher`); trains `model` in
    place. Returns the loss per epoch for each stage (`stage1`, `stage2/<controller>`; with `_mse`
    and `_cosine` companions), the teachers and cache stats. With `out_dir`, writes
    `distilled.safetensors` and `metrics.jsonl` there."""
    from ..model import save_checkpoint

    if not samples:
        raise EspmedError("distillation needs images: no samples given")
    torch.manual_seed(seed)
    log = JsonlLog(Path(out_dir) / "metrics.jsonl" if out_dir else None)
    _indices(model, samples)  # every modality has a controller, before any teacher runs
    fit = dict(batch_size=batch_size, lr=lr, gamma=gamma, cosine_weight=cosine_weight, amp=amp, seed=seed)
    result: dict = {"images": len(samples), "seconds": {}, "teachers": {}}
    bar_ctx = contextlib.nullcontext(None)
    if show_progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar_ctx = Progress(
            TextColumn("[bold]distill[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
    device = next(model.parameters()).device
    stage1_adapter, stage1_dim = None, -1
    with bar_ctx as bar:
        if stage1_teacher is not None:
            started = time.monotonic()
            data = _targets(samples, model, stage1_teacher)
            stage1_dim = data.targets.shape[1]
            adapter = stage1_adapter = EmbeddingAdapter(model.config.prompt_dim, stage1_dim).to(device)
            params = model.trunk_shared_parameters() + list(model.neck.parameters())
            _train_only(model, params)
            model.train()
            _record(result, "stage1", _fit(
                model=model, adapter=adapter, params=params + list(adapter.parameters()), data=data,
                settings=FitSettings(epochs=stage1_epochs, **fit), log=log, label="stage1", bar=bar,
            ))
            result["teachers"]["stage1"] = stage1_teacher.describe()
            result["seconds"]["stage1"] = round(time.monotonic() - started, 2)
        if stage2_teacher is not None:
            started = time.monotonic()
            data = _targets(samples, model, stage2_teacher)
            model.eval()  # frozen trunk: BatchNorm uses (and keeps) its running statistics
            for ctrl in sorted(set(data.controllers.tolist())):
                params = model.controller_parameters(ctrl)
                _train_only(model, params)
                adapter = EmbeddingAdapter(model.config.prompt_dim, data.targets.shape[1]).to(device)
                if stage1_adapter is not None and stage1_dim == data.targets.shape[1]:
                    adapter.load_state_dict(stage1_adapter.state_dict())  # start where stage 1 ended
                cfg = model.config
                names = [m for m, k in zip(cfg.modalities, cfg.controller_map, strict=True) if k == ctrl]
                _record(result, f"stage2/{ctrl}", _fit(
                    model=model, adapter=adapter, params=params + list(adapter.parameters()),
                    data=data.subset((data.controllers == ctrl).nonzero().flatten()),
                    settings=FitSettings(epochs=stage2_epochs, **fit), log=log,
                    label=f"stage2 controller {ctrl} ({', '.join(names)})", bar=bar,
                ))
            result["teachers"]["stage2"] = stage2_teacher.describe()
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
