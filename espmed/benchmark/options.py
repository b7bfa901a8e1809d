"""What a benchmark run is asked for (`espmed bench`'s options) and which rows it measures."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import EspmedError
from ..runtimes.formats import FORMATS, Format, reference
from ..runtimes.formats import PROMPTS as PROMPT_KINDS

REFERENCE = reference().name
DEFAULT_RUNS = 10
DEFAULT_WARMUP = 2
DEFAULT_WORKER_TIMEOUT_S = 1800
#: What the rows segment (`--prompt`, the format table's graph kinds): self-prompted masks, or box
#: prompts (one box per ground-truth connected component, the encoder timed per image, the decoder per box).
PROMPTS = tuple(p.name for p in PROMPT_KINDS)


@dataclass
class BenchOptions:
    """The CLI's flags, checked once here so that a bad one fails before any work."""

    checkpoint: Path | None = None
    modality: str | None = None
    targets: str = "all"
    data: Path | None = None
    imgsz: int | None = None
    runs: int = DEFAULT_RUNS
    warmup: int = DEFAULT_WARMUP
    threads: int | None = None
    batch: int = 1
    max_drop: float | None = None
    out: Path = Path("bench-results")
    seed: int = 0
    preset: str = "esp-medsam"
    worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S
    prompt: str = PROMPTS[0]

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise EspmedError(f"--prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")
        for name in ("runs", "batch"):
            if getattr(self, name) < 1:
                raise EspmedError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise EspmedError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise EspmedError(f"--threads must be >= 1, got {self.threads}")
        if self.imgsz is not None and (self.imgsz <= 0 or self.imgsz % 32):
            raise EspmedError(f"--imgsz must be a positive multiple of 32, got {self.imgsz}")
        if self.max_drop is not None and not 0.0 <= self.max_drop <= 1.0:
            raise EspmedError(f"--max-drop must be between 0 and 1, got {self.max_drop}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise EspmedError(f"{self.checkpoint}: no such checkpoint file")


def select_rows(spec: str) -> list[Format]:
    """`all` or a comma-separated list of format names; the torch reference is always included."""
    names = [f.name for f in FORMATS]
    if spec.strip().lower() == "all":
        return list(FORMATS)
    wanted = [t.strip().lower() for t in spec.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in names]
    if unknown:
        raise EspmedError(f"unknown target(s) {', '.join(unknown)}; choose from all, {', '.join(names)}")
    return [f for f in FORMATS if f.name == REFERENCE or f.name in wanted]


def unavailable_reason(row: Format, host: dict, prompt: str = PROMPTS[0]) -> str | None:
    """Why `row` cannot run on this machine (or cannot run `prompt`), or None."""
    if prompt not in row.prompts:
        return f"runs --prompt {' or '.join(row.prompts)} only"
    if row.needs_gpu and not host["nvidia_gpu"]:
        return "needs an NVIDIA GPU with TensorRT; none on this machine"
    if row.runtime_precision == "bf16" and not host["cpu"]["bf16"]:
        return "CPU has no native BF16 (avx512_bf16 / amx_bf16)"
    if importlib.util.find_spec(row.module) is None:
        return f"{row.module} is not installed"
    if row.backend == "triton":  # measured through a local server started for it
        from ..runtimes.triton_server import missing

        return missing()
    return None


def row_record(row: Format) -> dict:
    """The row's facts as bench.json lists them, before its measurements."""
    return {
        "name": row.name, "label": row.label, "backend": row.backend, "precision": row.precision,
        "export_target": row.export_target, "runtime_precision": row.runtime_precision, "needs_gpu": row.needs_gpu,
        "status": "ok", "reason": None,
    }
