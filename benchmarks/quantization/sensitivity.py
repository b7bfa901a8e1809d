"""Which blocks must stay float in INT8: a per-block sensitivity ranking, run once per model.

    python benchmarks/quantization/sensitivity.py --calib runs/calib/ct-lesion -m ct-lesion \
        [--checkpoint PATH] [--alpha 0.5] [--recipe OUT.json] [--results benchmarks/results/quantization]

1. Export the model's OpenVINO FP32 IR (`espmed export`'s path, gated against torch) and quantize
   all of it with NNCF as `espmed export --target openvino-int8` does (same settings).
2. Profile that INT8 model (CPU perf counters) for each block's share of run time.
3. For each block (about 20: patch embed, the conv stage, each TinyViT block, the downsamples,
   neck, SPPG, the decoder's parts), measure on the held-out images, against the FP32 IR:
   the Dice of the INT8 model with only that block quantized (its cost). A block goes back to float
   by bypassing the FakeQuantize ops that feed it and restoring its FP32 weights. This ranking
   model is quantized without bias correction and without SmoothQuant: a corrected bias
   compensates its own quantized input, and smoothed weights their scaled input, and both would
   be wrong once that block is float again. The final re-quantization uses the real settings.
4. Add blocks to the float set, most harmful per unit of cost first (cost: the block's share of INT8
   run time plus its share of the quantizable FP32 weights, so a big but fast block such as the
   decoder stays INT8 when it can), until the gate passes
   (every held-out image's Dice vs FP32 >= 1 - max_drop); then re-quantize with that set as
   NNCF's ignored scope (statistics and bias correction redone) and check again, adding blocks
   while it fails. Both runtime mixes (f32, bf16 for the ops left float) are judged; the faster
   one that passes is recorded.
5. Write the recipe (`export.recipe.Recipe`) beside the checkpoint, where `espmed export` reads it
   (its gate verifies it again), and the table under `--results`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from espmed.atomic import file_sha256, write_text
from espmed.export import export
from espmed.export.accuracy import Comparison, Gate
from espmed.export.calibration import load_calibration
from espmed.export.openvino_export import (
    QUANTIZABLE_OV_TYPES,
    NncfSettings,
    embed_metadata,
    nncf_quantize,
    ops_of_types,
    save_and_open,
    save_ir,
    with_fp16_weights,
)
from espmed.export.recipe import Recipe, recipe_beside
from espmed.runtimes import load
from espmed.runtimes.metadata import ArtifactMetadata

#: A node's block: the first pattern that matches its name (module path) names it.
BLOCK_PATTERNS = (
    r"^trunk\.patch_embed",
    r"^trunk\.layers\.0",
    r"^trunk\.layers\.\d+\.blocks\.\d+",
    r"^trunk\.layers\.\d+\.downsample",
    r"^decoder\.[a-z_]+",
    r"^[a-z_]+",
)


def block_of(name: str) -> str:
    for pattern in BLOCK_PATTERNS:
        m = re.match(pattern, name)
        if m:
            return m.group(0)
    return "graph"


def block_regex(block: str, blocks: list[str]) -> str:
    """The recipe's pattern for a block: its module path at a boundary; only its own nodes (`/`)
    when other blocks sit under it (`decoder` vs `decoder.transformer`)."""
    nested = any(b.startswith(block + ".") for b in blocks)
    return "^" + re.escape(block) + ("(/|$)" if nested else r"([./]|$)")


def bypass(model, source, blocks: set[str], *, keep: bool = False):
    """A copy of INT8 `model` in which `blocks` (or, `keep`: every other block) compute in float:
    the FakeQuantize ops feeding them are bypassed and their int8 weights are replaced by the FP32
    weights of `source` (the same op names)."""
    m = model.clone()
    floats = {op.get_friendly_name(): op for op in source.get_ordered_ops()}

    def in_float(node) -> bool:
        return (block_of(node.get_friendly_name()) in blocks) != keep

    for op in m.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize":
            for target in list(op.output(0).get_target_inputs()):
                if in_float(target.get_node()):
                    target.replace_source_output(op.input_value(0))
        elif op.get_type_name() in QUANTIZABLE_OV_TYPES and in_float(op) and op.get_friendly_name() in floats:
            weight = op.input_value(1).get_node()
            if weight.get_type_name() == "Multiply":  # NNCF's int8 Constant -> Convert -> Multiply(scale)
                op.input(1).replace_source_output(floats[op.get_friendly_name()].input_value(1))
    return m


class Judge:
    """Stages an ov.Model with the artifact metadata and compares it to FP32 on the held-out images."""

    def __init__(self, gate: Gate, meta: ArtifactMetadata, work: Path, threads: int) -> None:
        self.gate, self.meta, self.work, self.threads = gate, meta, work, threads
        self.staged = 0  # probes staged so far; the last one is probe<staged>.xml

    def open(self, model, precision: str):
        """Stage `model` under a new name each time (the previous probe's files removed): OpenVINO
        reuses a path's mapping while a model still maps it (FP16 weights are decompressed from the
        mapping), so rewriting one path crashed with SIGBUS or would read stale weights."""
        previous = self.work / f"probe{self.staged}.xml"
        for path in (previous, previous.with_suffix(".bin")):
            path.unlink(missing_ok=True)
        self.staged += 1
        return save_and_open(model, self.meta, self.work / f"probe{self.staged}.xml", compress_to_fp16=False,
                             precision=precision, threads=self.threads)

    def compare(self, model, precision: str) -> Comparison:
        return self.gate.compare(self.open(model, precision))

    def latency_ms(self, model, precision: str, x: np.ndarray, runs: int = 5) -> float:
        seg = self.open(model, precision)
        seg.run(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            seg.run(x)
            times.append(time.perf_counter() - t)
        return 1e3 * float(np.median(times))


def block_times(xml: Path, precision: str, threads: int) -> dict[str, float]:
    from espmed.benchmark.profile import profile_openvino

    prof = profile_openvino(xml, threads, precision, runs=3)
    times: dict[str, float] = {}
    for node in prof["nodes"]:
        b = block_of(node["node"].split("/", 1)[0])
        times[b] = times.get(b, 0.0) + node["ms"]
    return times


def weight_bytes(model) -> dict[str, int]:
    """FP32 bytes (4 per value, however stored) of the constant weights of each block's quantizable
    ops (what INT8 shrinks 4x)."""
    sizes: dict[str, int] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() not in QUANTIZABLE_OV_TYPES:
            continue
        weight = op.input_value(1).get_node()
        if weight.get_type_name() == "Convert":  # an FP16-stored weight
            weight = weight.input_value(0).get_node()
        if weight.get_type_name() == "Constant":
            b = block_of(op.get_friendly_name())
            sizes[b] = sizes.get(b, 0) + 4 * int(np.prod(list(weight.get_output_shape(0))))
    return sizes


def main(argv: list[str] | None = None) -> None:
    import nncf
    import openvino as ov

    from espmed.model import default_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=Path, required=True, help="make_calibration.py's folder for the modality")
    ap.add_argument("-m", "--modality", required=True)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--alpha", type=float, default=None, help="SmoothQuant alpha (default: NNCF's)")
    ap.add_argument("--max-drop", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/sensitivity"))
    ap.add_argument("--recipe", type=Path, default=None, help="default: beside the checkpoint")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/quantization"))
    args = ap.parse_args(argv)
    nncf.set_log_level(logging.ERROR)
    checkpoint = args.checkpoint or default_checkpoint()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def say(text: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {text}", flush=True)

    say(f"export FP32 IR of {checkpoint.name} ({args.modality})")
    fp32 = export(checkpoint, "openvino", args.work, modality=args.modality, calib=args.calib)
    reference = load(fp32.artifact, verify=False, threads=args.threads)
    meta = reference.metadata
    pre = meta.preprocessing
    images = load_calibration(args.calib, meta.input_size, pre["mean"], pre["std"], pre["resize"])
    gate = Gate.build(reference, {im.path.name: im.image for im in images.held_out}, max_drop=args.max_drop,
                      threshold=pre["mask_threshold"], batch=1)
    judge = Judge(gate, meta, args.work, args.threads)
    x = images.held_out[0].x[None]
    source = with_fp16_weights(ov.Core().read_model(str(fp32.artifact)), args.work / "fp16-weights.xml")  # as export
    data = [im.x[None] for im in images.calibration]
    settings = NncfSettings(smooth_quant_alpha=args.alpha)

    ranking_settings = NncfSettings(smooth_quant_alpha=-1.0, bias_correction=False)
    say(f"quantize everything ({len(images.calibration)} calibration images, {ranking_settings.describe()})")
    full = nncf_quantize(source, data, settings=ranking_settings, float_layers=[])
    int8_xml = args.work / "int8-all.xml"
    embed_metadata(full, meta)
    save_ir(full, int8_xml, compress_to_fp16=False)
    base = judge.compare(full, "f32")
    say(f"all quantized: min Dice vs FP32 {min(base.dice):.4f}")
    times = block_times(int8_xml, "f32", args.threads)
    total = sum(times.values())
    blocks = sorted({block_of(n) for n in ops_of_types(source, QUANTIZABLE_OV_TYPES)})
    sizes = weight_bytes(source)
    total_bytes = sum(sizes.values())

    rows = []
    for b in blocks:
        alone = judge.compare(bypass(full, source, {b}, keep=True), "f32")
        rows.append({
            "block": b, "time_share": times.get(b, 0.0) / total, "ms": times.get(b, 0.0),
            "weight_mb": sizes.get(b, 0) / 1e6, "size_share": sizes.get(b, 0) / total_bytes,
            "min_dice_int8_only": min(alone.dice), "mean_dice_int8_only": float(np.mean(alone.dice)),
            "dice_cost": 1.0 - min(alone.dice),
        })
        say(f"{b:<40} time {100 * rows[-1]['time_share']:5.1f} %  int8-only min Dice {min(alone.dice):.4f}")
    # Most harmful per unit of what keeping it float costs: its share of INT8 time plus its share of
    # the weights (a float decoder is ~0 % of the time but a quarter of the INT8 file).
    rows.sort(key=lambda r: -(r["dice_cost"] + 1e-4) / max(r["time_share"] + r["size_share"], 1e-3))

    chosen: list[str] = []
    steps = []
    for r in [None, *rows]:
        if r is not None:
            chosen.append(r["block"])
        c = judge.compare(bypass(full, source, set(chosen)), "f32")
        steps.append({"float_blocks": list(chosen), "min_dice": min(c.dice), "passes": c.passes(args.max_drop)})
        say(f"bypass {len(chosen):2d} blocks: min Dice {min(c.dice):.4f}")
        if c.passes(args.max_drop):
            break

    names = ops_of_types(source, QUANTIZABLE_OV_TYPES)
    verified = None
    remaining = [r["block"] for r in rows if r["block"] not in chosen]
    while verified is None:
        rx = re.compile("|".join(block_regex(b, blocks) for b in chosen)) if chosen else None
        float_layers = [n for n in names if rx and rx.search(n)]
        model = nncf_quantize(source, data, settings=settings, float_layers=float_layers)
        mixes = {}
        for precision in ("f32", "bf16"):
            c = judge.compare(model, precision)
            mixes[precision] = {"min_dice": min(c.dice), "dice": c.dice, "passes": c.passes(args.max_drop),
                                "ms": judge.latency_ms(model, precision, x)}
            say(f"re-quantized, {len(chosen)} float blocks, {precision}: min Dice {min(c.dice):.4f}, "
                f"{mixes[precision]['ms']:.0f} ms")
        passing = [p for p, v in mixes.items() if v["passes"]]
        if passing or not remaining:
            verified = {"float_blocks": list(chosen), "mixes": mixes,
                        "runtime_precision": min(passing, key=lambda p: mixes[p]["ms"]) if passing else None}
        else:
            chosen.append(remaining.pop(0))

    fp32_ms = {p: judge.latency_ms(source, p, x) for p in ("f32", "bf16")}
    float_share = sum(times.get(b, 0.0) for b in chosen) / total
    float_size_share = sum(sizes.get(b, 0) for b in chosen) / total_bytes
    ranking = {
        "modality": args.modality, "calibration": images.describe(), "max_drop": args.max_drop,
        "nncf": settings.describe(),
        "ranking_nncf": ranking_settings.describe(), "threads": args.threads, "all_quantized_min_dice": min(base.dice),
        "blocks": rows, "greedy_bypass": steps, "verified": verified, "float_time_share": float_share,
        "float_weight_share": float_size_share,
        "fp32_ms": fp32_ms, "seconds": round(time.time() - started),
        "command": "python benchmarks/quantization/sensitivity.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    recipe = Recipe(
        checkpoint_sha256=file_sha256(checkpoint),
        float_blocks={backend: [block_regex(b, blocks) for b in chosen] for backend in ("openvino", "onnxruntime")},
        smooth_quant_alpha=args.alpha, runtime_precision=verified["runtime_precision"], ranking=ranking,
    )
    path = args.recipe or recipe_beside(checkpoint)
    recipe.write(path)
    args.results.mkdir(parents=True, exist_ok=True)
    write_text(args.results / f"sensitivity-{args.modality}.json", json.dumps(ranking, indent=1) + "\n")
    write_text(args.results / f"sensitivity-{args.modality}.md", report(ranking))
    say(f"recipe: {path} ({len(chosen)} float blocks, {100 * float_share:.1f} % of INT8 time)")


def report(r: dict) -> str:
    lines = [
        f"# INT8 sensitivity ranking: {r['modality']}",
        "",
        f"- calibration: {r['calibration']['images']} images ({r['calibration']['source']}, sha256 "
        f"{r['calibration']['sha256'][:12]}…); held out: {len(r['calibration']['held_out'])} images",
        f"- NNCF: {r['nncf']}; all blocks quantized (ranking model: no bias correction, no SmoothQuant): "
        "min Dice vs FP32 "
        f"{r['all_quantized_min_dice']:.4f}",
        f"- gate: every held-out image's Dice vs OpenVINO FP32 >= {1 - r['max_drop']:.2f}; {r['threads']} threads",
        "",
        "| block | INT8 time share | FP32 weights MB | min Dice, only it INT8 | mean Dice, only it INT8 | Dice cost |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in sorted(r["blocks"], key=lambda b: -b["dice_cost"])[:15]:
        lines.append(f"| {b['block']} | {100 * b['time_share']:.1f} % | {b.get('weight_mb', 0):.2f} | "
                     f"{b['min_dice_int8_only']:.4f} | "
                     f"{b['mean_dice_int8_only']:.4f} | {b['dice_cost']:.4f} |")
    v = r["verified"]
    lines += ["", f"Chosen float blocks ({100 * r['float_time_share']:.1f} % of INT8 run time, "
              f"{100 * r.get('float_weight_share', 0):.1f} % of the quantizable weights): "
              + (", ".join(v["float_blocks"]) or "none"), ""]
    lines += ["| mix | min Dice vs FP32 | passes | latency ms |", "|---|---:|---|---:|"]
    for p, m in v["mixes"].items():
        lines.append(f"| INT8 + {p} | {m['min_dice']:.4f} | {m['passes']} | {m['ms']:.0f} |")
    for p, ms in r["fp32_ms"].items():
        lines.append(f"| FP32 IR at {p} | | | {ms:.0f} |")
    lines += ["", f"Recorded runtime precision: {v['runtime_precision']}. Took {r['seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
