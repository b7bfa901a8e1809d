"""`espmed bench`: every backend measured side by side, each in a fresh process, on the same images.

Order of work: machine facts and the measured GEMM peak; the model (a checkpoint, or seeded
randomised weights); one export per target (cached in `--out` while the checkpoint hash and the
options match); then per backend a worker process (`espmed.benchmark.worker`) that measures cold
start, warm latency, throughput, peak RSS and writes every image's logits; finally accuracy
against the torch eager FP32 reference measured in the same run, and the derived ratios.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..atomic import file_sha256, write_text
from ..errors import EspmedError, first_line
from ..io import read_frame, read_mask
from ..runtimes.formats import FORMATS, Format, format_named, reference
from . import eta, machine
from .data import Sample, list_samples
from .metrics import agreement, ground_truth_scores

if TYPE_CHECKING:
    from ..model import ESPMedSAM, ModelConfig

REFERENCE = reference().name
DEFAULT_RUNS = 10
DEFAULT_WARMUP = 2
DEFAULT_WORKER_TIMEOUT_S = 1800
RANDOM_WEIGHTS_NOTE = (
    "--random-weights: seeded random weights, so the accuracy columns measure agreement with "
    "torch FP32, not clinical accuracy"
)


@dataclass
class BenchOptions:
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

    def __post_init__(self) -> None:
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


def unavailable_reason(row: Format, host: dict) -> str | None:
    """Why `row` cannot run on this machine, or None."""
    if row.needs_gpu and not host["nvidia_gpu"]:
        return "needs an NVIDIA GPU with TensorRT; none on this machine"
    if row.runtime_precision == "bf16" and not host["cpu"]["bf16"]:
        return "CPU has no native BF16 (avx512_bf16 / amx_bf16)"
    import importlib.util

    if importlib.util.find_spec(row.module) is None:
        return f"{row.module} is not installed"
    if row.backend == "triton":  # measured through a local server started for it
        from ..runtimes.triton_server import missing

        return missing()
    return None


def _row_record(row: Format) -> dict:
    """The row's facts as bench.json lists them, before its measurements."""
    return {
        "name": row.name, "label": row.label, "backend": row.backend, "precision": row.precision,
        "export_target": row.export_target, "runtime_precision": row.runtime_precision, "needs_gpu": row.needs_gpu,
        "status": "ok", "reason": None,
    }


# -- model ------------------------------------------------------------------------------------------


def modality_with_most_masks(available: tuple[str, ...], samples: list[Sample]) -> str:
    """Of several modalities, the one with the most ground-truth masks (then images) in `samples`;
    the first one when the data has none of them."""
    score = {
        m: (sum(1 for s in samples if s.modality == m and s.mask), sum(1 for s in samples if s.modality == m))
        for m in available
    }
    best = max(available, key=lambda m: score[m])
    return best if score[best] > (0, 0) else available[0]


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def prepare_model(opts: BenchOptions, samples: list[Sample], *, out: Path, log: Callable[[str], None]) -> dict:
    """Load the checkpoint, or make (or reuse) the seeded random weights; returns the model facts.

    The modality is `--modality`, or the model's only one; of several, the one the data has most
    masks for (the export's default, the first in query order, when the data has none).
    """
    from espmed.export.graph import choose_modality

    from ..atomic import file_sha256
    from ..model import ESPMedSAM, get_preset, load_checkpoint
    from ..model.summary import count_flops

    def pick(available: tuple[str, ...]) -> str:
        return modality_with_most_masks(available, samples)

    if opts.checkpoint is not None:
        model = load_checkpoint(opts.checkpoint, image_size=opts.imgsz)
        modality = choose_modality(model, opts.modality, pick=pick)
        path, weights = Path(opts.checkpoint), {"kind": "checkpoint"}
    else:
        cfg = get_preset(opts.preset, image_size=opts.imgsz) if opts.imgsz else get_preset(opts.preset)
        modality = choose_modality(ESPMedSAM(cfg), opts.modality, pick=pick)  # what random weights of cfg serve
        model, path, weights = _random_weights(cfg, opts=opts, modality=modality, samples=samples, out=out, log=log)
    cfg = model.config
    return {
        "checkpoint": str(path),
        "checkpoint_sha256": file_sha256(path),
        "checkpoint_mb": path.stat().st_size / 1e6,
        "weights": weights,
        "preset": cfg.preset,
        "image_size": cfg.image_size,
        "modality": modality,
        "modalities": list(cfg.modalities),
        "gflops": count_flops(model, cfg.image_size, modality) / 1e9,
        "threshold": cfg.preprocessing.mask_threshold,
    }


