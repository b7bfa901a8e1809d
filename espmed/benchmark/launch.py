"""The parent's side of a worker process (`espmed.benchmark.worker`): its launch with the run's
thread count, the local server a served row is measured through, and OpenVINO's cold starts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..atomic import write_text
from ..runtimes.formats import Format

#: OpenVINO rows' cold-start-only workers (`cached_cold_starts`): one fills the cache, one reads it.
COLD_STARTS = 2


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


@contextlib.contextmanager
def served(row: Format, artifact: Path) -> Iterator[Path | str]:
    """Where the worker loads `artifact`: the artifact, or for a served row (Triton) the URL of its
    model on a local server started for the measurement (the worker is its only client)."""
    if row.scheme is None:
        yield artifact
        return
    from ..runtimes.triton_server import LocalTritonServer

    model = json.loads((artifact / row.marker).read_text(encoding="utf-8"))["triton"]["model"]
    with LocalTritonServer(artifact) as server:
        yield f"{server.url}/{model}"


def cached_cold_starts(spec: dict, cache: Path, worker: Callable[[dict], dict]) -> dict:
    """OpenVINO: a cold start that fills a compiled-model cache in `cache`, then one that reads it."""
    shutil.rmtree(cache, ignore_errors=True)
    cold = {**spec, "mode": "cold", "cache_dir": str(cache)}
    filled = worker(cold)
    cached = worker(cold) if filled["status"] == "ok" else filled
    return {
        "cold_start_cache_fill_s": filled.get("cold_start_s"),
        "cold_start_cached_s": cached.get("cold_start_s"),
        "cold_cached_breakdown_s": cached.get("cold_breakdown_s"),
    }
