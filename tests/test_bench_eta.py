"""`espmed bench`'s estimates of each stage's time: the cost model, cache hits, refinement, the progress line."""

from __future__ import annotations

import shutil
import time

import pytest

from espmed.benchmark import eta, harness
from espmed.benchmark.data import bundled_samples_dir, list_samples
from espmed.benchmark.options import BenchOptions, select_rows
from espmed.benchmark.progress import Tracker, estimator

WORK = eta.Workload(images=2, warmup=2, runs=5, calib_images=4, gated_images=4, attempts=5)
F = 1.5  # seconds of one torch FP32 forward


def _export(target: str, **kwargs) -> float | None:
    args = {"forward_s": F, "work": WORK, "calibrated": target.endswith("int8"), "cached": False} | kwargs
    return eta.export_s(target, **args)


def test_export_cost_is_the_tables_fixed_part_plus_forwards():
    onnx = eta.COSTS["onnx"]
    assert _export("onnx") == pytest.approx(onnx.export_fixed_s + onnx.export_forwards * F)
    assert _export("onnx", forward_s=2 * F) - _export("onnx") == pytest.approx(onnx.export_forwards * F)
    assert _export("onnx", scale=2.0) == pytest.approx(2 * _export("onnx"))


def test_int8_export_adds_every_attempt_of_calibration_and_gate():
    int8 = eta.COSTS["onnx-int8"]
    base = int8.export_fixed_s + int8.export_forwards * F
    attempt = 4 * int8.calib_forwards * F + 4 * F / int8.speedup
    assert _export("onnx-int8") == pytest.approx(base + 5 * attempt)
    fewer = eta.Workload(images=2, warmup=2, runs=5, calib_images=2, gated_images=4, attempts=5)
    assert _export("onnx-int8", work=fewer) == pytest.approx(base + 5 * (attempt - 2 * int8.calib_forwards * F))
    assert _export("onnx-int8", calibrated=False) == pytest.approx(base)


def test_cached_export_costs_nothing_and_unknown_targets_have_no_estimate():
    assert _export("openvino-int8", cached=True) == 0.0
    assert _export("trt-fp32") is None and _export("trt-fp32", cached=True) == 0.0
    assert eta.measure_s("trt-fp32", forward_s=F, work=WORK, cold_starts=0) is None
    est = eta.Estimator([eta.Stage("trt-fp32", "measure", target="trt-fp32")], forward_s=F, work=WORK, cached=set())
    assert est.remaining() == (0.0, True)
    # a run-time variant the table lacks is estimated as the row whose artifact it runs
    variant = eta.Stage("openvino-int8-bf16", "measure", target="openvino-int8", cold_starts=2)
    assert "openvino-int8-bf16" not in eta.COSTS
    assert est.estimate(variant) == eta.measure_s("openvino-int8", forward_s=F, work=WORK, cold_starts=2)


def test_measure_cost_is_startup_plus_every_forward_at_the_rows_latency():
    ov = eta.COSTS["openvino"]
    latency = F / ov.speedup
    full = ov.startup_s + (1 + 2 + 2 + 5) * latency
    assert eta.measure_s("openvino", forward_s=F, work=WORK, cold_starts=0) == pytest.approx(full)
    with_cold = eta.measure_s("openvino", forward_s=F, work=WORK, cold_starts=2)
    assert with_cold == pytest.approx(full + 2 * (ov.startup_s + latency))
    batched = eta.Workload(images=2, warmup=2, runs=5, batch=4)
    extra = (1 + 2) * 4 * latency  # one warm batch, then max(2, 5 // 4) timed batches of 4
    assert eta.measure_s("openvino", forward_s=F, work=batched, cold_starts=0) == pytest.approx(full + extra)
    # the forward estimated before torch has run: FLOPs at torch's share of the GEMM peak
    assert eta.forward_from_flops(100.0, 200.0) == pytest.approx(100.0 / (200.0 * eta.TORCH_PEAK_SHARE))


def _stages() -> list[eta.Stage]:
    return [
        eta.Stage("torch", "measure"),
        eta.Stage("onnx", "export", target="onnx"),
        eta.Stage("onnx", "measure", target="onnx"),
        eta.Stage("openvino", "export", target="openvino"),
        eta.Stage("openvino", "measure", target="openvino", cold_starts=2),
        eta.Stage("openvino-bf16", "export", target="openvino"),
        eta.Stage("openvino-bf16", "measure", target="openvino", cold_starts=2),
    ]


def test_a_shared_artifact_is_exported_once_and_a_cached_one_not_at_all():
    stages = _stages()
    est = eta.Estimator(stages, forward_s=F, work=WORK, cached=set(), tail_s=3.0)
    total, unknown = est.remaining()
    each = sum(est.estimate(s) for s in stages if s is not stages[5])  # openvino-bf16's export is openvino's
    assert not unknown and total == pytest.approx(each + 3.0)
    cached = eta.Estimator(stages, forward_s=F, work=WORK, cached={"onnx"}, tail_s=3.0)
    assert cached.remaining()[0] == pytest.approx(total - _export("onnx"))
    assert cached.is_cached("onnx") and cached.begin(stages[1]) == 0.0
    # once openvino's export has begun, the row that shares it waits for nothing
    assert est.begin(stages[3]) > 0 and est.estimate(stages[5]) == 0.0 and est.is_cached("openvino")


