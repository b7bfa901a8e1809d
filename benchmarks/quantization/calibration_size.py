"""How INT8 Dice and speed vary with the number of calibration images (OpenVINO, NNCF).

    python benchmarks/quantization/calibration_size.py --calib runs/calib/ct-lesion -m ct-lesion \
        [--sizes 4,8,16,30] [--checkpoint PATH] [--results benchmarks/results/quantization]

Quantizes the model's FP32 IR as `espmed export --target openvino-int8` does (the recipe beside the
checkpoint gives the float layers, the SmoothQuant alpha and the runtime precision) with the first
N images of an evenly spaced order of the calibration folder, and judges each against the FP32 IR on
the held-out images (Dice per image) and by latency, in one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from make_calibration import evenly  # the sibling scripts
from sensitivity import Judge

from espmed.atomic import file_sha256, write_text
from espmed.export import export
from espmed.export.accuracy import Gate
from espmed.export.calibration import load_calibration
from espmed.export.manifest import files_sha256
from espmed.export.openvino_export import (
    QUANTIZABLE_OV_TYPES,
    NncfSettings,
    nncf_quantize,
    ops_of_types,
    with_fp16_weights,
)
from espmed.export.recipe import find_recipe
from espmed.runtimes import load


def main(argv: list[str] | None = None) -> None:
    import nncf
    import openvino as ov

    from espmed.model import default_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("-m", "--modality", required=True)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--sizes", default="4,8,16,30")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/calibration-size"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/quantization"))
    args = ap.parse_args(argv)
    nncf.set_log_level(logging.ERROR)
    checkpoint = args.checkpoint or default_checkpoint()
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = find_recipe(None, checkpoint, file_sha256(checkpoint))
    fp32 = export(checkpoint, "openvino", args.work, modality=args.modality, calib=args.calib)
    reference = load(fp32.artifact, verify=False, threads=args.threads)
    meta, pre = reference.metadata, reference.metadata.preprocessing
    images = load_calibration(args.calib, meta.input_size, pre["mean"], pre["std"], pre["resize"])
    gate = Gate.build(reference, {im.path.name: im.image for im in images.held_out}, max_drop=0.02,
                      threshold=pre["mask_threshold"], batch=1)
    judge = Judge(gate, meta, args.work, args.threads)
    source = with_fp16_weights(ov.Core().read_model(str(fp32.artifact)), args.work / "fp16-weights.xml")  # as export
    names = ops_of_types(source, QUANTIZABLE_OV_TYPES)
    float_layers = recipe.float_layers("openvino", names) if recipe else []
    settings = NncfSettings(smooth_quant_alpha=recipe.smooth_quant_alpha if recipe else None)
    precision = (recipe.runtime_precision if recipe else None) or "f32"
    x = images.held_out[0].x[None]
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        picked = evenly(images.calibration, n)
        t = time.time()
        model = nncf_quantize(source, [im.x[None] for im in picked], settings=settings, float_layers=float_layers)
        seconds = time.time() - t
        c = judge.compare(model, precision)
        rows.append({"images": len(picked), "sha256": files_sha256(im.path for im in picked),
                     "min_dice": min(c.dice), "mean_dice": float(np.mean(c.dice)), "dice": c.dice,
                     "ms": judge.latency_ms(model, precision, x), "quantize_s": seconds})
        print(f"{len(picked):3d} images: min Dice {min(c.dice):.4f}, mean {np.mean(c.dice):.4f}, "
              f"{rows[-1]['ms']:.0f} ms, quantized in {seconds:.0f} s", flush=True)
    result = {"modality": args.modality, "recipe": recipe.source if recipe else None, "precision": precision,
              "float_layers": len(float_layers), "nncf": settings.describe(), "held_out": len(gate.images),
              "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    write_text(args.results / f"calibration-size-{args.modality}.json", json.dumps(result, indent=1) + "\n")
    lines = [f"# INT8 calibration size: {args.modality} (OpenVINO, runtime {precision}, "
             f"{len(float_layers)} float layers from the recipe)", "",
             f"Held out: {len(gate.images)} images; Dice vs OpenVINO FP32.", "",
             "| calibration images | min Dice | mean Dice | latency ms | quantize s |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['images']} | {r['min_dice']:.4f} | {r['mean_dice']:.4f} | {r['ms']:.0f} | {r['quantize_s']:.0f} |"
              for r in rows]
    write_text(args.results / f"calibration-size-{args.modality}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
