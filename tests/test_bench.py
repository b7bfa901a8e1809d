"""`espmed bench`: the harness on a tiny model (torch + ONNX + OpenVINO BF16, or FP16 weights on a CPU
without native BF16), its files and exit codes."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from espmed.benchmark import harness, model_prep, options, report
from espmed.benchmark.data import bundled_samples_dir, list_samples
from espmed.benchmark.metrics import dice, iou
from espmed.benchmark.weights import random_model, sppg_threshold_gap
from espmed.errors import EspmedError, ExportError
from espmed.export.graph import choose_modality
from espmed.machine import cpu_info
from espmed.model import ESPMedSAM, get_preset

SIZE = 128
BF16 = cpu_info()["bf16"]
#: The measured OpenVINO row: BF16 where this CPU has it natively; elsewhere FP16 weights (another
#: precision that differs from FP32), and the openvino-bf16 row is `unavailable` and says why.
OPENVINO_ROW = "openvino-bf16" if BF16 else "openvino-fp16"
OPENVINO_KERNELS = "_bf16" if BF16 else "_f32"
ROWS = ["torch", "onnx", "onnx-fp16", "openvino-bf16", *([] if BF16 else ["openvino-fp16"]), "trt-fp32"]
TARGETS = ",".join(ROWS[1:])


def _espmed(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from espmed.cli import run; sys.argv[0] = 'espmed'; run()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two nuclei images with ground truth and one image without (folder + masks/ layout)."""
    src = bundled_samples_dir()
    d = tmp_path_factory.mktemp("bench-data")
    (d / "masks").mkdir()
    for name in ("nuclei_dsb2018_a.png", "nuclei_dsb2018_b.png"):
        shutil.copy(src / name, d / name)
        shutil.copy(src / "masks" / name, d / "masks" / name)
    shutil.copy(src / "fundus_microaneurysms.png", d / "fundus_microaneurysms.png")
    return d


@pytest.fixture(scope="module")
def bench(data_dir, tmp_path_factory):
    """One in-process run; the onnx-fp16 export is made to fail to check that the rest go on."""
    out = tmp_path_factory.mktemp("bench-out")
    real_export = harness.export_artifact

    def failing_fp16(target, *args, **kwargs):
        if target == "onnx-fp16":
            raise ExportError("simulated export failure")
        return real_export(target, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(harness, "export_artifact", failing_fp16)
    try:
        opts = options.BenchOptions(
            preset="esp-medsam-tiny", imgsz=SIZE, data=data_dir, targets=TARGETS, runs=2, warmup=1, threads=2, out=out,
        )
        rep = harness.run_benchmark(opts, log=lambda _: None)
    finally:
        mp.undo()
    files = report.write_all(rep, out)
    return rep, files, out


def _row(rep, name):
    return next(r for r in rep.rows if r["name"] == name)


def test_every_row_has_a_status_and_failures_do_not_stop_the_rest(bench):
    rep, _, _ = bench
    assert [r["name"] for r in rep.rows] == ROWS
    assert _row(rep, "onnx-fp16")["status"] == "failed"
    assert "simulated export failure" in _row(rep, "onnx-fp16")["reason"]
    assert _row(rep, "trt-fp32")["status"] == "unavailable" and "GPU" in _row(rep, "trt-fp32")["reason"]
    if not BF16:
        assert _row(rep, "openvino-bf16")["status"] == "unavailable"
        assert "no native BF16" in _row(rep, "openvino-bf16")["reason"]
    for name in ("torch", "onnx", OPENVINO_ROW):
        assert _row(rep, name)["status"] == "ok", _row(rep, name).get("reason")


def test_measurements_are_sane(bench):
    rep, _, _ = bench
    torch_row, onnx_row, ov_row = _row(rep, "torch"), _row(rep, "onnx"), _row(rep, OPENVINO_ROW)
    for r in (torch_row, onnx_row, ov_row):
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] and lat["runs"] == 2
        assert r["cold_start_s"] > r["cold_breakdown_s"]["load"] > 0
        assert 20 < r["peak_rss_mb"] < 4000 and r["artifact_mb"] > 0
        assert r["gflops_per_s"] > 0 and 0 < r["gemm_peak_share"]
        assert r["speedup_vs_torch"] == pytest.approx(torch_row["latency_ms"]["p50"] / r["latency_ms"]["p50"])
    assert torch_row["speedup_vs_torch"] == 1.0
    # the torch worker imports torch, the ONNX Runtime one must not
    assert onnx_row["peak_rss_mb"] < torch_row["peak_rss_mb"]
    # OpenVINO: cold start with a filled compiled-model cache measured separately
    assert ov_row["cold_start_cached_s"] > 0
    assert ov_row["runtime"]["inference_precision"] == ("bf16" if BF16 else "f32")
    assert onnx_row["runtime"]["precision"] == "fp32"


