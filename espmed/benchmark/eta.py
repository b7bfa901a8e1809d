"""How long each stage of `espmed bench` should take: a cost model counted in torch FP32 forwards.

The unit is F, one warm torch FP32 forward at the run's size and batch 1: before the torch row has
run, the model's FLOPs at the share of the measured GEMM peak that torch eager reaches; after, the
torch row's measured p50. An export costs a fixed part plus a multiple of F (load, the FP32
reference on the held-out images, trace and simplify, convert, the check against FP32); an INT8
export adds, for each attempt of the accuracy gate's search, the calibration pass (forwards per
calibration image) and the gated images at the row's latency. The estimate counts every attempt
(the search stops at the first that passes, so it is an upper bound). A measure stage
is a worker process: start-up and load, then (first mask + images + warmup + runs) forwards at the
row's latency, F over the backend's typical speed-up; OpenVINO rows add two cold starts (filling
and reading the compiled-model cache). A cached export costs nothing. Everything here is pure: the
harness passes what it knows, and the clock stays outside.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Cost:
    """One row's costs; export fields belong to the row that makes the artifact (`export_target`)."""

    speedup: float  # warm latency: torch FP32 / this row
    startup_s: float  # worker: interpreter start, imports and artifact load
    export_fixed_s: float = 0.0
    export_forwards: float = 0.0  # export, in F, besides the fixed part
    calib_forwards: float = 0.0  # INT8: F per calibration image per attempt of the gate's search


#: Measured on this project's 2-core CPU (2 threads). Speed-ups (torch p50 / the row's p50) and
#: start-ups (the worker's start + load) come from benchmarks/results/shipped-model-partial/bench.json
#: (shipped model, 1024², F = 1.896 s: onnx 2.19, openvino 2.87, openvino-bf16 6.13); the FP16
#: rows' from benchmarks/results/bench.json (random weights, 1024², F = 1.386 s); the INT8 rows'
#: from benchmarks/results/trained-microscopy/bench.json (256²: no INT8 export has passed its gate
#: at 1024²). Exports are fitted through two sizes of the shipped model: onnx 32.1 s at 1024²
#: (shipped-model-partial) and 17.1 s at 256² (F 0.192 s, measured when this table was made),
#: openvino 48.4 s and 20.9 s; onnx-fp16 108.8 s and openvino-fp16 18.7 s at F 1.386 s
#: (bench.json) over the fixed parts of their graphs. INT8 attempts at 256² on the shipped model
#: (4 calibration and 4 held-out images): ORT 3.3 s and NNCF 8.1 s each (5 attempts, all refused by
#: the gate), all of it counted as calibration and gate work, which grows with the image. TensorRT
#: has no figures from a machine without a GPU: its rows get no estimate. Triton serves the ONNX
#: FP32 graph (served p50 within 2 % of local in benchmarks/results/triton_concurrency.json); the
#: start of its server is not counted.
COSTS: dict[str, Cost] = {
    "torch": Cost(speedup=1.0, startup_s=2.1),
    "onnx": Cost(speedup=2.19, startup_s=0.6, export_fixed_s=15.4, export_forwards=8.8),
    "onnx-fp16": Cost(speedup=2.01, startup_s=0.4, export_fixed_s=15.4, export_forwards=67.0),
    "onnx-int8": Cost(speedup=1.13, startup_s=0.6, export_fixed_s=15.4, export_forwards=8.8, calib_forwards=3.4),
    "openvino": Cost(speedup=2.87, startup_s=1.5, export_fixed_s=17.8, export_forwards=16.1),
    "openvino-bf16": Cost(speedup=6.13, startup_s=1.3),
    "openvino-fp16": Cost(speedup=3.04, startup_s=0.7, export_fixed_s=10.0, export_forwards=6.3),
    "openvino-int8": Cost(speedup=2.9, startup_s=1.5, export_fixed_s=10.0, export_forwards=6.3, calib_forwards=10.2),
    "triton": Cost(speedup=2.19, startup_s=0.6, export_fixed_s=15.4, export_forwards=8.8),
}