def _random_weights(
    cfg: ModelConfig, *, opts: BenchOptions, modality: str, samples: list[Sample], out: Path, log: Callable[[str], None]
) -> tuple[ESPMedSAM, Path, dict]:
    """(model, checkpoint path, weights record): seeded random weights for `cfg`, reused from
    `out/weights` when made before for the same preset, size, seed, modality and images."""
    import torch

    from ..model import load_checkpoint, save_checkpoint
    from ..runtimes.preprocess import preprocess
    from .weights import SCHEME, random_model

    pre = cfg.preprocessing
    key = {
        "preset": cfg.preset, "image_size": cfg.image_size, "seed": opts.seed, "modality": modality,
        "images": [hashlib.sha256(Path(s.image).read_bytes()).hexdigest() for s in samples],
        "espmed": __version__,
        "scheme": SCHEME,
    }
    tag = _sha256_text(json.dumps(key, sort_keys=True))[:12]
    path = out / "weights" / f"random-{cfg.preset}-{cfg.image_size}-seed{opts.seed}-{tag}.safetensors"
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file():
        model = load_checkpoint(path)
        log(f"reusing random weights {path}")
        return model, path, json.loads(record_path.read_text(encoding="utf-8"))
    log(f"making seeded random weights (seed {opts.seed}) at {cfg.image_size}x{cfg.image_size}")
    images = [preprocess(read_frame(s.image), cfg.image_size, pre.mean, pre.std, pre.resize)[0] for s in samples]
    model, placement = random_model(cfg, opts.seed, torch.from_numpy(np.stack(images)), modality)
    save_checkpoint(model, path, metadata={"espmed.bench.random_weights": json.dumps(key, sort_keys=True)})
    weights = {"kind": "random", "key": key, **placement}
    write_text(record_path, json.dumps(weights, indent=2))
    return model, path, weights


# -- exports ----------------------------------------------------------------------------------------


def _calib_sha(data: Path | None) -> str:
    from espmed.export.calibration import set_files
    from espmed.export.manifest import files_sha256

    return files_sha256(set_files(data))


def calibration_dir(opts: BenchOptions, model: dict, out: Path) -> Path | None:
    """Where INT8 exports calibrate and gate: `--data` as given, except that a trained checkpoint on
    an indexed folder (the bundled samples) uses only the images of its modality (copied into
    `out/calibration/<modality>/`): another modality's images through this controller say nothing
    about its masks, and an INT8 gate on them refuses what the modality's own images accept."""
    if opts.checkpoint is None:
        return opts.data
    folder = Path(opts.data) if opts.data is not None else None
    if folder is not None and not (folder / "samples.json").is_file():
        return opts.data
    ours = [s for s in list_samples(folder) if s.modality == model["modality"]]
    if not ours:
        return opts.data
    dest = out / "calibration" / model["modality"]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for s in ours:
        shutil.copyfile(s.image, dest / Path(s.image).name)
    return dest


def _export_key(target: str, model: dict, opts: BenchOptions) -> dict:
    """What a cached export of `target` must have been made from."""
    from .machine import library_versions

    calibrated = format_named(target).calibrated
    return {
        "target": target,
        "checkpoint_sha256": model["checkpoint_sha256"],
        "image_size": model["image_size"],
        "modality": model["modality"],
        "batch": opts.batch,
        "dynamic": opts.batch > 1,
        "calibration_sha256": _calib_sha(model["calibration"]) if calibrated else None,
        "recipe_sha256": _recipe_sha(model["checkpoint"]) if calibrated else None,
        "int8_gate_max_drop": opts.max_drop if calibrated else None,
        "versions": library_versions(),
        "exporter_source_sha256": _exporter_source_sha256(),
    }


