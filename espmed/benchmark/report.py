"""Benchmark outputs: a rich table, and JSON / CSV / Markdown / PNG files in `--out` (atomic)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_path, write_text
from .model_prep import BenchModel
from .options import REFERENCE

RESULT_STEM = "bench"


@dataclass
class BenchReport:
    """A run's results: bench.json is `to_dict()` (`files` names what `write_all` wrote)."""

    rows: list[dict]
    model: BenchModel
    host: dict
    versions: dict
    gemm: dict
    options: dict
    notes: list[str] = field(default_factory=list)
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def drop_failures(self, max_drop: float | None) -> list[str]:
        """Rows whose Dice drop vs FP32 exceeds `max_drop` (or whose accuracy could not be measured)."""
        if max_drop is None:
            return []
        bad = []
        for r in self.rows:
            if r["status"] != "ok" or r["name"] == REFERENCE:
                continue
            drop = r.get("dice_drop")
            if drop is None:
                bad.append(f"{r['name']}: accuracy not measured")
            elif drop > max_drop:
                bad.append(f"{r['name']}: Dice drop {drop:.4f} > {max_drop}")
        return bad

#: Columns of the terminal table (the files have every column of `_cells`).
TABLE_COLUMNS = (
    "target", "status", "p50 ms", "p99 ms", "speed-up", "img/s", "cold s", "cold cached s", "peak RSS MB",
    "size MB", "GFLOP/s", "% GEMM peak", "Dice min", "Dice mean", "max |dlogit|", "GT Dice",
)


#: Box-prompt runs add these after the named column.
BOX_COLUMNS = {"p99 ms": "dec ms/box", "GT Dice": "GT box Dice"}


def table_columns(report: BenchReport) -> list[str]:
    columns = list(TABLE_COLUMNS)
    if report.model.prompt == "box":
        for after, name in BOX_COLUMNS.items():
            columns.insert(columns.index(after) + 1, name)
    return columns


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _fields(r: dict) -> dict:
    """The raw values of one row, in column order (what the CSV holds)."""
    lat = r.get("latency_ms") or {}
    vs = r.get("vs_fp32") or {}
    gt = r.get("ground_truth") or {}
    return {
        "target": r["name"],
        "backend / precision": r["label"],
        "status": r["status"],
        "reason": r.get("reason") or "",
        "p50 ms": lat.get("p50"),
        "p95 ms": lat.get("p95"),
        "p99 ms": lat.get("p99"),
        "speed-up": r.get("speedup_vs_torch"),
        "img/s": r.get("throughput_ips"),
        "cold s": r.get("cold_start_s"),
        "cold cached s": r.get("cold_start_cached_s"),
        "peak RSS MB": r.get("peak_rss_mb"),
        "size MB": r.get("artifact_mb"),
        "GFLOP/s": r.get("gflops_per_s"),
        "% GEMM peak": 100 * r["gemm_peak_share"] if r.get("gemm_peak_share") is not None else None,
        "Dice min": vs.get("dice_min"),
        "Dice mean": vs.get("dice_mean"),
        "max |dlogit|": vs.get("max_abs_logit_error"),
        "GT Dice": gt.get("dice_mean"),
        "GT IoU": gt.get("iou_mean"),
    } | ({
        "dec ms/box": (r.get("decoder_ms_per_box") or {}).get("one_box_p50"),
        "GT box Dice": r.get("box_dice_vs_truth_mean"),
    } if r.get("prompt") == "box" else {})


_FORMATS = {
    "p50 ms": ".1f", "p95 ms": ".1f", "p99 ms": ".1f", "speed-up": ".2f", "img/s": ".2f", "cold s": ".2f",
    "cold cached s": ".2f", "peak RSS MB": ".0f", "size MB": ".1f", "GFLOP/s": ".1f", "% GEMM peak": ".0f",
    "Dice min": ".4f", "Dice mean": ".4f", "max |dlogit|": ".2e", "GT Dice": ".3f", "GT IoU": ".3f",
    "dec ms/box": ".1f", "GT box Dice": ".3f",
}


def _cells(r: dict) -> dict[str, str]:
    """One row formatted for the terminal and Markdown tables."""
    cells = {k: (_fmt(v, _FORMATS[k]) if k in _FORMATS else str(v)) for k, v in _fields(r).items()}
    if cells["speed-up"]:
        cells["speed-up"] += "x"
    return cells


def summary_lines(report: BenchReport) -> list[str]:
    m, cpu, o = report.model, report.host["cpu"], report.options
    weights = "seeded random weights" if m.weights.get("kind") == "random" else m.checkpoint
    if m.prompt == "box":
        what = [
            f"box prompts: one box per 8-connected ground-truth component (touching structures share one); "
            f"p50/p99 ms = the image encoder per image ({m.gflops:.1f} GFLOPs), dec ms/box = the prompt decoder "
            f"for one box ({m.decoder_gflops_per_box:.1f} GFLOPs); Dice vs FP32 and GT Dice: the union of an "
            "image's box masks; GT box Dice: each box's mask vs its own component, mean over boxes",
        ]
    else:
        what = ["latency = graph call on a pre-processed image (batch 1); speed-up and accuracy are vs torch "
                "eager FP32 measured in this run; Dice min/mean over images, mask = logit >= threshold"]
    return [
        f"model: {m.preset} {m.image_size}x{m.image_size}, {m.gflops:.1f} GFLOPs/image, "
        f"modality {m.modality}, {weights}",
        f"machine: {cpu['model']}, {cpu['logical_cores']} cores, flags {' '.join(cpu['flags'])}; "
        f"measured FP32 GEMM peak {report.gemm['gflops']:.0f} GFLOP/s at {report.gemm['threads']} threads",
        f"run: {o['threads']} threads, batch {o['batch']}, {o['warmup']} warm-up + {o['runs']} timed runs, "
        f"data: {o['data']}, {len(m.images)} images ({', '.join(m.images)})",
    ] + what + report.notes


