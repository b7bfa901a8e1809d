"""Which kernels ran: the bench's profiled pass per backend, on the tiny exported artifacts."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import numpy as np
import pytest

from espmed.benchmark import kernels, report
from espmed.machine import cpu_info
from espmed.runtimes import load

from .runtime_artifacts import build_artifacts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")


def _input(seg) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, seg.input_size, seg.input_size)).astype(np.float32)


def _share_ending(by_kernel: dict[str, float], suffix: str) -> float:
    return sum(share for name, share in by_kernel.items() if name.endswith(suffix))


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_openvino_kernels_run_at_the_rows_precision(artifacts, precision):
    seg = load(artifacts["openvino"], threads=2, precision=precision)
    runs = precision if cpu_info()["bf16"] else "f32"  # without native BF16 a bf16 request runs in f32
    k = kernels.row_kernels(seg, _input(seg), 2)
    assert "error" not in k and k["precision"] == runs and k["total_ms"] > 0
    assert _share_ending(k["by_kernel"], f"_{runs}") > 0.5, k["by_kernel"]
    assert any(name.startswith(("brgemm", "gemm", "jit")) for name in k["by_kernel"])
    assert {"FullyConnected", "Convolution"} & set(k["by_op"])
    assert sum(k["by_kernel"].values()) == pytest.approx(1.0) and sum(k["by_op"].values()) == pytest.approx(1.0)


def test_openvino_fixed_batch_artifact_is_profiled(artifacts):
    seg = load(artifacts["openvino_b2"], threads=2)
    assert _share_ending(kernels.row_kernels(seg, _input(seg), 2)["by_kernel"], "_f32") > 0.5


def test_onnxruntime_kernels_come_from_its_profiler_and_leave_no_trace(artifacts, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seg = load(artifacts["onnx"], threads=2)
    k = kernels.row_kernels(seg, _input(seg), 2)
    assert "error" not in k and k["total_ms"] > 0
    assert any("Conv" in op or "MatMul" in op for op in k["by_op"]), k["by_op"]
    assert set(k["by_provider"]) == {"CPUExecutionProvider"}
    assert all(name.endswith("@CPU") for name in k["by_kernel"])
    assert list(tmp_path.iterdir()) == []


def test_ort_trace_counts_only_the_last_run():
    def node(ts, op, dur):
        return {"cat": "Node", "ts": ts, "dur": dur, "name": f"n{ts}_kernel_time",
                "args": {"op_name": op, "provider": "CPUExecutionProvider"}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        node(1, "Softmax", 90),
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        node(201, "MatMul", 3000), node(205, "Softmax", 1000),
        {"cat": "Node", "ts": 210, "dur": 500, "name": "n210_fence_before", "args": {"op_name": "Add"}},
    ]
    k = kernels.ort_trace_kernels(events)
    assert k["total_ms"] == pytest.approx(4.0)
    assert k["by_op"] == {"MatMul": 0.75, "Softmax": 0.25}
    assert list(k["by_kernel"]) == ["MatMul@CPU", "Softmax@CPU"]
    with pytest.raises(ValueError, match="no node events"):
        kernels.ort_trace_kernels(events[:1])


def test_a_profiling_failure_is_recorded_not_raised():
    class BrokenSession:
        def get_session_options(self):
            raise RuntimeError("profiler exploded\nsecond line")

    seg = SimpleNamespace(backend="onnxruntime", session=BrokenSession(), metadata=SimpleNamespace(batch=1))
    assert kernels.row_kernels(seg, np.zeros((1, 3, 32, 32), np.float32), 2) == {
        "error": "RuntimeError: profiler exploded"
    }
    assert kernels.row_kernels(SimpleNamespace(backend="tensorrt"), np.zeros((1, 3, 32, 32)), 2) is None


def test_kernel_lines_list_the_top_kernels_and_failures():
    rows = [
        {"name": "openvino-int8", "kernels": {
            "total_ms": 12.0,
            "by_kernel": {"brgemm_avx512_i8": 0.38, "jit_avx512_bf16": 0.21, "reorder_bf16": 0.2, "ref_f32": 0.12,
                          "unknown_f32": 0.09},
            "by_op": {"FullyConnected": 1.0},
        }},
        {"name": "torch", "kernels": {"total_ms": 30.0, "by_op": {"aten::addmm": 0.6, "aten::gelu": 0.4}}},
        {"name": "onnx", "kernels": {"error": "RuntimeError: boom"}},
        {"name": "trt-fp32"},
    ]
    assert report.kernel_lines(SimpleNamespace(rows=rows)) == [
        "openvino-int8: brgemm_avx512_i8 38 %, jit_avx512_bf16 21 %, reorder_bf16 20 %, ref_f32 12 % (of 12.0 ms)",
        "torch: aten::addmm 60 %, aten::gelu 40 % (of 30.0 ms)",
        "onnx: not profiled (RuntimeError: boom)",
    ]
