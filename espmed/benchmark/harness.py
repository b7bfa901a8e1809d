"""`espmed bench`: every backend measured side by side, each in a fresh process, on the same images.

Order of work: machine facts and the measured GEMM peak; the model (`model_prep`: a checkpoint, or
seeded randomised weights); one export per target (`exports`: cached in `--out` while the checkpoint
hash and the options match); then per backend a worker process (`launch`, `worker`) that measures
cold start, warm latency, throughput, peak RSS and writes every image's logits; finally accuracy
against the torch eager FP32 reference measured in the same run, and the derived ratios (`metrics`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import machine
from ..errors import EspmedError, first_line
from ..runtimes.formats import Format
from ..runtimes.metadata import SHARED_TRUNK
from . import eta
from .data import Sample, list_samples
from .exports import Export, artifact_files, calibration_dir, export_artifact
from .launch import COLD_STARTS, cached_cold_starts, run_worker, served
from .metrics import add_accuracy, add_ratios
from .model_prep import BenchModel, prepare_model
from .options import REFERENCE, BenchOptions, row_record, select_rows, unavailable_reason
from .progress import Tracker, estimator, stages
from .report import BenchReport
from .versions import library_versions

RANDOM_WEIGHTS_NOTE = (
    "--random-weights: seeded random weights, so the accuracy columns measure agreement with "
    "torch FP32, not clinical accuracy"
)


def run_benchmark(opts: BenchOptions, log: Callable[[str], None] = print, progress=None) -> BenchReport:
    """Measure every selected backend; write nothing but the work files (see `report.write_all`)."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = opts.threads or _usable_cores()
    samples = list_samples(opts.data)
    rows = select_rows(opts.targets)
    host, versions = machine.machine_info(), library_versions()
    track = Tracker(progress, total=2 + 2 * len(rows))

    track.step(f"GEMM peak ({threads} threads)", 0)
    t = time.perf_counter()
    gemm = machine.gemm_peak_gflops(threads)
    gemm_s = time.perf_counter() - t
    track.step("model")
    model, samples, notes = _model_and_samples(opts, samples, out=out, log=log)
    track.estimator = estimator(opts, rows, host, model=model, images=len(samples), gemm=gemm, gemm_s=gemm_s, out=out)
    total_s, unknown = track.estimator.remaining()
    log(f"estimated time left: ~{eta.duration(total_s)}" + (" + the rows without an estimate" if unknown else ""))
    track.step("exports")
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    run = _Run(
        opts=opts, out=out, work=work, threads=threads, model=model, samples=[s.to_dict() for s in samples],
        track=track,
    )
    results = [_measure_row(run, row, host) for row in rows]

    track.estimator.tail_s = 0.0
    track.step("GEMM peak again, accuracy", 0, stage_s=gemm_s)
    gemm = _best_gemm(gemm, machine.gemm_peak_gflops(threads))
    add_accuracy(results, model, samples, work)
    notes += _busy_notes(results, threads)
    add_ratios(results, model, gemm)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    options["threads"] = threads
    options["data"] = str(opts.data) if opts.data else "bundled samples (espmed/assets/samples)"
    return BenchReport(results, model, host, versions, gemm, options, notes)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _model_and_samples(
    opts: BenchOptions, samples: list[Sample], *, out: Path, log: Callable[[str], None]
) -> tuple[BenchModel, list[Sample], list[str]]:
    """The model facts, the samples it is judged on and the report's opening notes."""
    model = prepare_model(opts, samples, out=out, log=log)
    calib = calibration_dir(opts, model.modality, out)
    model.calibration = None if calib is None else str(calib)
    if opts.prompt == "box":  # boxes come from ground truth, of any modality
        samples = [s for s in samples if s.mask]
        if not samples:
            raise EspmedError("--prompt box puts one box around each ground-truth component: the data has no masks")
    elif opts.checkpoint is not None and any(s.modality == model.modality for s in samples):
        # A trained model is judged on images of its modality; random weights on every image.
        samples = [s for s in samples if s.modality in (model.modality, None)]
    model.images = [s.name for s in samples]
    notes = [RANDOM_WEIGHTS_NOTE] if opts.checkpoint is None else []
    if notes:
        log(notes[0])
    return model, samples, notes


@dataclass
class _Run:
    """What the rows of one benchmark run share; `exports` caches one export per target."""

    opts: BenchOptions
    out: Path
    work: Path
    threads: int
    model: BenchModel
    samples: list[dict]  # Sample.to_dict() of the images measured
    track: Tracker
    exports: dict[str, Export | Exception] = field(default_factory=dict)

    def worker(self, spec: dict) -> dict:
        return run_worker(spec, self.work, self.opts.worker_timeout_s, self.threads)


