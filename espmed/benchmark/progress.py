"""The run's progress: one task whose fields carry each stage's estimate (`eta.py`'s cost model,
fed with what this run knows: the FLOPs, the GEMM peak, its settings and the exports cached)."""

from __future__ import annotations

from pathlib import Path

from ..errors import EspmedError
from ..runtimes.formats import Format, format_named
from . import eta
from .exports import cached_export
from .launch import COLD_STARTS
from .model_prep import BenchModel
from .options import BenchOptions, unavailable_reason


class Tracker:
    """One rich progress task of `total` steps whose fields carry the current stage's estimate
    (`stage_s`, counted from `stage_start`) and the later stages' (`after_s`, `unknown_after`), which
    the CLI counts down. Without a progress it only keeps the estimator."""

    def __init__(self, progress, *, total: int) -> None:
        self.progress = progress
        self.estimator: eta.Estimator | None = None
        self.task = None if progress is None else progress.add_task("benchmark", total=total, **self._fields(None))

    def _fields(self, stage_s: float | None) -> dict:
        after_s, unknown = self.estimator.remaining() if self.estimator else (None, False)
        start = self.progress.get_time() if self.progress is not None else 0.0
        return {"stage_s": stage_s, "stage_start": start, "after_s": after_s, "unknown_after": unknown}

    def step(self, text: str, advance: int = 1, *, stage_s: float | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=advance, description=text, **self._fields(stage_s))

    def begin(self, stage: eta.Stage, text: str, advance: int = 1) -> None:
        """`stage` starts: show its estimate; an export found cached says so."""
        if stage.kind == "export" and self.estimator.is_cached(stage.target):
            text += " (cached)"
        self.step(text, advance, stage_s=self.estimator.begin(stage))


def stages(row: Format, host: dict, prompt: str) -> list[eta.Stage]:
    """The stages a row will run: its export (none for the reference) and its measurement."""
    if unavailable_reason(row, host, prompt):
        return []
    target = row.export_target
    cold_starts = COLD_STARTS if row.backend == "openvino" else 0
    measure = eta.Stage(row.name, "measure", target=target, cold_starts=cold_starts)
    if target is None:
        return [measure]
    return [eta.Stage(row.name, "export", target=target, calibrated=format_named(target).calibrated), measure]


def estimator(
    opts: BenchOptions, rows: list[Format], host: dict, *,
    model: BenchModel, images: int, gemm: dict, gemm_s: float, out: Path,
) -> eta.Estimator:
    """The run's cost model: F from the FLOPs and the GEMM peak, the run's settings, the exports cached."""
    all_stages = [stage for row in rows for stage in stages(row, host, opts.prompt)]
    targets = {s.target for s in all_stages if s.kind == "export"}
    cached = {t for t in targets if cached_export(t, model, opts, out) is not None}
    calibrating = any(s.calibrated and s.target not in cached for s in all_stages)
    calib, held, attempts = _calibration_work(model.calibration) if calibrating else (0, 0, 0)
    work = eta.Workload(
        images=images, warmup=opts.warmup, runs=opts.runs, batch=opts.batch,
        calib_images=calib, gated_images=held, attempts=attempts,
    )
    forward_s = eta.forward_from_flops(model.gflops, gemm["gflops"])
    return eta.Estimator(all_stages, forward_s=forward_s, work=work, cached=cached, tail_s=gemm_s)


def _calibration_work(data: str | None) -> tuple[int, int, int]:
    """(calibration images, held-out images, INT8 attempts at most) of an INT8 export from `data`:
    the exporter's own split (read at a tiny size), its fallback levels and a recipe's attempt."""
    from espmed.export.calibration import load_calibration
    from espmed.export.quantize import FLOAT_LEVELS

    try:
        images = load_calibration(data, 32, 0.0, 1.0)
    except EspmedError:  # the export will fail and say why
        return 0, 0, 0
    return len(images.calibration), len(images.held_out), len(FLOAT_LEVELS) + 1