#: Torch eager's share of the GEMM peak (shipped-model-partial: 59.8 of 208.7 GFLOP/s at 1024²).
TORCH_PEAK_SHARE = 0.29


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What a run does per row: images measured, warm-up and timed runs, batch; INT8 export work."""

    images: int
    warmup: int
    runs: int
    batch: int = 1
    calib_images: int = 0
    gated_images: int = 0
    attempts: int = 1  # INT8: the gate's fallback levels, all counted


def forward_from_flops(gflops: float, gemm_gflops: float) -> float:
    """F before the torch row has run: the model's FLOPs at torch's share of the GEMM peak."""
    return gflops / (gemm_gflops * TORCH_PEAK_SHARE)


def export_s(
    target: str, *, forward_s: float, work: Workload, calibrated: bool, cached: bool, scale: float = 1.0
) -> float | None:
    """Seconds to export `target` (0 when cached); None when the table has no figures for it.

    `scale` is what this run's finished exports took over what this model said they would.
    """
    if cached:
        return 0.0
    cost = COSTS.get(target)
    if cost is None:
        return None
    seconds = cost.export_fixed_s + cost.export_forwards * forward_s
    if calibrated:
        latency = forward_s / cost.speedup
        per_image = work.calib_images * cost.calib_forwards * forward_s + work.gated_images * latency
        seconds += work.attempts * per_image
    return seconds * scale


def measure_s(row: str, *, forward_s: float, work: Workload, cold_starts: int) -> float | None:
    """Seconds for a row's workers: the full measurement, then `cold_starts` cold-start-only runs."""
    cost = COSTS.get(row)
    if cost is None:
        return None
    latency = forward_s / cost.speedup
    forwards = 1 + work.images + work.warmup + work.runs
    if work.batch > 1:  # the worker's throughput pass: one warm batch, then max(2, runs // batch) timed
        forwards += (1 + max(2, work.runs // work.batch)) * work.batch
    return cost.startup_s + forwards * latency + cold_starts * (cost.startup_s + latency)


def export_scale(done: list[tuple[float, float]]) -> float:
    """Measured over estimated seconds of this run's finished exports, (estimate, measured) pairs; 1 without."""
    estimated = sum(e for e, _ in done)
    return sum(m for _, m in done) / estimated if estimated > 0 else 1.0


@dataclass(frozen=True)
class Stage:
    """One stage of a row: `export` (of `target`, the artifact the row runs) or `measure`."""

    row: str
    kind: str  # export | measure
    target: str | None = None  # the row's export target (None: the torch reference, which has no export)
    calibrated: bool = False
    cold_starts: int = 0  # measure: cold-start-only workers after the full one


class Estimator:
    """The run's estimates, refined by what it has measured: F once the torch row has run, the
    export scale once an export has finished, and exports made (or found cached) cost 0 after.
    Clock-free: the harness says when a stage begins and what it measured."""

    def __init__(
        self, stages: list[Stage], *, forward_s: float, work: Workload, cached: set[str], tail_s: float = 0.0
    ) -> None:
        self.pending = list(stages)
        self.forward_s = forward_s
        self.work = work
        self.cached = set(cached)
        self.tail_s = tail_s  # after the rows: the GEMM peak measured again
        self._claimed: set[str] = set()  # targets whose export has begun: rows sharing them wait for nothing
        # (estimate, measured) of this run's fresh exports, INT8 (calibrated: True) apart from the others
        self._exports: dict[bool, list[tuple[float, float]]] = {False: [], True: []}

    def is_cached(self, target: str | None) -> bool:
        return target in self.cached or target in self._claimed

    def estimate(self, stage: Stage) -> float | None:
        if stage.kind == "export":
            return export_s(
                stage.target, forward_s=self.forward_s, work=self.work, calibrated=stage.calibrated,
                cached=self.is_cached(stage.target), scale=export_scale(self._exports[stage.calibrated]),
            )
        # a run-time variant the table lacks is estimated as the row whose artifact it runs
        row = stage.row if stage.row in COSTS else stage.target
        return measure_s(row, forward_s=self.forward_s, work=self.work, cold_starts=stage.cold_starts)

    def begin(self, stage: Stage) -> float | None:
        """`stage` starts: it leaves the pending ones; its estimate."""
        if stage in self.pending:
            self.pending.remove(stage)
        seconds = self.estimate(stage)
        if stage.kind == "export":
            self._claimed.add(stage.target)
        return seconds

    def remaining(self) -> tuple[float, bool]:
        """(seconds of every pending stage, whether some of them have no estimate); a target shared by
        several rows is exported once."""
        seconds, unknown, seen = self.tail_s, False, set()
        for stage in self.pending:
            if stage.kind == "export":
                if stage.target in seen:
                    continue
                seen.add(stage.target)
            estimate = self.estimate(stage)
            unknown |= estimate is None
            seconds += estimate or 0.0
        return seconds, unknown

    def exported(self, stage: Stage, measured_s: float | None) -> None:
        """`stage`'s export is over: `measured_s`, the seconds of a fresh export (None: found cached);
        its time against this model's estimate scales the exports of its kind (INT8 or not) still to
        come: an INT8 search that stopped at its first attempt shortens the next one's."""
        if measured_s is not None:
            estimate = export_s(
                stage.target, forward_s=self.forward_s, work=self.work, calibrated=stage.calibrated, cached=False
            )
            if estimate:
                self._exports[stage.calibrated].append((estimate, measured_s))
        self.cached.add(stage.target)

    def export_failed(self, target: str) -> None:
        """No row that runs `target`'s artifact will be measured."""
        self.pending = [s for s in self.pending if s.target != target]

    def measured_reference(self, p50_s: float) -> None:
        """The torch row's warm p50: F from now on."""
        self.forward_s = p50_s


def duration(seconds: float) -> str:
    """42s, 3m10s, 1h05m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def describe(*, stage_s: float | None, elapsed_s: float, after_s: float | None, unknown_after: bool) -> str:
    """The progress line's estimate: this stage's time left (counting down), then the whole run's.

    `after_s` is the estimate of every stage after this one (None before the run has one: "");
    `unknown_after`: some of them have none.
    """
    if stage_s is None and after_s is None:
        return ""
    if stage_s is None:
        stage, left = "no estimate", None
    elif elapsed_s < stage_s + 1 or stage_s == 0:  # a cached export stays "~0s left"
        left = max(0.0, stage_s - elapsed_s)
        stage = f"~{duration(left)} left"
    else:
        stage, left = f"{duration(elapsed_s - stage_s)} over its ~{duration(stage_s)} estimate", 0.0
    if after_s is None:
        return stage
    more = "+" if unknown_after or left is None else ""
    return f"{stage} · all ~{duration(after_s + (left or 0.0))}{more} left"