def _recipe_sha(checkpoint: str | Path) -> str | None:
    """The float-layer recipe an INT8 export of `checkpoint` reads (beside it), so that a re-ranked
    recipe is not answered with an artifact quantized by the old one."""
    from espmed.export.recipe import recipe_beside

    recipe = recipe_beside(Path(checkpoint))
    return file_sha256(recipe) if recipe.is_file() else None


def _cached(record_path: Path, key: dict) -> tuple[Path, bool, float] | None:
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            artifact = Path(record["artifact"])
            if record["key"] == key and _still_valid(artifact):
                return artifact, True, record["export_s"]
        except (ValueError, KeyError, EspmedError):
            pass
    return None


def cached_export(target: str, model: dict, opts: BenchOptions, out: Path) -> tuple[Path, bool, float] | None:
    """(artifact, True, seconds it took) of the cached export of `target` in `out`, or None."""
    return _cached(out / "artifacts" / target / "bench-export.json", _export_key(target, model, opts))


def export_artifact(target: str, model: dict, opts: BenchOptions, out: Path) -> tuple[Path, bool, float]:
    """(artifact, reused, seconds): the cached export of `target` when its record matches, else a new one."""
    from espmed.export import export

    dest = out / "artifacts" / target
    record_path = dest / "bench-export.json"
    key = _export_key(target, model, opts)
    found = _cached(record_path, key)
    if found is not None:
        return found
    gate = {"max_drop": opts.max_drop} if opts.max_drop is not None and opts.max_drop < 1.0 else {}
    t = time.perf_counter()
    with _quiet_root_logger():  # ONNX Runtime's quantizer logs advice at WARNING on the root logger
        result = export(
            Path(model["checkpoint"]),
            target,
            dest,
            modality=model["modality"],
            imgsz=model["image_size"],
            batch=1,
            dynamic=opts.batch > 1,
            calib=model["calibration"],
            **gate,
        )
    seconds = time.perf_counter() - t
    write_text(record_path, json.dumps({"key": key, "artifact": str(result.artifact), "export_s": seconds}, indent=2))
    return Path(result.artifact), False, seconds


def _still_valid(artifact: Path) -> bool:
    """A cached export still matches its manifest (a folder: the Triton repositories' manifest)."""
    from espmed.runtimes.manifest import verify_manifest
    from espmed.runtimes.triton_repository import verify_repository

    if artifact.is_dir():
        return bool(verify_repository(artifact))
    return artifact.is_file() and verify_manifest(artifact) is not None


def _exporter_source_sha256() -> str:
    """Identity of the export code itself: a changed exporter must not reuse old artifacts."""
    import espmed.export

    folder = Path(espmed.export.__file__).parent
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def artifact_files(artifact: Path) -> list[Path]:
    """The files of an artifact: those its manifest lists, else the file itself."""
    from espmed.runtimes.manifest import manifest_path

    if artifact.is_dir():  # a folder artifact (Triton repositories)
        return sorted(p for p in artifact.rglob("*") if p.is_file())
    mp = manifest_path(artifact)
    if mp.is_file():
        try:
            return [artifact.with_name(n) for n in json.loads(mp.read_text(encoding="utf-8"))["files"]]
        except (ValueError, KeyError):
            pass
    return [artifact]


# -- workers ----------------------------------------------------------------------------------------


