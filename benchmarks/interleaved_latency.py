"""Latency ratios of several artifacts measured interleaved, in one process, on one input.

    A=benchmarks/results/shipped-model-int8/artifacts
    python benchmarks/interleaved_latency.py openvino=$A/openvino/esp-medsam-real_microscopy_openvino.xml@f32 \
        openvino-bf16=$A/openvino/esp-medsam-real_microscopy_openvino.xml@bf16 \
        openvino-int8-bf16=$A/openvino-int8/esp-medsam-real_microscopy_openvino-int8.xml@bf16 [--rounds 10 --runs 5]

`espmed bench` measures one target after another, each in its own worker; on a shared 2-core
machine a burst of load from elsewhere then lands on one target only (the same INT8 model measured
261 and 294 ms minutes apart). Here every round times each artifact `--runs` times in turn, so a
burst hits all of them; the ratio of each artifact to the first one is taken per round and its median reported.
Writes the table as JSON and Markdown beside `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from espmed.atomic import write_text
from espmed.machine import cpu_info
from espmed.runtimes import load


def parse_entry(text: str) -> tuple[str, Path, str | None]:
    """`label=path[@precision]` -> (label, path, precision or None: the artifact's own)."""
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH[@PRECISION], got {text!r}")
    path, _, precision = rest.partition("@")
    return label, Path(path), precision or None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("entries", nargs="+", type=parse_entry, help="LABEL=PATH[@PRECISION]; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5, help="timed calls per artifact per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", type=Path, default=None, help="input image (default: seeded noise at input size)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/interleaved_latency.json"))
    args = ap.parse_args(argv)

    segmenters = {label: load(path, precision=precision, threads=args.threads, verify=False)
                  for label, path, precision in args.entries}
    first = next(iter(segmenters.values()))
    if args.image is not None:
        from espmed.io import read_frame

        x = first.preprocess(read_frame(args.image))[0][None]
    else:  # noise in the input's [0, 1] range (the shipped model takes x / 255)
        size = first.metadata.input_size
        x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    for seg in segmenters.values():  # warm-up: compile-time work and first-call allocations
        seg.run(x)
        seg.run(x)

    times: dict[str, list[list[float]]] = {label: [] for label in segmenters}
    for r in range(args.rounds):
        for label, seg in segmenters.items():
            round_ms = []
            for _ in range(args.runs):
                t = time.perf_counter()
                seg.run(x)
                round_ms.append(1e3 * (time.perf_counter() - t))
            times[label].append(round_ms)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{label} {statistics.median(times[label][-1]):.0f} ms" for label in segmenters), flush=True)

    base = next(iter(segmenters))
    base_rounds = [statistics.median(t) for t in times[base]]
    rows = []
    for label, path, precision in args.entries:
        per_round = [statistics.median(t) for t in times[label]]
        ratios = [b / m for b, m in zip(base_rounds, per_round, strict=True)]
        rows.append({
            "label": label, "artifact": str(path), "precision": getattr(segmenters[label], "precision", precision),
            "median_ms": statistics.median(v for t in times[label] for v in t),
            "round_medians_ms": per_round, "speedup_vs_first_median": statistics.median(ratios),
            "speedup_vs_first_min": min(ratios), "speedup_vs_first_max": max(ratios),
        })
    record = {"cpu": cpu_info().get("model", "unknown"), "machine": platform.machine(), "threads": args.threads,
              "rounds": args.rounds, "runs_per_round": args.runs, "baseline": base, "rows": rows}
    lines = [f"# Interleaved latency ({record['cpu']}, {args.threads} threads, {args.rounds} rounds x "
             f"{args.runs} calls each)", "",
             f"Speed-up = {base}'s round median / the row's, median (min-max) over rounds.", "",
             "| artifact | precision | median ms | speed-up vs first |", "|---|---|---:|---:|"]
    lines += [f"| {r['label']} | {r['precision']} | {r['median_ms']:.1f} | {r['speedup_vs_first_median']:.2f}x "
              f"({r['speedup_vs_first_min']:.2f}-{r['speedup_vs_first_max']:.2f}) |" for r in rows]
    write_text(args.out, json.dumps(record, indent=1) + "\n")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines[4:]))


if __name__ == "__main__":
    main()
