"""Re-draw a recorded bench's CSV, Markdown and latency-vs-Dice chart from its bench.json.

    python benchmarks/render_bench.py benchmarks/results/shipped-model/bench.json [--out DIR]

Results keep only bench.json and bench.md in git; this writes bench.csv, bench.md and bench.png
beside the JSON (or into --out) exactly as `espmed bench` wrote them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from espmed.benchmark.report import load_report, render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--out", type=Path, help="Folder to write into (default: the JSON's own).")
    args = parser.parse_args()
    for path in render(load_report(args.bench_json), args.out or args.bench_json.parent).values():
        print(path)


if __name__ == "__main__":
    main()
