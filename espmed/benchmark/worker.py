"""One backend, measured in a fresh process: `python -m espmed.benchmark.worker SPEC.json T0`.

`T0` is the parent's wall clock just before it started this process, so the cold start below is
process start -> first mask (interpreter start, imports, artifact load/compile, first image). The
worker imports only numpy, `espmed.runtimes` and the backend the artifact needs (torch only for
the torch reference), so its peak RSS is the backend's own: read after the load and a prediction of
every image (what a device's process holds), before the timing loop stacks every image's input.
It writes a result JSON (and, in full mode, every image's mask logits at the image's own size to an
`.npz`, then one profiled pass: which kernels ran, `espmed.benchmark.kernels`) and exits 0; on an
error it writes `{"status": "failed", "reason": ...}` and exits 1.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback

from espmed.errors import first_line

#: Warm latency percentiles reported.
PERCENTILES = (50, 95, 99)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image. `VmHWM` belongs to the address space made at
    exec; `ru_maxrss` would also carry the parent's peak across fork + exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure(spec: dict, t0: float) -> dict:
    import numpy as np

    from espmed.atomic import atomic_open
    from espmed.benchmark.kernels import row_kernels
    from espmed.io import read_frame
    from espmed.runtimes import load

    t_imported = time.time()
    seg = load(
        spec["artifact"],
        threads=spec.get("threads"),
        precision=spec.get("precision"),
        cache_dir=spec.get("cache_dir"),
        modality=spec.get("modality"),
        image_size=spec.get("image_size"),
    )
    t_loaded = time.time()
    samples = spec["samples"]
    boxes = spec.get("prompt") == "box"
    first_image = read_frame(samples[0]["image"])
    if boxes:
        h, w = first_image.shape[:2]
        first = seg.predict(first_image, boxes=[[0, 0, w - 1, h - 1]])
    else:
        first = seg.predict(first_image)
    t_first = time.time()
    result = {
        "status": "ok",
        "cold_start_s": t_first - t0,
        "cold_breakdown_s": {
            "start_and_imports": t_imported - t0,
            "load": t_loaded - t_imported,
            "first_mask": t_first - t_loaded,
        },
        "first_mask_pixels": int((first.masks if boxes else first.mask).sum()),
    }
    if spec.get("mode") == "cold":
        result["peak_rss_mb"] = _peak_rss_mb()
        return result
    if boxes:
        result.update(measure_boxes(seg, spec))
        return result

    images = [read_frame(s["image"]) for s in samples]
    logits, e2e = {}, []
    for s, image in zip(samples, images, strict=True):
        t = time.perf_counter()
        pred = seg.predict(image, return_logits=True)
        e2e.append((time.perf_counter() - t) * 1e3)
        logits[s["name"]] = pred.logits
    with atomic_open(spec["logits"], "wb") as fh:
        np.savez(fh, **logits)
    peak_rss_mb = _peak_rss_mb()  # what a device's process holds: load + predict every image

    size, meta = seg.input_size, seg.metadata
    x = np.stack([seg.preprocess(im)[0] for im in images])
    for i in range(spec["warmup"]):
        seg.run(x[i % len(x)][None])
    latencies = []
    for i in range(spec["runs"]):
        xi = x[i % len(x)][None]
        t = time.perf_counter()
        seg.run(xi)
        latencies.append((time.perf_counter() - t) * 1e3)
    lat = np.asarray(latencies)
    batch = int(spec.get("batch", 1))
    if batch > 1:
        xb = np.stack([x[i % len(x)] for i in range(batch)])
        seg.run(xb)
        batch_times = []
        for _ in range(max(2, spec["runs"] // batch)):
            t = time.perf_counter()
            seg.run(xb)
            batch_times.append(time.perf_counter() - t)
        throughput = batch / float(np.median(batch_times))
    else:
        throughput = 1e3 / float(np.median(lat))
    result.update(
        {
            "latency_ms": {f"p{p}": float(np.percentile(lat, p)) for p in PERCENTILES}
            | {"mean": float(lat.mean()), "min": float(lat.min()), "runs": len(latencies)},
            "end_to_end_ms_mean": float(np.mean(e2e)),
            "throughput_ips": throughput,
            "batch": batch,
            "peak_rss_mb": peak_rss_mb,
            "peak_rss_with_timing_inputs_mb": _peak_rss_mb(),  # + every image's model input held at once
            "runtime": {
                "backend": type(seg).backend,
                "target": meta.target,
                "precision": meta.precision,
                "inference_precision": getattr(seg, "precision", None),
                "input_size": size,
                "artifact_batch": meta.batch,
                "modality": meta.modality,
            },
        }
    )
    kernels = row_kernels(seg, x[:1], spec.get("threads"))  # after the timings and the peak RSS
    if kernels is not None:
        result["kernels"] = kernels
    return result


def components(mask):
    """(labels, boxes): the 8-connected components of a binary mask (label k + 1 = box k) and one box
    (x0, y0, x1, y1, inclusive) per component, in label order."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=[[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    boxes = [[s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1] for s in ndimage.find_objects(labels) if s]
    return labels, boxes