def test_accuracy_vs_fp32_and_ground_truth(bench):
    rep, _, _ = bench
    torch_row, onnx_row, ov_row = _row(rep, "torch"), _row(rep, "onnx"), _row(rep, OPENVINO_ROW)
    assert torch_row["vs_fp32"]["dice_min"] == 1.0 and torch_row["vs_fp32"]["max_abs_logit_error"] == 0.0
    assert onnx_row["vs_fp32"]["dice_min"] > 0.999 and onnx_row["vs_fp32"]["max_abs_logit_error"] < 1e-3
    assert set(onnx_row["vs_fp32"]["per_image"]) == {"nuclei_dsb2018_a", "nuclei_dsb2018_b", "fundus_microaneurysms"}
    # BF16 compute (or FP16 weights) really differs from FP32, and the logit error says so
    assert ov_row["vs_fp32"]["max_abs_logit_error"] > 10 * onnx_row["vs_fp32"]["max_abs_logit_error"]
    gt = onnx_row["ground_truth"]
    assert gt["images"] == 2 and 0.0 <= gt["iou_mean"] <= gt["dice_mean"] <= 1.0
    assert rep.notes[0] == harness.RANDOM_WEIGHTS_NOTE


def test_output_files(bench):
    rep, files, out = bench
    assert set(files) == {"json", "csv", "md", "png"}
    data = json.loads(files["json"].read_text())
    assert data["host"]["cpu"]["logical_cores"] >= 1 and "flags" in data["host"]["cpu"]
    assert {"torch", "onnxruntime", "openvino", "numpy"} <= set(data["versions"])
    assert data["gemm"]["gflops"] > 1 and data["model"]["image_size"] == SIZE
    assert data["model"]["weights"]["kind"] == "random"
    with open(files["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["target"] for r in rows] == [r["name"] for r in rep.rows]
    assert rows[1]["status"] == "ok" and float(rows[1]["p50 ms"]) > 0 and rows[2]["reason"]
    md = files["md"].read_text()
    assert "| onnx |" in md and "not clinical accuracy" in md and "![latency vs Dice](bench.png)" in md
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))


def test_each_row_reports_which_kernels_ran(bench):
    rep, files, _ = bench
    onnx_k, ov_k, torch_k = (_row(rep, name)["kernels"] for name in ("onnx", OPENVINO_ROW, "torch"))
    assert any("Conv" in op or "MatMul" in op for op in onnx_k["by_op"]), onnx_k
    assert set(onnx_k["by_provider"]) == {"CPUExecutionProvider"}
    # the row's own precision: most of its time in bf16 (f32) primitives
    assert sum(s for name, s in ov_k["by_kernel"].items() if name.endswith(OPENVINO_KERNELS)) > 0.5, ov_k
    assert any(op.startswith("aten::") for op in torch_k["by_op"])
    assert "kernels" not in _row(rep, "trt-fp32")
    section = files["md"].read_text().split("## Kernels", 1)[1]
    top_onnx, top_ov = next(iter(onnx_k["by_kernel"])), next(iter(ov_k["by_kernel"]))
    assert top_ov.endswith(OPENVINO_KERNELS) and f"- {OPENVINO_ROW}: {top_ov} " in section
    assert f"- onnx: {top_onnx} " in section and "- torch: aten::" in section