def run_worker(spec: dict, work: Path, timeout_s: float, threads: int) -> dict:
    """Run one worker process on `spec`; its result, or a failed status with the reason."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / f"{spec['name']}-{spec['mode']}.spec.json"
    result_path = work / f"{spec['name']}-{spec['mode']}.result.json"
    result_path.unlink(missing_ok=True)
    spec = {**spec, "result": str(result_path)}
    write_text(spec_path, json.dumps(spec, indent=2))
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    load_before = os.getloadavg()[0]
    t0 = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "espmed.benchmark.worker", str(spec_path), repr(t0)],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"worker timed out after {timeout_s:.0f} s"}
    if result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
        result["load_average"] = max(load_before, os.getloadavg()[0])
        return result
    tail = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
    return {"status": "failed", "reason": f"worker exited {proc.returncode}: {tail[-1] if tail else 'no output'}"}


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class BenchReport:
    rows: list[dict]
    model: dict
    host: dict
    versions: dict
    gemm: dict
    options: dict
    notes: list[str] = field(default_factory=list)
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def drop_failures(self, max_drop: float | None) -> list[str]:
        """Rows whose Dice drop vs FP32 exceeds `max_drop` (or whose accuracy could not be measured)."""
        if max_drop is None:
            return []
        bad = []
        for r in self.rows:
            if r["status"] != "ok" or r["name"] == REFERENCE:
                continue
            drop = r.get("dice_drop")
            if drop is None:
                bad.append(f"{r['name']}: accuracy not measured")
            elif drop > max_drop:
                bad.append(f"{r['name']}: Dice drop {drop:.4f} > {max_drop}")
        return bad


def run_benchmark(opts: BenchOptions, log: Callable[[str], None] = print, progress=None) -> BenchReport:
    """Measure every selected backend; write nothing but the work files (see `report.write_all`)."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = opts.threads or _usable_cores()
    samples = list_samples(opts.data)
    rows = select_rows(opts.targets)
    host, versions = machine.machine_info(), machine.library_versions()
    track = _Tracker(progress, total=2 + 2 * len(rows))

    track.step(f"GEMM peak ({threads} threads)", 0)
    t = time.perf_counter()
    gemm = machine.gemm_peak_gflops(threads)
    gemm_s = time.perf_counter() - t
    track.step("model")
    model, samples, notes = _model_and_samples(opts, samples, out=out, log=log)
    track.estimator = _estimator(opts, rows, host, model=model, images=len(samples), gemm=gemm, gemm_s=gemm_s, out=out)
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
    _add_accuracy(results, model, samples, work)
    notes += _busy_notes(results, threads)
    _add_ratios(results, model, gemm)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    options["threads"] = threads
    options["data"] = str(opts.data) if opts.data else "bundled samples (espmed/assets/samples)"
    return BenchReport(results, model, host, versions, gemm, options, notes)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Tracker:
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


def _stages(row: Format, host: dict) -> list[eta.Stage]:
    """The stages a row will run: its export (none for the reference) and its measurement."""
    if unavailable_reason(row, host):
        return []
    target = row.export_target
    cold_starts = _COLD_STARTS if row.backend == "openvino" else 0
    measure = eta.Stage(row.name, "measure", target=target, cold_starts=cold_starts)
    if target is None:
        return [measure]
    return [eta.Stage(row.name, "export", target=target, calibrated=format_named(target).calibrated), measure]


def _estimator(
    opts: BenchOptions, rows: list[Format], host: dict, *,
    model: dict, images: int, gemm: dict, gemm_s: float, out: Path,
) -> eta.Estimator:
    """The run's cost model: F from the FLOPs and the GEMM peak, the run's settings, the exports cached."""
    stages = [stage for row in rows for stage in _stages(row, host)]
    targets = {s.target for s in stages if s.kind == "export"}
    cached = {t for t in targets if cached_export(t, model, opts, out) is not None}
    calibrating = any(s.calibrated and s.target not in cached for s in stages)
    calib, held, attempts = _calibration_work(model["calibration"]) if calibrating else (0, 0, 0)
    work = eta.Workload(
        images=images, warmup=opts.warmup, runs=opts.runs, batch=opts.batch,
        calib_images=calib, gated_images=held, attempts=attempts,
    )
    forward_s = eta.forward_from_flops(model["gflops"], gemm["gflops"])
    return eta.Estimator(stages, forward_s=forward_s, work=work, cached=cached, tail_s=gemm_s)


