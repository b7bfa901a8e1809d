"""Run configuration: one TOML file (stdlib `tomllib`), overridable by CLI flags.

    [model]   preset, image_size, modalities, controller_map, num_queries, init (checkpoint),
              mobilesam (MobileSAM checkpoint to initialise the trunk + neck)
    [train]   optimisation settings (see `TrainSettings`)
    [loss]    mask/patch loss weights (see `LossWeights`)
    [[data.train]], [[data.valid]], [[data.test]]   dataset tables (see `espmed.data.specs`)
    [distill] teacher settings for `espmed distill` (see `DistillSettings`)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..errors import ConfigError, first_line

PARTS = ("trunk", "controllers", "neck", "sppg", "decoder")


@dataclass(frozen=True)
class ModelSettings:
    preset: str = "esp-medsam-tiny"
    image_size: int = 256
    modalities: tuple[str, ...] = ("brain-mri", "microscopy")
    controller_map: tuple[int, ...] = (0, 1)
    num_queries: int = 3
    overrides: Mapping[str, Any] = field(default_factory=dict)  # any other ModelConfig field
    init: str | None = None  # native/release checkpoint to start from
    mobilesam: str | None = None  # MobileSAM checkpoint: trunk + neck initialisation


@dataclass(frozen=True)
class TrainSettings:
    out_dir: str = "runs/train"
    epochs: int = 10
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # "cosine" | "exponential" | "constant"
    gamma: float = 0.98  # exponential: lr factor per epoch
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of lr
    amp: str = "auto"  # "auto" (bf16 on CPU, bf16/fp16 on CUDA) | "bf16" | "fp16" | "none"
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    seed: int = 0
    num_workers: int = 0
    trainable: tuple[str, ...] = PARTS
    eval_every: int = 0  # optimizer steps between validations; 0 = once per epoch
    checkpoint_every: int = 0  # optimizer steps between training-state checkpoints; 0 = per epoch
    keep_checkpoints: int = 2
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = run all epochs)
    # A guard, never the length: once this much wall time is spent the state is saved and the run
    # fails (TimeLimitError; --resume continues). The step count alone decides the model. 0 = none.
    max_minutes: float = 0.0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads per process; 0 = torch default (1 is fastest on a busy CPU)


@dataclass(frozen=True)
class LossWeights:
    dice: float = 1.0
    focal: float = 1.0  # focal (gamma 2) on the final mask; set bce instead for plain BCE
    bce: float = 0.0
    patch: float = 1.0  # SPPG: BCE of patch logits vs the max-pooled ground truth


@dataclass(frozen=True)
class DistillSettings:
    teacher: str = "litemedsam"  # "litemedsam" (input: student size / 4) or "sam" (input 1024)
    teacher_checkpoint: str | None = None  # the teacher's file; litemedsam: the installed package's asset
    cosine_weight: float = 0.0  # loss = MSE + cosine_weight * (1 - cosine), over the unpadded grid
    cache_dir: str = "runs/teacher-cache"
    stage1_epochs: int = 5
    stage2_epochs: int = 5
    lr: float = 5e-4
    gamma: float = 0.98  # exponential decay per epoch, as the release's distillation script


@dataclass(frozen=True)
class RunConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    loss: LossWeights = field(default_factory=LossWeights)
    distill: DistillSettings = field(default_factory=DistillSettings)
    data: Mapping[str, list[dict]] = field(default_factory=dict)
    base_dir: Path = Path(".")  # folder of the config file: relative dataset paths start here

    def with_train(self, **changes) -> RunConfig:
        train = _build(TrainSettings, {**dataclasses.asdict(self.train), **changes}, "train")
        return dataclasses.replace(self, train=train)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["base_dir"] = str(self.base_dir)
        return d


def _build(cls, values: Mapping[str, Any], section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"[{section}]: unknown keys {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if f.type in ("int", "float") and not isinstance(v, (int, float)):
            raise ConfigError(f"[{section}] {f.name}: expected a number, got {v!r}")
    return obj


def _validate(cfg: RunConfig) -> RunConfig:
    t = cfg.train
    if t.schedule not in ("cosine", "exponential", "constant"):
        raise ConfigError(f"[train] schedule must be cosine, exponential or constant, got {t.schedule!r}")
    if t.amp not in ("auto", "bf16", "fp16", "none"):
        raise ConfigError(f"[train] amp must be auto, bf16, fp16 or none, got {t.amp!r}")
    bad = set(t.trainable) - set(PARTS)
    if bad:
        raise ConfigError(f"[train] trainable: unknown parts {sorted(bad)}; choose from {', '.join(PARTS)}")
    if t.batch_size < 1 or t.grad_accum < 1 or t.epochs < 1:
        raise ConfigError("[train] batch_size, grad_accum and epochs must be >= 1")
    if not t.lr > 0:
        raise ConfigError("[train] lr must be > 0")
    for split in cfg.data:
        if split not in ("train", "valid", "test"):
            raise ConfigError(f"[data]: unknown split {split!r}; use [[data.train]], [[data.valid]], [[data.test]]")
    return cfg


def _model_value(name: str, value: Any) -> Any:
    """A [model] override as ModelConfig holds it: lists as tuples, `[model.preprocessing]` as a
    `Preprocessing` (e.g. mean = [0, 0, 0], std = [255, 255, 255] for LiteMedSAM-initialised models)."""
    if name == "preprocessing" and isinstance(value, Mapping):
        from ..model import Preprocessing
        from ..runtimes.preprocess import RESIZE_MODES

        try:
            pre = Preprocessing.from_dict(dict(value))
        except (KeyError, TypeError, ValueError) as exc:
            detail = first_line(exc)
            raise ConfigError(f"[model.preprocessing]: {detail} (it needs mean and std, 3 numbers each)") from None
        if pre.resize not in RESIZE_MODES:
            modes = ", ".join(RESIZE_MODES)
            raise ConfigError(f"[model.preprocessing]: resize must be one of {modes}, got {pre.resize!r}")
        return pre
    return tuple(value) if isinstance(value, list) else value


def parse_config(raw: Mapping[str, Any], base_dir: Path = Path(".")) -> RunConfig:
    """A RunConfig from a parsed TOML/dict."""
    unknown = set(raw) - {"model", "train", "loss", "distill", "data"}
    if unknown:
        raise ConfigError(f"unknown config sections {sorted(unknown)}")
    m = dict(raw.get("model", {}))
    known = {f.name for f in dataclasses.fields(ModelSettings)} - {"overrides"}
    model = ModelSettings(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in m.items() if k in known},
        overrides={k: _model_value(k, v) for k, v in m.items() if k not in known},
    )
    data = {k: [dict(t) for t in v] for k, v in dict(raw.get("data", {})).items()}
    try:
        cfg = RunConfig(
            model=model,
            train=_build(TrainSettings, raw.get("train", {}), "train"),
            loss=_build(LossWeights, raw.get("loss", {}), "loss"),
            distill=_build(DistillSettings, raw.get("distill", {}), "distill"),
            data=data,
            base_dir=base_dir,
        )
    except TypeError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    return _validate(cfg)


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML run config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    try:
        return parse_config(raw, path.parent.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
