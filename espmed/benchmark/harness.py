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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..atomic import write_text
from ..errors import EspmedError, first_line
from ..io import read_frame, read_mask
from . import machine
from .data import Sample, list_samples
from .metrics import agreement, ground_truth_scores

REFERENCE = "torch"
#: The FP32 IR run with OpenVINO's BF16 inference precision: its own row.
OPENVINO_BF16 = "openvino-bf16"
DEFAULT_RUNS = 10
DEFAULT_WARMUP = 2
DEFAULT_WORKER_TIMEOUT_S = 1800
RANDOM_WEIGHTS_NOTE = (
    "no --checkpoint: seeded random weights, so the accuracy columns measure agreement with "
    "torch FP32, not clinical accuracy"
)


@dataclass(frozen=True)
class Row:
    """One benchmarked backend: an export target run at a runtime precision."""

    name: str
    label: str
    backend: str
    precision: str  # what the graph computes in: fp32 / fp16 / bf16 / int8
    export_target: str | None  # None: the torch reference runs the checkpoint
    runtime_precision: str | None = None  # OpenVINO INFERENCE_PRECISION_HINT
    needs_gpu: bool = False


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


_LABELS = {
    "torch": "torch eager FP32 (reference)",
    "onnx": "ONNX Runtime FP32",
    "onnx-fp16": "ONNX Runtime FP16",
    "onnx-int8": "ONNX Runtime INT8 (QDQ)",
    "openvino": "OpenVINO FP32",
    OPENVINO_BF16: "OpenVINO FP32 IR, BF16 runtime precision",
    "openvino-fp16": "OpenVINO FP16 weights (f32 compute)",
    "openvino-int8": "OpenVINO INT8 (NNCF)",
    "trt-fp32": "TensorRT FP32",
    "trt-fp16": "TensorRT FP16",
    "trt-int8": "TensorRT INT8",
}


def all_rows() -> list[Row]:
    """The torch reference, every export target, and the OpenVINO BF16-runtime row after `openvino`."""
    from espmed.export import TARGETS

    rows = [Row(REFERENCE, _LABELS[REFERENCE], "torch", "fp32", None)]
    for name, spec in TARGETS.items():
        rows.append(
            Row(name, _LABELS.get(name, name), spec.backend, spec.precision, name, "f32" if spec.backend == "openvino" else None, spec.needs_gpu)
        )
        if name == "openvino":
            rows.append(Row(OPENVINO_BF16, _LABELS[OPENVINO_BF16], "openvino", "bf16", "openvino", "bf16"))
    return rows


def select_rows(spec: str, rows: list[Row]) -> list[Row]:
    """`all` or a comma-separated list of row names; the torch reference is always included."""
    names = [r.name for r in rows]
    if spec.strip().lower() == "all":
        return rows
    wanted = [t.strip().lower() for t in spec.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in names]
    if unknown:
        raise EspmedError(f"unknown target(s) {', '.join(unknown)}; choose from all, {', '.join(names)}")
    return [r for r in rows if r.name == REFERENCE or r.name in wanted]


def unavailable_reason(row: Row, host: dict) -> str | None:
    """Why `row` cannot run on this machine, or None."""
    if row.needs_gpu and not host["nvidia_gpu"]:
        return "needs an NVIDIA GPU with TensorRT; none on this machine"
    if row.runtime_precision == "bf16" and not host["cpu"]["bf16"]:
        return "CPU has no native BF16 (avx512_bf16 / amx_bf16)"
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt", "torch": "torch"}[row.backend]
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


# -- model ------------------------------------------------------------------------------------------