def _calibration_work(data: Path | None) -> tuple[int, int, int]:
    """(calibration images, held-out images, INT8 attempts at most) of an INT8 export from `data`:
    the exporter's own split (read at a tiny size), its fallback levels and a recipe's attempt."""
    from espmed.export.calibration import load_calibration
    from espmed.export.quantize import FLOAT_LEVELS

    try:
        images = load_calibration(data, 32, 0.0, 1.0)
    except EspmedError:  # the export will fail and say why
        return 0, 0, 0
    return len(images.calibration), len(images.held_out), len(FLOAT_LEVELS) + 1


def _model_and_samples(
    opts: BenchOptions, samples: list[Sample], *, out: Path, log: Callable[[str], None]
) -> tuple[dict, list[Sample], list[str]]:
    """The model facts, the samples it is judged on and the report's opening notes."""
    model = prepare_model(opts, samples, out=out, log=log)
    calib = calibration_dir(opts, model, out)
    model["calibration"] = None if calib is None else str(calib)  # what INT8 exports calibrate on
    if opts.checkpoint is not None and any(s.modality == model["modality"] for s in samples):
        # A trained model is judged on images of its modality; random weights on every image.
        samples = [s for s in samples if s.modality in (model["modality"], None)]
    model["images"] = [s.name for s in samples]
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
    model: dict
    samples: list[dict]  # Sample.to_dict() of the images measured
    track: _Tracker
    exports: dict[str, tuple[Path, bool, float] | Exception] = field(default_factory=dict)

    def worker(self, spec: dict) -> dict:
        return run_worker(spec, self.work, self.opts.worker_timeout_s, self.threads)


def _measure_row(run: _Run, row: Format, host: dict) -> dict:
    """One row's record: unavailable, export failed, or measured by a worker process."""
    rec = _row_record(row)
    reason = unavailable_reason(row, host)
    if reason:
        rec.update(status="unavailable", reason=reason)
        run.track.step(f"{row.name}: unavailable", 2, stage_s=0.0)
        return rec
    *export, measure = _stages(row, host)
    estimator = run.track.estimator
    fresh = row.export_target not in run.exports
    if export:
        run.track.begin(export[0], f"{row.name}: export", 0)
    got = _row_artifact(run, row)
    if isinstance(got, Exception):
        estimator.export_failed(row.export_target)
        rec.update(status="failed", reason=f"export failed: {_one_line(got)}", detail=str(got))
        run.track.step(f"{row.name}: export failed", 2, stage_s=0.0)
        return rec
    artifact, reused, export_s = got
    if export:
        estimator.exported(export[0], export_s if fresh and not reused else None)
    files = artifact_files(artifact)
    rec.update(
        artifact=str(artifact),
        artifact_mb=sum(f.stat().st_size for f in files if f.is_file()) / 1e6,
        export_s=export_s,
        export_reused=reused,
    )
    run.track.begin(measure, f"{row.name}: measure")
    try:
        with _served(row, artifact) as where:
            spec = _worker_spec(run, row, where)
            measured = run.worker(spec)
    except EspmedError as exc:
        rec.update(status="failed", reason=f"server failed: {_one_line(exc)}")
        run.track.step(f"{row.name}: server failed", stage_s=0.0)
        return rec
    measured.pop("traceback", None)
    rec.update(measured)
    if rec["status"] == "ok" and row.name == REFERENCE:
        estimator.measured_reference(rec["latency_ms"]["p50"] / 1e3)
    if rec["status"] == "ok" and row.backend == "openvino":  # what is left of the stage: its measured cold start, twice
        run.track.step(f"{row.name}: cold starts", 0, stage_s=_COLD_STARTS * rec["cold_start_s"])
        rec.update(_cached_cold_starts(run, row, spec))
    run.track.step(f"{row.name}: done", stage_s=0.0)
    return rec