def test_cli_reuses_exports_and_max_drop_sets_the_exit_code(bench, data_dir):
    _, _, out = bench
    common = ["bench", "--random-weights", "--preset", "esp-medsam-tiny", "--imgsz", str(SIZE), "--data", str(data_dir),
              "--runs", "2", "--warmup", "1", "--out", str(out)]
    strict = _espmed(*common, "--targets", f"onnx,{OPENVINO_ROW}", "--max-drop", "0")
    assert strict.returncode == 1, strict.stderr
    assert f"{OPENVINO_ROW}: Dice drop" in strict.stderr and "onnx:" not in strict.stderr
    assert "Traceback" not in strict.stderr
    data = json.loads((out / "bench.json").read_text())
    assert all(r["export_reused"] for r in data["rows"] if r["status"] == "ok")
    lenient = _espmed(*common, "--targets", "onnx", "--max-drop", "0.5")
    assert lenient.returncode == 0, lenient.stderr
    assert "onnx" in lenient.stdout and "not clinical accuracy" in lenient.stdout


@pytest.mark.parametrize(
    "args, message",
    [(["--imgsz", "100"], "multiple of 32"), (["--targets", "onnx,tpu"], "unknown target(s) tpu"),
     (["--checkpoint", "/nonexistent.safetensors"], "no such checkpoint")],
)
def test_cli_bad_input_is_one_line_error(args, message, tmp_path):
    r = _espmed("bench", "--out", str(tmp_path), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.strip().count("\n") == 0


def test_cpu_info_parses_flags():
    text = (
        "processor\t: 0\nmodel name\t: Test CPU\nphysical id\t: 0\ncore id\t: 0\n"
        "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n"
    )
    info = cpu_info(text)
    assert info["model"] == "Test CPU" and info["physical_cores"] == 1
    assert info["flags"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert info["avx512"] and info["vnni"] and info["bf16"] and not info["amx"]


def test_dice_and_iou():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 0, 0]], bool)
    assert dice(a, b) == pytest.approx(2 / 3) and iou(a, b) == pytest.approx(1 / 2)
    empty = np.zeros((2, 2), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    with pytest.raises(ValueError):
        dice(a, empty)


def test_sppg_threshold_sits_in_a_gap():
    logits = np.concatenate([np.linspace(-3, -1, 30), np.linspace(1, 3, 70)])
    shift, margin = sppg_threshold_gap(logits)
    assert shift == pytest.approx(0.0) and margin == pytest.approx(1.0)
    # dense logits: the threshold goes to a wide-enough gap near the 30th percentile
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(4000) * 2
    shift, margin = sppg_threshold_gap(logits)
    assert margin >= 2e-3 and np.min(np.abs(logits - shift)) == pytest.approx(margin)
    assert 0.6 < np.mean(logits - shift >= 0) < 0.8


def test_random_weights_are_non_degenerate():
    cfg = get_preset("esp-medsam-tiny", image_size=SIZE)
    x = torch.randn(3, 3, SIZE, SIZE)
    _, rec = random_model(cfg, 0, x, "microscopy")
    assert 0.6 <= rec["positive_patch_share"] <= 0.8 and rec["min_patch_logit_distance"] > 1e-3
    assert 0.05 < rec["positive_mask_share"] < 0.95


def test_target_selection_and_modality_choice():
    names = [r.name for r in options.select_rows("all")]
    assert names[0] == "torch" and names.index("openvino-bf16") == names.index("openvino") + 1
    assert [r.name for r in options.select_rows("onnx")] == ["torch", "onnx"]
    with pytest.raises(EspmedError):
        options.select_rows("onnx,nope")
    samples = list_samples()
    assert model_prep.modality_with_most_masks(("fundus", "microscopy"), samples) == "microscopy"
    assert model_prep.modality_with_most_masks(("fundus", "colonoscopy"), []) == "fundus"


def test_the_bench_uses_the_exports_modality_choice_and_picks_only_among_several():
    def pick(available):
        return model_prep.modality_with_most_masks(available, list_samples())

    several = ESPMedSAM(get_preset("esp-medsam-tiny"))
    only = several.specialize("fundus")
    assert choose_modality(several, None, pick=pick) == "microscopy"
    assert choose_modality(only, None, pick=pick) == "fundus"
    assert choose_modality(several, "xray", pick=pick) == "xray"
    assert choose_modality(several, None) == several.default_modality == several.available_modalities[0]


def test_export_key_changes_with_the_recipe_beside_the_checkpoint(tmp_path):
    """A re-ranked recipe must not be answered with an INT8 artifact quantized by the old one."""
    from espmed.benchmark.exports import _export_key
    from espmed.benchmark.model_prep import BenchModel
    from espmed.benchmark.options import BenchOptions
    from espmed.export.recipe import recipe_beside

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    model = BenchModel(checkpoint=str(checkpoint), checkpoint_sha256="c" * 64, checkpoint_mb=0.0, weights={},
                       preset="esp-medsam", image_size=64, modality="microscopy", modalities=["microscopy"], gflops=0.0,
                       threshold=0.0, calibration=None)
    opts = BenchOptions(checkpoint=checkpoint)
    keys = [_export_key("openvino-int8", model, opts)]
    recipe_beside(checkpoint).write_text('{"float_blocks": {}}')
    keys.append(_export_key("openvino-int8", model, opts))
    recipe_beside(checkpoint).write_text('{"float_blocks": {"openvino": ["^decoder"]}}')
    keys.append(_export_key("openvino-int8", model, opts))
    assert keys[0]["recipe_sha256"] is None and keys[0] != keys[1] != keys[2]
    assert _export_key("openvino", model, opts)["recipe_sha256"] is None  # float targets read no recipe


@pytest.mark.parametrize("result", sorted(p.parent.name for p in Path("benchmarks/results").glob("*/bench.json")))
def test_a_recorded_bench_json_re_renders_its_markdown(result, tmp_path):
    """Results keep only bench.json and bench.md in git: the JSON re-draws the table as it was written."""
    recorded = Path("benchmarks/results") / result
    files = report.render(report.load_report(recorded / "bench.json"), tmp_path)
    assert {"csv", "md"} <= set(files)

    def table(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and not line.startswith("![")]

    assert table(files["md"].read_text()) == table((recorded / "bench.md").read_text())


@pytest.fixture(scope="module")
def box_bench(data_dir, tmp_path_factory):
    """`--prompt box` on the tiny model: torch and ONNX, one box per ground-truth component."""
    out = tmp_path_factory.mktemp("bench-box")
    opts = options.BenchOptions(
        preset="esp-medsam-tiny", imgsz=SIZE, data=data_dir, targets="onnx", runs=2, warmup=1, threads=2, out=out,
        prompt="box",
    )
    rep = harness.run_benchmark(opts, log=lambda _: None)
    return rep, report.write_all(rep, out)


def test_box_prompt_bench_times_the_encoder_per_image_and_the_decoder_per_box(box_bench, data_dir):
    from scipy import ndimage

    from espmed.io import read_mask

    rep, files = box_bench
    assert rep.model.prompt == "box" and rep.model.modality == "shared"
    assert rep.model.images == ["nuclei_dsb2018_a", "nuclei_dsb2018_b"]  # the image without a mask is left out
    masks = sorted(data_dir.glob("masks/*"))
    components = sum(ndimage.label(read_mask(p), structure=np.ones((3, 3)))[1] for p in masks)
    for name in ("torch", "onnx"):
        r = _row(rep, name)
        assert r["status"] == "ok", r.get("reason")
        assert r["boxes"] == components > 10
        assert r["latency_ms"]["p50"] > 0 and r["decoder_ms_per_box"]["one_box_p50"] > 0
        assert 0.0 <= r["box_dice_vs_truth_mean"] <= 1.0 and r["ground_truth"]["images"] == 2
    assert _row(rep, "onnx")["vs_fp32"]["dice_min"] > 0.99
    md = files["md"].read_text()
    assert "dec ms/box" in md and "one box per 8-connected ground-truth component" in md


def test_component_boxes_are_inclusive_and_8_connected():
    from espmed.benchmark.worker import components

    mask = np.zeros((10, 12), bool)
    mask[1:3, 2:5] = True
    mask[3, 5] = True  # touches the first only diagonally
    mask[6:9, 8:12] = True
    labels, boxes = components(mask)
    assert boxes == [[2, 1, 5, 3], [8, 6, 11, 8]]
    assert labels[3, 5] == 1 and labels[7, 9] == 2