def _measure_row(run: _Run, row: Format, host: dict) -> dict:
    """One row's record: unavailable, export failed, or measured by a worker process."""
    rec = row_record(row) | {"prompt": run.opts.prompt}
    reason = unavailable_reason(row, host, run.opts.prompt)
    if reason:
        rec.update(status="unavailable", reason=reason)
        run.track.step(f"{row.name}: unavailable", 2, stage_s=0.0)
        return rec
    *export, measure = stages(row, host, run.opts.prompt)
    est = run.track.estimator
    fresh = row.export_target not in run.exports
    if export:
        run.track.begin(export[0], f"{row.name}: export", 0)
    got = _row_artifact(run, row)
    if isinstance(got, Exception):
        est.export_failed(row.export_target)
        rec.update(status="failed", reason=f"export failed: {_one_line(got)}", detail=str(got))
        run.track.step(f"{row.name}: export failed", 2, stage_s=0.0)
        return rec
    if export:
        est.exported(export[0], got.seconds if fresh and not got.reused else None)
    files = artifact_files(got.artifact)
    rec.update(
        artifact=str(got.artifact),
        artifact_mb=sum(f.stat().st_size for f in files if f.is_file()) / 1e6,
        export_s=got.seconds,
        export_reused=got.reused,
    )
    run.track.begin(measure, f"{row.name}: measure")
    try:
        with served(row, got.artifact) as where:
            spec = _worker_spec(run, row, where)
            measured = run.worker(spec)
    except EspmedError as exc:
        rec.update(status="failed", reason=f"server failed: {_one_line(exc)}")
        run.track.step(f"{row.name}: server failed", stage_s=0.0)
        return rec
    measured.pop("traceback", None)
    rec.update(measured)
    if rec["status"] == "ok" and row.name == REFERENCE:
        est.measured_reference(rec["latency_ms"]["p50"] / 1e3)
    if rec["status"] == "ok" and row.backend == "openvino":  # what is left of the stage: its measured cold start, twice
        run.track.step(f"{row.name}: cold starts", 0, stage_s=COLD_STARTS * rec["cold_start_s"])
        rec.update(cached_cold_starts(spec, run.out / "ov_cache" / row.name, run.worker))
    run.track.step(f"{row.name}: done", stage_s=0.0)
    return rec


def _row_artifact(run: _Run, row: Format) -> Export | Exception:
    """The row's export, or the exception its export raised; the reference runs the checkpoint."""
    target = row.export_target
    if target is None:
        return Export(Path(run.model.checkpoint), True, None)
    if target not in run.exports:
        try:
            run.exports[target] = export_artifact(target, run.model, run.opts, run.out)
        except Exception as exc:  # noqa: BLE001 - a failed export is that row's status
            run.exports[target] = exc
    return run.exports[target]


def _worker_spec(run: _Run, row: Format, artifact: Path | str) -> dict:
    return {
        "name": row.name,
        "mode": "full",
        "artifact": str(artifact),
        "threads": run.threads,
        "precision": row.runtime_precision,
        "modality": None if run.model.modality == SHARED_TRUNK else run.model.modality,
        "image_size": run.model.image_size if row.export_target is None else None,
        "samples": run.samples,
        "warmup": run.opts.warmup,
        "runs": run.opts.runs,
        "batch": run.opts.batch,
        "logits": str(run.work / f"{row.name}.logits.npz"),
        "prompt": run.opts.prompt,
    }


def _best_gemm(before: dict, after: dict) -> dict:
    """The GEMM peak is the best of a measurement before and after the backends, so that a
    neighbour's load during one of them does not deflate it."""
    return {**max(before, after, key=lambda g: g["gflops"]), "measurements": [before["gflops"], after["gflops"]]}


def _busy_notes(results: list[dict], threads: int) -> list[str]:
    busiest = max((r.get("load_average", 0.0) for r in results), default=0.0)
    if busiest <= threads + 0.5:
        return []
    return [
        f"warning: the machine was busy (1-min load average up to {busiest:.1f} with {threads} threads "
        "benchmarked): other processes competed for the cores, so timings and ratios are unreliable; "
        "rerun on a quiet machine"
    ]


def _one_line(exc: Exception) -> str:
    """The first line of an error (the full text goes to the JSON `detail`)."""
    more = " (details in bench.json)" if len([line for line in str(exc).splitlines() if line.strip()]) > 1 else ""
    if isinstance(exc, EspmedError) and str(exc).strip():
        return first_line(exc).rstrip(":") + more
    return first_line(exc, with_type=True).rstrip(":") + more