def measure_boxes(seg, spec: dict) -> dict:
    """Box prompts: per image one box per ground-truth component; the encoder timed per image, the
    prompt decoder per box (all of an image's boxes in one `decode`), Dice of each box's mask vs its
    component, and the union of the masks (as the max of their logits) written for the accuracy
    columns."""
    import numpy as np

    from espmed.atomic import atomic_open
    from espmed.io import read_frame, read_mask
    from espmed.metrics import dice

    samples = spec["samples"]
    images = [read_frame(s["image"]) for s in samples]
    truths = [read_mask(s["mask"]) for s in samples]
    union, box_dice, e2e, decoder_per_box, n_boxes = {}, [], [], [], 0
    for s, image, truth in zip(samples, images, truths, strict=True):
        labels, boxes = components(truth)
        if not boxes:
            continue
        t = time.perf_counter()
        pred = seg.decode(seg.embed(image), boxes, return_logits=True)
        e2e.append((time.perf_counter() - t) * 1e3)
        decoder_per_box.append(pred.timings["decoder"] / len(boxes))
        n_boxes += len(boxes)
        union[s["name"]] = pred.logits.max(axis=0)
        box_dice += [dice(pred.masks[k], labels == k + 1) for k in range(len(boxes))]
    with atomic_open(spec["logits"], "wb") as fh:
        np.savez(fh, **union)
    peak_rss_mb = _peak_rss_mb()
    x = [seg.preprocess(im)[0][None] for im in images]
    embedding = seg._embed(x[0])
    for i in range(spec["warmup"]):
        seg._embed(x[i % len(x)])
    encoder = []
    for i in range(spec["runs"]):
        t = time.perf_counter()
        seg._embed(x[i % len(x)])
        encoder.append((time.perf_counter() - t) * 1e3)
    one_box = np.asarray([[0.0, 0.0, seg.input_size / 2, seg.input_size / 2]], np.float32)
    single = []
    for _ in range(spec["runs"]):
        t = time.perf_counter()
        seg._decode(embedding, one_box)
        single.append((time.perf_counter() - t) * 1e3)
    lat, single = np.asarray(encoder), np.asarray(single)
    meta = seg.metadata
    return {
        "latency_ms": {f"p{p}": float(np.percentile(lat, p)) for p in PERCENTILES}
        | {"mean": float(lat.mean()), "min": float(lat.min()), "runs": len(lat)},
        "decoder_ms_per_box": {
            "one_box_p50": float(np.percentile(single, 50)),
            "one_box_p95": float(np.percentile(single, 95)),
            "in_image_batches_mean": float(np.mean(decoder_per_box)),
        },
        "boxes": n_boxes,
        "box_dice_vs_truth_mean": float(np.mean(box_dice)),
        "end_to_end_ms_mean": float(np.mean(e2e)),
        "throughput_ips": 1e3 / float(np.median(lat)),
        "batch": 1,
        "peak_rss_mb": peak_rss_mb,
        "runtime": {
            "backend": type(seg).backend, "target": meta.target, "precision": meta.precision,
            "inference_precision": getattr(seg, "precision", None), "input_size": seg.input_size,
            "artifact_batch": meta.batch, "modality": meta.modality, "graph": meta.graph,
        },
    }


def main(argv: list[str]) -> int:
    spec_path, t0 = argv[0], float(argv[1])
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    try:
        result = measure(spec, t0)
        code = 0
    except Exception as exc:  # noqa: BLE001 - every failure becomes a status the parent reports
        result = {
            "status": "failed",
            "reason": first_line(exc, with_type=True),
            "traceback": traceback.format_exc(limit=8),
        }
        code = 1
    from espmed.atomic import write_text

    write_text(spec["result"], json.dumps(result, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
