"""Triton with dynamic batching vs one local runtime: images/s and latency at 1, 4 and 8 clients.

    python benchmarks/triton_concurrency.py                  # tiny random model, 256 px, ONNX Runtime
    python benchmarks/triton_concurrency.py --requests 40    # requests per client (default 24)

Same machine, same backend: the local side is one `espmed.runtimes` ONNX Runtime Segmenter shared by
the client threads; the server side is pytriton's `tritonserver` serving the exported Python-backend
repository, whose model.py runs the same ONNX file with ONNX Runtime, reached through one shared
`triton://` Segmenter (gRPC, images in, masks out). Each client sends its requests one after the
other (a closed loop). The server's own counters give the mean batch it formed. Writes
`benchmarks/results/triton_concurrency.{json,md}` (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from soak_runtime import sample_images, tiny_onnx

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLIENTS = (1, 4, 8)


def closed_loop(segmenter, images: list[np.ndarray], *, clients: int, requests: int) -> dict:
    """`clients` threads, each predicting `requests` images one after another on one shared Segmenter."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        mine = []
        for i in range(requests):
            t = time.perf_counter()
            segmenter.predict(images[(k + i) % len(images)])
            mine.append((time.perf_counter() - t) * 1e3)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"clients": clients, "seconds": seconds, "latencies_ms": latencies}


def combined(measured: list[dict]) -> dict:
    """One row from several closed-loop rounds: images/s over their total time, latency percentiles."""
    lat = np.asarray([v for m in measured for v in m["latencies_ms"]])
    seconds = sum(m["seconds"] for m in measured)
    return {
        "clients": measured[0]["clients"],
        "requests": len(lat),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(lat) / seconds, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
    }


def server_counts(metrics_url: str, model: str) -> tuple[float, float]:
    """(requests, executions) the server has counted for `model`."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    pattern = rf'^(nv_inference_(?:count|exec_count))\{{model="{model}",version="1"\}} (\S+)$'
    found = dict(re.findall(pattern, text, re.M))
    return float(found["nv_inference_count"]), float(found["nv_inference_exec_count"])


def run(images: list[np.ndarray], *, requests: int, warmup: int, rounds: int, folder: Path) -> dict:
    """Local and Triton measured in alternation, `rounds` times per client count, so that a change in
    the machine's load during the run falls on both sides alike."""
    from espmed.export import export
    from espmed.runtimes import load
    from espmed.runtimes.triton_server import LocalTritonServer

    onnx = tiny_onnx(folder)
    local = load(onnx)
    repository = export(onnx, "triton", folder / "triton", triton_max_batch=8).artifact
    settings = json.loads((repository / "espmed-triton.manifest.json").read_text())["triton"]
    model = settings["model"]
    rows = []
    with LocalTritonServer(repository) as server:
        remote = load(f"{server.url}/{model}")
        for im in images[:warmup]:
            local.predict(im)
            remote.predict(im)
        for n in CLIENTS:
            parts: dict[str, list[dict]] = {"local": [], "triton": []}
            before = server_counts(server.metrics_url, model)
            for _ in range(rounds):
                parts["local"].append(closed_loop(local, images, clients=n, requests=requests))
                parts["triton"].append(closed_loop(remote, images, clients=n, requests=requests))
            after = server_counts(server.metrics_url, model)
            for side, measured in parts.items():
                rows.append({"side": side, **combined(measured)})
            rows[-1]["mean_server_batch"] = round((after[0] - before[0]) / max(1.0, after[1] - before[1]), 2)
    return {"rows": rows, "input_size": local.input_size, "triton": settings}


def summary(rows: list[dict]) -> dict:
    by = {(r["side"], r["clients"]): r for r in rows}
    one_local, one_remote = by[("local", 1)], by[("triton", 1)]
    return {
        "overhead_at_1_client": round(one_local["images_per_s"] / one_remote["images_per_s"] - 1.0, 3),
        "p50_overhead_ms_at_1_client": round(one_remote["p50_ms"] - one_local["p50_ms"], 1),
        "triton_8_clients_vs_local_1_client": round(by[("triton", 8)]["images_per_s"] / one_local["images_per_s"], 2),
        "triton_vs_local_at_8_clients": round(by[("triton", 8)]["images_per_s"] / by[("local", 8)]["images_per_s"], 2),
    }


def markdown(result: dict) -> str:
    lines = [
        "# Triton (dynamic batching) vs one local runtime",
        "",
        f"{result['model']}; {len(result['images'])} bundled sample images ({', '.join(result['images'])}), "
        f"{result['requests_per_client']} requests per client and round, {result['rounds']} rounds alternating "
        "local and Triton, closed loop. Backend on both sides: ONNX Runtime "
        "(Triton: the exported Python-backend repository, whose model.py runs espmed.runtimes' ONNX Runtime "
        f"Segmenter). {result['machine']['cpus']} CPU cores shared by the server and the clients; 1-min load "
        f"average {result['load_average'][0]:.1f} before, {result['load_average'][1]:.1f} after.",
        "",
        "| side | clients | images/s | p50 ms | p95 ms | mean server batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        batch = r.get("mean_server_batch", "")
        cells = (r["side"], r["clients"], r["images_per_s"], r["p50_ms"], r["p95_ms"], batch)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    s = result["summary"]
    lines += [
        "",
        f"- Overhead at 1 client (local images/s / Triton images/s - 1): {100 * s['overhead_at_1_client']:.1f} % "
        f"(p50 +{s['p50_overhead_ms_at_1_client']} ms). Target: <= 15 %.",
        f"- Triton at 8 clients vs local at 1 client: {s['triton_8_clients_vs_local_1_client']}x "
        "(target: >= 1).",
        f"- Triton vs local, both at 8 clients: {s['triton_vs_local_at_8_clients']}x.",
        "",
        result["note"],
        "",
    ]
    return "\n".join(lines)


NOTE = (
    "What sharing the cores measures: server and clients run on the same cores, so these figures are "
    "the cost of the serving path (gRPC, the Python backend's shared-memory hop, the batcher's queue) "
    "and the gain of batching on one CPU, not what a separate inference server adds: on a real "
    "deployment the clients' decode/encode and the server's compute do not compete, and a GPU server "
    "with the TensorRT plan batches far more cheaply than a CPU. The local runtime at N clients is "
    "N threads on one ONNX Runtime session (itself using every core), the fair single-box baseline."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24, help="requests per client")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternating local/Triton rounds per client count")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import onnxruntime

    from espmed.atomic import write_text
    from espmed.runtimes.triton_server import missing

    if missing():
        print(f"error: {missing()}", file=sys.stderr)
        return 1
    images = sample_images()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        measured = run(images, requests=args.requests, warmup=args.warmup, rounds=args.rounds, folder=Path(tmp))
    result = {
        "model": f"esp-medsam-tiny random weights, ONNX (dynamic batch), {measured['input_size']} px",
        "images": [f"{im.shape[1]}x{im.shape[0]}" for im in images],
        "requests_per_client": args.requests,
        "rounds": args.rounds,
        "triton": measured["triton"],
        "rows": measured["rows"],
        "summary": summary(measured["rows"]),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
        },
        "note": NOTE,
    }
    write_text(args.out / "triton_concurrency.json", json.dumps(result, indent=2) + "\n")
    write_text(args.out / "triton_concurrency.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