def test_estimates_are_refined_by_what_the_run_measured():
    stages = _stages()
    est = eta.Estimator(stages, forward_s=F, work=WORK, cached=set())
    measure = est.estimate(stages[2])
    est.begin(stages[0])
    est.measured_reference(2 * F)  # torch turned out twice as slow as the FLOPs said
    onnx = eta.COSTS["onnx"]
    assert est.estimate(stages[2]) - onnx.startup_s == pytest.approx(2 * (measure - onnx.startup_s))
    openvino = est.estimate(stages[3])
    est.exported(stages[1], 1.5 * est.begin(stages[1]))  # this machine exports 1.5x slower than the table
    assert est.estimate(stages[3]) == pytest.approx(1.5 * openvino)
    est.exported(stages[1], None)  # a cache hit does not change the scale
    assert est.estimate(stages[3]) == pytest.approx(1.5 * openvino)
    # INT8 exports are scaled by INT8 exports only: a search that stopped at its first of five attempts
    int8 = [eta.Stage(n, "export", target=n, calibrated=True) for n in ("onnx-int8", "openvino-int8")]
    ov_int8 = est.estimate(int8[1])
    est.exported(int8[0], 0.3 * est.begin(int8[0]))
    assert est.estimate(int8[1]) == pytest.approx(0.3 * ov_int8)
    assert est.estimate(stages[3]) == pytest.approx(1.5 * openvino)
    before = est.remaining()[0]
    est.export_failed("openvino")  # neither row that runs openvino's artifact will be measured
    assert est.pending == [stages[2]] and est.remaining()[0] < before


def test_describe_counts_down_and_says_when_over():
    assert eta.describe(stage_s=None, elapsed_s=1.0, after_s=None, unknown_after=False) == ""
    text = eta.describe(stage_s=190.0, elapsed_s=10.0, after_s=600.0, unknown_after=False)
    assert text == "~3m00s left · all ~13m00s left"
    assert eta.describe(stage_s=0.0, elapsed_s=2.0, after_s=5.0, unknown_after=False) == "~0s left · all ~5s left"
    assert eta.describe(stage_s=10.0, elapsed_s=10.6, after_s=None, unknown_after=False) == "~0s left"
    over = eta.describe(stage_s=60.0, elapsed_s=80.0, after_s=30.0, unknown_after=True)
    assert over == "20s over its ~1m00s estimate · all ~30s+ left"
    unknown = eta.describe(stage_s=None, elapsed_s=5.0, after_s=30.0, unknown_after=False)
    assert unknown == "no estimate · all ~30s+ left"
    assert [eta.duration(s) for s in (0.4, 59, 61, 3599, 3720)] == ["0s", "59s", "1m01s", "59m59s", "1h02m"]


class _Recorder:
    """Stands in for rich's Progress: keeps every update's description and fields."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, dict]] = []

    def get_time(self) -> float:
        return time.monotonic()

    def add_task(self, description: str, *, total: int, **fields) -> int:
        self.updates.append((description, fields))
        return 0

    def update(self, task: int, *, advance: int, description: str, **fields) -> None:
        self.updates.append((description, fields))


def test_the_run_shows_each_stages_estimate_and_a_cache_hit_says_so(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(bundled_samples_dir() / "nuclei_dsb2018_a.png", data / "nuclei_dsb2018_a.png")
    opts = BenchOptions(
        preset="esp-medsam-tiny", imgsz=128, data=data, targets="onnx,trt-fp32", runs=1, warmup=0, threads=2,
        out=tmp_path / "out",
    )
    progress, lines = _Recorder(), []
    rep = harness.run_benchmark(opts, log=lines.append, progress=progress)
    assert [r["status"] for r in rep.rows] == ["ok", "ok", "unavailable"]
    assert any(line.startswith("estimated time left: ~") for line in lines)
    fields = dict(progress.updates)
    assert fields["onnx: export"]["stage_s"] > 0 and fields["onnx: measure"]["stage_s"] > 0
    assert fields["torch: measure"]["after_s"] > fields["onnx: measure"]["after_s"] > 0
    assert fields["model"]["after_s"] is None  # no estimate before the model is known

    # the same run again: onnx's export is cached, estimated at 0 and shown as such
    samples = list_samples(data)
    est = estimator(
        opts, select_rows(opts.targets), rep.host, model=rep.model, images=len(samples), gemm=rep.gemm,
        gemm_s=0.0, out=opts.out,
    )
    assert est.cached == {"onnx"}
    again = _Recorder()
    track = Tracker(again, total=2)
    track.estimator = est
    track.begin(eta.Stage("onnx", "export", target="onnx"), "onnx: export", 0)
    description, shown = again.updates[-1]
    assert description == "onnx: export (cached)" and shown["stage_s"] == 0.0
