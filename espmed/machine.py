"""What machine this is: CPU model, cores, ISA flags, memory, NVIDIA GPU, GEMM peak.

Its own layer (the standard library and psutil only): the benchmark reports these facts, and
training picks its autocast by the CPU's flags. The GEMM peak is measured, not looked up: the best
FP32 matrix-multiply rate numpy reaches with the benchmark's thread count (in a child process).
Achieved GFLOP/s of each backend is reported as a share of it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

#: /proc/cpuinfo flags that decide which kernels a backend can use (reported when present).
ISA_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_info(cpuinfo_text: str | None = None) -> dict:
    """CPU model, logical/physical cores and the ISA flags from `ISA_FLAGS` that are present."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                cpuinfo_text = fh.read()
        except OSError:
            cpuinfo_text = ""
    model, flags, cores = platform.processor() or platform.machine(), set(), set()
    physical_id = "0"
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {
        "model": model,
        "architecture": platform.machine(),
        "logical_cores": logical,
        "physical_cores": len(cores) or None,
        "flags": [f for f in ISA_FLAGS if f in flags],
        "avx512": "avx512f" in flags,
        "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "amx": "amx_tile" in flags,
    }


def memory_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def has_nvidia_gpu() -> bool:
    """True when `nvidia-smi` lists at least one GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


_GEMM_SCRIPT = """
import json, sys, time
import numpy as np
sizes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
best = {}
for n in sizes:
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); a @ b; times.append(time.perf_counter() - t0)
    best[n] = 2.0 * n ** 3 / min(times) / 1e9
print(json.dumps(best))
"""


def gemm_peak_gflops(threads: int, sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 5) -> dict:
    """Best FP32 GEMM rate (GFLOP/s, 2 n^3 per n x n product) over `sizes` with `threads` threads.

    Runs in a fresh process so that the BLAS thread pool really has `threads` threads.
    """
    import json

    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    out = subprocess.run(
        [sys.executable, "-c", _GEMM_SCRIPT, json.dumps(list(sizes)), str(repeats)],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )
    per_size = {int(k): round(v, 1) for k, v in json.loads(out.stdout).items()}
    return {"gflops": max(per_size.values()), "per_size": per_size, "threads": threads, "library": "numpy"}


def machine_info() -> dict:
    """Everything about the host that a reader needs to interpret the numbers."""
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu_info(),
        "memory_gib": memory_gib(),
        "nvidia_gpu": has_nvidia_gpu(),
    }