def choose_modality(available: tuple[str, ...], samples: list[Sample], requested: str | None, modalities: tuple[str, ...]) -> str:
    """The modality to export: the requested one; else the only one; else the one with the most
    ground-truth masks (then images) in the data; else the first available."""
    from ..errors import ModalityError

    if requested is not None:
        key = requested.strip().lower()
        name = modalities[int(key)] if key.isdigit() and int(key) < len(modalities) else key
        if name not in available:
            raise ModalityError(f"modality {requested!r} not served by the model ({', '.join(available)})")
        return name
    if len(available) == 1:
        return available[0]
    score = {m: (sum(1 for s in samples if s.modality == m and s.mask), sum(1 for s in samples if s.modality == m)) for m in available}
    best = max(available, key=lambda m: score[m])
    return best if score[best] > (0, 0) else available[0]


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def prepare_model(opts: BenchOptions, samples: list[Sample], out: Path, log: Callable[[str], None]) -> dict:
    """Load the checkpoint, or make (or reuse) the seeded random weights; returns the model facts."""
    import torch

    from ..model import get_preset, load_checkpoint, save_checkpoint
    from ..atomic import file_sha256
    from ..model.summary import count_flops

    if opts.checkpoint is not None:
        model = load_checkpoint(opts.checkpoint, image_size=opts.imgsz)
        modality = choose_modality(model.available_modalities, samples, opts.modality, model.config.modalities)
        path, weights = Path(opts.checkpoint), {"kind": "checkpoint"}
    else:
        from ..runtimes.preprocess import preprocess
        from .weights import SCHEME, random_model

        cfg = get_preset(opts.preset, image_size=opts.imgsz) if opts.imgsz else get_preset(opts.preset)
        modality = choose_modality(tuple(cfg.modalities), samples, opts.modality, cfg.modalities)
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
            weights = json.loads(record_path.read_text(encoding="utf-8"))
            model = load_checkpoint(path)
            log(f"reusing random weights {path}")
        else:
            log(f"making seeded random weights (seed {opts.seed}) at {cfg.image_size}x{cfg.image_size}")
            x = torch.from_numpy(np.stack([preprocess(read_frame(s.image), cfg.image_size, pre.mean, pre.std)[0] for s in samples]))
            model, placement = random_model(cfg, opts.seed, x, modality)
            save_checkpoint(model, path, metadata={"espmed.bench.random_weights": json.dumps(key, sort_keys=True)})
            weights = {"kind": "random", "key": key, **placement}
            write_text(record_path, json.dumps(weights, indent=2))
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


# -- exports ----------------------------------------------------------------------------------------


def _calib_sha(data: Path | None) -> str:
    from espmed.export.calibration import default_calibration_dir, image_files
    from espmed.export.manifest import files_sha256

    return files_sha256(image_files(Path(data) if data is not None else default_calibration_dir()))


