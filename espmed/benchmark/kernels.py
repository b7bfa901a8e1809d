"""Which kernels ran: one profiled pass per benchmark row, as shares of the profiled time.

- OpenVINO: the CPU plugin's perf counters at the row's own inference precision
  (`profile.profile_openvino`): per executed primitive type (`brgemm_avx512_bf16`, `jit_avx512_f32`,
  ...) and per op type.
- ONNX Runtime: its profiler's trace of one run after a warm-up, with the segmenter's own session
  options and providers: per kernel (op type @ execution provider), op type and provider.
- torch eager: `torch.profiler`'s self CPU time per aten op.

Each profiles a separate session/compile after the timed runs, so the timings stay unprofiled.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from espmed.errors import first_line


def shares(ms: dict[str, float]) -> dict[str, float]:
    """Each name's share of the summed time, largest first."""
    total = sum(ms.values())
    return {k: v / total for k, v in sorted(ms.items(), key=lambda kv: -kv[1])} if total > 0 else {}


def _batch(seg, x: np.ndarray) -> np.ndarray:
    """`x` (1, 3, S, S) repeated to the artifact's fixed batch."""
    return np.ascontiguousarray(np.repeat(x, seg.metadata.batch or 1, axis=0), dtype=np.float32)


def openvino_kernels(seg, x: np.ndarray, threads: int | None) -> dict:
    from .profile import profile_openvino

    prof = profile_openvino(seg.source, threads, seg.precision, runs=1, x=_batch(seg, x))
    return {
        "source": "openvino perf counters",
        "precision": seg.precision,
        "total_ms": prof["total_ms"],
        "by_kernel": shares(prof["groups"]["kernel"]),
        "by_op": shares(prof["groups"]["op"]),
    }


def ort_trace_kernels(events: list[dict]) -> dict:
    """Time shares of the last `model_run` in an ONNX Runtime profiler trace (Chrome trace events)."""
    runs = [e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = max(runs, default=0)
    groups: dict[str, dict[str, float]] = {g: defaultdict(float) for g in ("kernel", "op", "provider")}
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < start or not e["name"].endswith("_kernel_time"):
            continue
        op, provider = e["args"]["op_name"], e["args"].get("provider", "unknown")
        ms = e["dur"] / 1e3
        groups["kernel"][f"{op}@{provider.removesuffix('ExecutionProvider')}"] += ms
        groups["op"][op] += ms
        groups["provider"][provider] += ms
    if not groups["op"]:
        raise ValueError("the ONNX Runtime trace has no node events")
    return {
        "source": "onnxruntime profiler",
        "total_ms": sum(groups["op"].values()),
        "by_kernel": shares(groups["kernel"]),
        "by_op": shares(groups["op"]),
        "by_provider": shares(groups["provider"]),
    }


def onnxruntime_kernels(seg, x: np.ndarray, threads: int | None) -> dict:
    import onnxruntime as ort

    opts = seg.session.get_session_options()
    feed = {seg.metadata.input_name: _batch(seg, x)}
    with tempfile.TemporaryDirectory(prefix="espmed-ort-profile-") as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "trace")
        session = ort.InferenceSession(str(seg.source), sess_options=opts, providers=seg.session.get_providers())
        session.run(None, feed)  # warm-up: first-run allocations and thread-pool start
        session.run(None, feed)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text(encoding="utf-8"))
    return ort_trace_kernels(events)


def torch_kernels(seg, x: np.ndarray, threads: int | None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    x = _batch(seg, x)
    seg.run(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seg.run(x)
    ms = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return {"source": "torch.profiler self CPU time", "total_ms": sum(ms.values()), "by_op": shares(ms)}


_PROFILERS = {"openvino": openvino_kernels, "onnxruntime": onnxruntime_kernels, "torch": torch_kernels}


def row_kernels(seg, x: np.ndarray, threads: int | None) -> dict | None:
    """The kernel shares of `seg` on `x` (1, 3, S, S); None for a backend without a profiler here
    (TensorRT, Triton); `{"error": ...}` when profiling fails, which must not fail the row."""
    profiler = _PROFILERS.get(seg.backend)
    if profiler is None:
        return None
    try:
        return profiler(seg, x, threads)
    except Exception as exc:  # noqa: BLE001 - a profiling failure is recorded, the row's measurements stand
        return {"error": first_line(exc, with_type=True)}
