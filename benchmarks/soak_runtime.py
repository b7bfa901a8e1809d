"""Soak test: one runtime object, many threads x many calls -> identical masks, bounded RSS.

    python benchmarks/soak_runtime.py                       # tiny random model exported to ONNX
    python benchmarks/soak_runtime.py --model model.onnx --threads 8 --calls 200

Every call segments one of the bundled sample images and must return exactly the mask of a
single-threaded reference run. RSS (psutil) is sampled after a warm-up, during the run and at the
end; the run fails when it grows by more than `--rss-bound-mib`. Writes
`benchmarks/results/soak_runtime.json` (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "espmed" / "assets" / "samples"
RESULTS = REPO / "benchmarks" / "results" / "soak_runtime.json"
#: Allowed RSS growth from after the threaded warm-up to the end of the soak.
DEFAULT_RSS_BOUND_MIB = 32.0


def sample_images() -> list[np.ndarray]:
    from espmed.io import read_image

    return [read_image(p).frames[0] for p in sorted(SAMPLES.glob("*.png"))]


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def soak(
    segmenter, images: list[np.ndarray], threads: int, calls: int, warmup_calls: int = 10, sample_every: int = 25
) -> dict:
    """`threads` workers x `calls` predictions each on one shared segmenter; checks every mask.

    RSS is taken as the baseline after a threaded warm-up (`warmup_calls` per thread), so the
    one-time per-thread costs (malloc arenas, backend scratch buffers) are not counted as growth.
    """
    reference = [segmenter.predict(im).mask for im in images]
    rss_single = rss_mib()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(
            lambda t: [segmenter.predict(images[(t + c) % len(images)]) for c in range(warmup_calls)], range(threads)
        ))
    rss_before = rss_mib()
    samples: list[tuple[float, float]] = []
    start = time.perf_counter()
    lock = threading.Lock()
    mismatches: list[str] = []

    def worker(t: int) -> int:
        done = 0
        for c in range(calls):
            i = (t + c) % len(images)
            mask = segmenter.predict(images[i]).mask
            if not np.array_equal(mask, reference[i]):
                with lock:
                    mismatches.append(f"thread {t} call {c} image {i}")
            done += 1
            if c % sample_every == 0:
                with lock:
                    samples.append((time.perf_counter() - start, rss_mib()))
        return done

    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(worker, range(threads)))
    seconds = time.perf_counter() - start
    rss_after = rss_mib()
    return {
        "threads": threads,
        "calls_per_thread": calls,
        "total_calls": total,
        "identical_masks": total - len(mismatches),
        "mismatches": mismatches[:20],
        "seconds": round(seconds, 2),
        "calls_per_second": round(total / seconds, 1),
        "rss_mib_single_thread_warm": round(rss_single, 1),
        "rss_mib_before": round(rss_before, 1),
        "rss_mib_peak_during": round(max([r for _, r in samples] + [rss_after]), 1),
        "rss_mib_after": round(rss_after, 1),
        "rss_growth_mib": round(rss_after - rss_before, 1),
        "rss_mib_timeline": [[round(t, 1), round(r, 1)] for t, r in sorted(samples)],
    }


def tiny_onnx(folder: Path) -> Path:
    """A random-weight tiny ESP-MedSAM (256 px) exported to ONNX with a dynamic batch."""
    from espmed.benchmark.weights import randomise_
    from espmed.export import export
    from espmed.model import ESPMedSAM, get_preset, save_checkpoint

    model = randomise_(ESPMedSAM(get_preset("esp-medsam-tiny")), seed=0)
    checkpoint = save_checkpoint(model.eval(), folder / "tiny.safetensors")
    return export(checkpoint, "onnx", folder / "tiny.onnx", modality="fundus", dynamic=True, simplify="none").artifact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="artifact to load (default: a tiny random model exported to ONNX)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200, help="calls per thread")
    parser.add_argument("--backend-threads", type=int, default=None, help="intra-op threads of the backend")
    parser.add_argument("--rss-bound-mib", type=float, default=DEFAULT_RSS_BOUND_MIB)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from espmed.atomic import write_text
    from espmed.runtimes import load

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or tiny_onnx(Path(tmp))
        segmenter = load(model_path, threads=args.backend_threads)
        rss_loaded = rss_mib()
        images = sample_images()
        result = soak(segmenter, images, args.threads, args.calls)
    import onnxruntime

    default_model = "esp-medsam-tiny random weights, fundus controller, ONNX (dynamic batch), 256 px"
    result.update({
        "model": str(args.model) if args.model else default_model,
        "backend": segmenter.backend,
        "images": [f"{im.shape[1]}x{im.shape[0]}" for im in images],
        "rss_mib_after_load": round(rss_loaded, 1),
        "rss_bound_mib": args.rss_bound_mib,
        "within_bound": result["rss_growth_mib"] <= args.rss_bound_mib,
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__
        },
    })
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = result["identical_masks"] == result["total_calls"] and result["within_bound"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