def export_artifact(target: str, model: dict, opts: BenchOptions, out: Path) -> tuple[Path, bool, float]:
    """(artifact, reused, seconds): the cached export of `target` when its record matches, else a new one."""
    from espmed.export import TARGETS, export
    from espmed.runtimes.manifest import verify_manifest

    from .machine import library_versions

    dest = out / "artifacts" / target
    record_path = dest / "bench-export.json"
    key = {
        "target": target,
        "checkpoint_sha256": model["checkpoint_sha256"],
        "image_size": model["image_size"],
        "modality": model["modality"],
        "batch": opts.batch,
        "dynamic": opts.batch > 1,
        "calibration_sha256": _calib_sha(opts.data) if TARGETS[target].precision == "int8" else None,
        "int8_gate_max_drop": opts.max_drop if TARGETS[target].precision == "int8" else None,
        "versions": library_versions(),
        "exporter_source_sha256": _exporter_source_sha256(),
    }
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            artifact = Path(record["artifact"])
            if record["key"] == key and artifact.is_file() and verify_manifest(artifact) is not None:
                return artifact, True, record["export_s"]
        except (ValueError, KeyError, EspmedError):
            pass
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
            calib=opts.data,
            progress=False,
            **gate,
        )
    seconds = time.perf_counter() - t
    write_text(record_path, json.dumps({"key": key, "artifact": str(result.artifact), "export_s": seconds}, indent=2))
    return Path(result.artifact), False, seconds


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
    threads = opts.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    samples = list_samples(opts.data)
    rows = select_rows(opts.targets, all_rows())
    host, versions = machine.machine_info(), machine.library_versions()
    steps = 2 + 2 * len(rows)
    task = progress.add_task("benchmark", total=steps) if progress is not None else None

    def step(text: str, advance: int = 1) -> None:
        if progress is not None:
            progress.update(task, advance=advance, description=text)

    step(f"GEMM peak ({threads} threads)", 0)
    gemm = machine.gemm_peak_gflops(threads)
    step("model")
    model = prepare_model(opts, samples, out, log)
    if opts.checkpoint is not None and any(s.modality == model["modality"] for s in samples):
        # A trained model is judged on images of its modality; random weights on every image.
        samples = [s for s in samples if s.modality in (model["modality"], None)]
    model["images"] = [s.name for s in samples]
    notes = [RANDOM_WEIGHTS_NOTE] if opts.checkpoint is None else []
    if notes:
        log(notes[0])
    step("exports")

    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    sample_dicts = [s.to_dict() for s in samples]
    artifacts: dict[str, tuple[Path, bool, float] | Exception] = {}
    results = []
    for row in rows:
        rec = {**asdict(row), "label": row.label, "status": "ok", "reason": None}
        reason = unavailable_reason(row, host)
        if reason:
            rec.update(status="unavailable", reason=reason)
            results.append(rec)
            step(f"{row.name}: unavailable", 2)
            continue
        step(f"{row.name}: export", 0)
        if row.export_target is None:
            artifact, reused, export_s = Path(model["checkpoint"]), True, None
        else:
            if row.export_target not in artifacts:
                try:
                    artifacts[row.export_target] = export_artifact(row.export_target, model, opts, out)
                except Exception as exc:  # noqa: BLE001 - a failed export is that row's status
                    artifacts[row.export_target] = exc
            got = artifacts[row.export_target]
            if isinstance(got, Exception):
                rec.update(status="failed", reason=f"export failed: {_one_line(got)}", detail=str(got))
                results.append(rec)
                step(f"{row.name}: export failed", 2)
                continue
            artifact, reused, export_s = got
        files = artifact_files(artifact)
        rec.update(
            artifact=str(artifact),
            artifact_mb=sum(f.stat().st_size for f in files if f.is_file()) / 1e6,
            export_s=export_s,
            export_reused=reused,
        )
        step(f"{row.name}: measure")
        spec = {
            "name": row.name,
            "mode": "full",
            "artifact": str(artifact),
            "threads": threads,
            "precision": row.runtime_precision,
            "modality": model["modality"],
            "image_size": model["image_size"] if row.export_target is None else None,
            "samples": sample_dicts,
            "warmup": opts.warmup,
            "runs": opts.runs,
            "batch": opts.batch,
            "logits": str(work / f"{row.name}.logits.npz"),
        }
        measured = run_worker(spec, work, opts.worker_timeout_s, threads)
        measured.pop("traceback", None)
        rec.update(measured)
        if rec["status"] == "ok" and row.backend == "openvino":
            cache = out / "ov_cache" / row.name
            shutil.rmtree(cache, ignore_errors=True)
            cold = {**spec, "mode": "cold", "cache_dir": str(cache)}
            filled = run_worker(cold, work, opts.worker_timeout_s, threads)
            cached = run_worker(cold, work, opts.worker_timeout_s, threads) if filled["status"] == "ok" else filled
            rec["cold_start_cache_fill_s"] = filled.get("cold_start_s")
            rec["cold_start_cached_s"] = cached.get("cold_start_s")
            rec["cold_cached_breakdown_s"] = cached.get("cold_breakdown_s")
        results.append(rec)
        step(f"{row.name}: done")

    # The GEMM peak is the best of a measurement before and after the backends, so that a
    # neighbour's load during one of them does not deflate it.
    gemm_after = machine.gemm_peak_gflops(threads)
    gemm = {**max(gemm, gemm_after, key=lambda g: g["gflops"]), "measurements": [gemm["gflops"], gemm_after["gflops"]]}
    _add_accuracy(results, model, samples, work)
    busiest = max((r.get("load_average", 0.0) for r in results), default=0.0)
    if busiest > threads + 0.5:
        notes.append(
            f"warning: the machine was busy (1-min load average up to {busiest:.1f} with {threads} threads "
            "benchmarked): other processes competed for the cores, so timings and ratios are unreliable; "
            "rerun on a quiet machine"
        )
    _add_ratios(results, model, gemm)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    options["threads"] = threads
    options["data"] = str(opts.data) if opts.data else "bundled samples (espmed/assets/samples)"
    return BenchReport(results, model, host, versions, gemm, options, notes)


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