def rich_table(report: BenchReport):
    from rich.table import Table

    reasons = [f"{r['name']}: {r['status']}, {r['reason']}" for r in report.rows if r["status"] != "ok"]
    caption = "\n".join(summary_lines(report) + reasons)
    table = Table(title="espmed bench", caption=caption, caption_justify="left")
    columns = table_columns(report)
    for k in columns:
        table.add_column(k, justify="left" if k in ("target", "status") else "right")
    for r in report.rows:
        c = _cells(r)
        table.add_row(*(c.get(k, "") for k in columns), style=None if r["status"] == "ok" else "dim")
    return table


def to_csv(report: BenchReport) -> str:
    buf = io.StringIO()
    rows = [{k: ("" if v is None else v) for k, v in _fields(r).items()} for r in report.rows]
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)) or ["target"])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


#: Kernel types per row in bench.md's Kernels section.
TOP_KERNELS = 4


def kernel_lines(report: BenchReport, top: int = TOP_KERNELS) -> list[str]:
    """Per profiled row: its `top` kernel types (torch: aten ops) with their share of the profiled time."""
    lines = []
    for r in report.rows:
        k = r.get("kernels")
        if not k:
            continue
        if "error" in k:
            lines.append(f"{r['name']}: not profiled ({k['error']})")
            continue
        top_shares = list((k.get("by_kernel") or k["by_op"]).items())[:top]
        listed = ", ".join(f"{name} {100 * share:.0f} %" for name, share in top_shares)
        lines.append(f"{r['name']}: {listed} (of {k['total_ms']:.1f} ms)")
    return lines


def to_markdown(report: BenchReport, chart_name: str | None = None) -> str:
    rows = [_cells(r) for r in report.rows]
    keys = list(dict.fromkeys(k for c in rows for k in c))
    lines = ["# espmed bench", ""]
    lines += [f"- {line}" for line in summary_lines(report)]
    lines += ["", "| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for c in rows:
        lines.append("| " + " | ".join(c.get(k, "").replace("|", "\\|") for k in keys) + " |")
    kernels = kernel_lines(report)
    if kernels:
        lines += [
            "", "## Kernels", "",
            "Share of one profiled inference per kernel type: OpenVINO's executed primitive types (perf "
            "counters, at the row's precision), ONNX Runtime's op type @ execution provider (its profiler), "
            "torch's aten ops (self CPU time).", "",
        ]
        lines += [f"- {line}" for line in kernels]
    v = report.versions
    lines += ["", "Libraries: " + ", ".join(f"{k} {v[k]}" for k in sorted(v))]
    if chart_name:
        lines += ["", f"![latency vs Dice]({chart_name})"]
    return "\n".join(lines) + "\n"


def write_chart(report: BenchReport, path: Path) -> Path | None:
    """Latency (p50) vs min Dice vs FP32 per backend; None when no row has both."""
    points = [
        (r["name"], r["latency_ms"]["p50"], r["vs_fp32"]["dice_min"])
        for r in report.rows
        if r["status"] == "ok" and r.get("vs_fp32")
    ]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name, lat, dice in points:
        ax.scatter(lat, dice, s=60, marker="*" if name == "torch" else "o")
        ax.annotate(name, (lat, dice), textcoords="offset points", xytext=(6, 4), fontsize=8)
    m = report.model
    ax.set_xscale("log")
    ax.set_xlabel("latency p50, ms (log scale, batch 1)")
    ax.set_ylabel("min per-image mask Dice vs torch FP32")
    ax.set_title(
        f"espmed bench: {m.preset} {m.image_size}px, {report.options['threads']} threads, "
        f"{report.host['cpu']['model']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    low = min(d for _, _, d in points)
    ax.set_ylim(min(low - 0.01, 0.98), 1.002)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def load_report(path: Path) -> BenchReport:
    """A bench.json as the report it was written from: what `render` re-draws its other files from."""
    data = json.loads(Path(path).read_text())
    return BenchReport(**{**data, "model": BenchModel(**data["model"])})


def render(report: BenchReport, out: Path) -> dict[str, Path]:
    """bench.png, bench.csv and bench.md in `out`: what a bench.json can always re-draw (results keep
    only their JSON and Markdown in git)."""
    out = Path(out)
    files = {}
    chart = write_chart(report, out / f"{RESULT_STEM}.png")
    if chart:
        files["png"] = chart
    files["csv"] = out / f"{RESULT_STEM}.csv"
    write_text(files["csv"], to_csv(report))
    files["md"] = out / f"{RESULT_STEM}.md"
    write_text(files["md"], to_markdown(report, chart.name if chart else None))
    return files


def write_all(report: BenchReport, out: Path) -> dict[str, Path]:
    """bench.json (everything, machine and versions included), bench.csv, bench.md, bench.png."""
    files = render(report, out)
    files["json"] = Path(out) / f"{RESULT_STEM}.json"
    report.files = {k: str(v) for k, v in files.items()}
    write_text(files["json"], json.dumps(report.to_dict(), indent=2, default=str))
    return files