def _row_artifact(run: _Run, row: Format) -> tuple[Path, bool, float | None] | Exception:
    """(artifact, reused, export seconds), or the exception its export raised; the reference runs the checkpoint."""
    target = row.export_target
    if target is None:
        return Path(run.model["checkpoint"]), True, None
    if target not in run.exports:
        try:
            run.exports[target] = export_artifact(target, run.model, run.opts, run.out)
        except Exception as exc:  # noqa: BLE001 - a failed export is that row's status
            run.exports[target] = exc
    return run.exports[target]


@contextlib.contextmanager
def _served(row: Format, artifact: Path):
    """Where the worker loads `artifact`: the artifact, or for a served row (Triton) the URL of its
    model on a local server started for the measurement (the worker is its only client)."""
    if row.scheme is None:
        yield artifact
        return
    from ..runtimes.triton_server import LocalTritonServer

    model = json.loads((artifact / row.marker).read_text(encoding="utf-8"))["triton"]["model"]
    with LocalTritonServer(artifact) as server:
        yield f"{server.url}/{model}"


def _worker_spec(run: _Run, row: Format, artifact: Path | str) -> dict:
    return {
        "name": row.name,
        "mode": "full",
        "artifact": str(artifact),
        "threads": run.threads,
        "precision": row.runtime_precision,
        "modality": run.model["modality"],
        "image_size": run.model["image_size"] if row.export_target is None else None,
        "samples": run.samples,
        "warmup": run.opts.warmup,
        "runs": run.opts.runs,
        "batch": run.opts.batch,
        "logits": str(run.work / f"{row.name}.logits.npz"),
    }


#: OpenVINO rows' cold-start-only workers (`_cached_cold_starts`): one fills the cache, one reads it.
_COLD_STARTS = 2


def _cached_cold_starts(run: _Run, row: Format, spec: dict) -> dict:
    """OpenVINO: a cold start that fills a compiled-model cache, then one that reads it."""
    cache = run.out / "ov_cache" / row.name
    shutil.rmtree(cache, ignore_errors=True)
    cold = {**spec, "mode": "cold", "cache_dir": str(cache)}
    filled = run.worker(cold)
    cached = run.worker(cold) if filled["status"] == "ok" else filled
    return {
        "cold_start_cache_fill_s": filled.get("cold_start_s"),
        "cold_start_cached_s": cached.get("cold_start_s"),
        "cold_cached_breakdown_s": cached.get("cold_breakdown_s"),
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


def _load_logits(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _add_accuracy(results: list[dict], model: dict, samples: list[Sample], work: Path) -> None:
    """Dice / max logit error vs the torch reference, and vs ground truth where the data has masks."""
    threshold = model["threshold"]
    ref_path = work / f"{REFERENCE}.logits.npz"
    reference = _load_logits(ref_path) if ref_path.is_file() else None
    masks = {
        s.name: read_mask(s.mask)
        for s in samples
        if s.mask and (s.modality is None or s.modality == model["modality"])
    }
    for rec in results:
        if rec["status"] != "ok":
            continue
        logits = _load_logits(work / f"{rec['name']}.logits.npz")
        if reference is not None:
            vs = agreement(logits, reference, threshold)
            rec["vs_fp32"] = vs
            rec["dice_drop"] = 1.0 - vs["dice_min"]
        rec["ground_truth"] = ground_truth_scores(logits, masks, threshold)


def _add_ratios(results: list[dict], model: dict, gemm: dict) -> None:
    ref = next((r for r in results if r["name"] == REFERENCE and r["status"] == "ok"), None)
    for rec in results:
        if rec["status"] != "ok":
            continue
        p50_s = rec["latency_ms"]["p50"] / 1e3
        rec["gflops_per_s"] = model["gflops"] / p50_s
        rec["gemm_peak_share"] = rec["gflops_per_s"] / gemm["gflops"]
        rec["speedup_vs_torch"] = ref["latency_ms"]["p50"] / rec["latency_ms"]["p50"] if ref else None
