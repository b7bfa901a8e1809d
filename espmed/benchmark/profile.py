"""Which layers dominate: per-layer timings of an OpenVINO IR from the CPU plugin's perf counters.

    python -m espmed.benchmark.profile model.xml [--threads 2] [--precision f32] [--runs 5]

Node names carry the module path the exporter gave them (`trunk.layers.2.blocks.3.attn/MatMul_7`),
so time is summed per model part, per block role and per executed kernel type.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

_BLOCK = re.compile(r"^(trunk\.layers\.\d+)\.blocks\.\d+\.(.+)$")


def module_of(node_name: str) -> str:
    """The module path of an exported node (`graph` when unnamed)."""
    return node_name.split("/", 1)[0] if "/" in node_name else "graph"


def part_of(module: str) -> str:
    """A coarse part: trunk stage, neck, SPPG, decoder, ..."""
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[0] == "trunk" and len(parts) > 2 else parts[0]


def role_of(module: str) -> str:
    """What a node does inside a TinyViT block (attention, MLP, controller expert, ...)."""
    m = _BLOCK.match(module)
    if not m:
        return part_of(module)
    role = re.sub(r"\.slots\.\d+", "", m.group(2))
    return role.split(".")[0] if not role.startswith("controllers") else ".".join(role.split(".")[:2])


def profile_openvino(
    xml: str | Path, threads: int | None = None, precision: str = "f32", runs: int = 5, *, x: np.ndarray | None = None
) -> dict:
    """Median per-node real time over `runs` inferences (after one warm-up) on `x` (the model's
    input shape; seeded noise when None), summed by part, block role, kernel and op type."""
    import openvino as ov

    from ..runtimes.openvino_ir import PRECISIONS

    core = ov.Core()
    if threads:
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
    model = core.read_model(str(xml))
    shape = [d.get_length() if d.is_static else 1 for d in model.input(0).get_partial_shape()]
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": PRECISIONS[precision]})
    request = compiled.create_infer_request()
    if x is None:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    request.infer({0: x})
    samples: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for _ in range(runs):
        request.infer({0: x})
        for info in request.get_profiling_info():
            if info.status == info.Status.EXECUTED:
                samples[(info.node_name, info.node_type, info.exec_type)].append(info.real_time.total_seconds() * 1e3)
    per_node = {key: float(np.median(v)) for key, v in samples.items()}
    total = sum(per_node.values())
    groups: dict[str, dict[str, float]] = {key: defaultdict(float) for key in ("part", "block_role", "kernel", "op")}
    for (name, node_type, exec_type), ms in per_node.items():
        module = module_of(name)
        groups["part"][part_of(module)] += ms
        groups["block_role"][role_of(module)] += ms
        groups["kernel"][exec_type] += ms
        groups["op"][node_type] += ms
    top_nodes = sorted(per_node.items(), key=lambda kv: -kv[1])[:15]
    return {
        "artifact": str(xml),
        "precision": precision,
        "threads": threads,
        "total_ms": total,
        "groups": {g: dict(sorted(v.items(), key=lambda kv: -kv[1])) for g, v in groups.items()},
        "top_nodes": [{"node": k[0], "type": k[1], "kernel": k[2], "ms": v} for k, v in top_nodes],
        "nodes": [{"node": k[0], "type": k[1], "kernel": k[2], "ms": v} for k, v in per_node.items()],
    }


def format_profile(prof: dict, top: int = 8) -> str:
    total = prof["total_ms"]
    lines = [
        f"{prof['artifact']} ({prof['precision']}, {prof['threads']} threads): "
        f"{total:.0f} ms summed over executed nodes"
    ]
    for group, values in prof["groups"].items():
        lines.append(f"  by {group}:")
        for name, ms in list(values.items())[:top]:
            lines.append(f"    {ms:9.1f} ms  {100 * ms / total:5.1f} %  {name}")
    lines.append("  slowest nodes:")
    for n in prof["top_nodes"][:top]:
        lines.append(f"    {n['ms']:9.1f} ms  {n['type']:<16} {n['kernel']:<24} {n['node']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m espmed.benchmark.profile", description=__doc__.splitlines()[0])
    ap.add_argument("xml", type=Path)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="f32", choices=("f32", "bf16", "f16"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    prof = profile_openvino(args.xml, args.threads, args.precision, args.runs)
    print(json.dumps(prof, indent=2) if args.json else format_profile(prof))


if __name__ == "__main__":
    main()
