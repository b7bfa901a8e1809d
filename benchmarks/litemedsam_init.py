"""Student-vs-teacher embedding cosine of a LiteMedSAM-initialised ESP-MedSAM, before any training.

    nice python benchmarks/litemedsam_init.py            # -> benchmarks/results/litemedsam_init.{json,md}

Student: the `esp-medsam` preset at 1024², `init_from_litemedsam` (neutral controllers), input
x / 255, with the default box patch-embed taps and, for comparison, binomial and centre taps. Teacher:
LiteMedSAM's encoder at 256², input x / 255 (the project's choice) and, for comparison, per-image
min-max of the resized image (MedSAM's scripts). Metric:
per-position cosine over the 64x64 grid positions the image covers (padding excluded), averaged per
image, then per modality (`espmed.train.distill.embedding_cosine`, the loss's own measure).

Real images: fundus (scikit-image `retina`), IHC (scikit-image `immunohistochemistry`), nuclei
(DSB-2018, committed under espmed/assets), MR/CT/X-ray/US DICOM from pydicom and pydicom-data,
read through `espmed.io.read_image` (needs `pip install pydicom-data`).

Also measured: how much the embedding moves when the K/V logit bias of the neutral controllers is
-6 instead of -30, the gradient a backward gives the K/V parameters at -30 / -10 / -6 (Adam's eps
is 1e-8), and the cost of one stage-1 step (forward + backward, batch 1, 1024²) in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUCLEI = REPO / "espmed" / "assets" / "datasets" / "nuclei" / "dsb2018_img2d.png"
SAMPLES = REPO / "espmed" / "assets" / "samples"
DICOM = {  # modality -> pydicom / pydicom-data test files
    "mr": ["MR_small.dcm", "MR2_UNCI.dcm", "emri_small.dcm"],
    "ct": ["CT_small.dcm", "693_UNCI.dcm", "eCT_Supplemental.dcm"],
    "xray": ["RG1_UNCI.dcm", "RG3_UNCI.dcm"],
    "ultrasound": ["US1_UNCI.dcm", "OBXXXX1A.dcm"],
}


def images() -> list[tuple[str, str, object]]:
    """(modality, source, 2-D image) for every benchmark image; DICOM: the first frame."""
    from pydicom.data import get_testdata_file
    from skimage import data

    from espmed.io import read_image

    out = [("fundus", "skimage.data.retina", data.retina()),
           ("ihc", "skimage.data.immunohistochemistry", data.immunohistochemistry())]
    for path in (NUCLEI, SAMPLES / "nuclei_dsb2018_a.png", SAMPLES / "nuclei_dsb2018_b.png"):
        out.append(("nuclei", str(path.relative_to(REPO)), read_image(path).frames[0]))
    for modality, names in DICOM.items():
        for name in names:
            path = get_testdata_file(name)
            if path is None:
                raise SystemExit(f"{name} not found: pip install pydicom-data")
            out.append((modality, name, read_image(path).frames[0]))
    return out


def minmax_input(image, size: int):
    """MedSAM's scripts: resize (longest side), min-max the resized image to [0, 1], zero-pad."""
    import numpy as np
    from PIL import Image

    from espmed.runtimes.preprocess import resized_shape, to_rgb_uint8

    rgb = to_rgb_uint8(image)
    rh, rw = resized_shape(*rgb.shape[:2], size)
    if (rh, rw) != rgb.shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.BILINEAR))
    x = rgb.astype(np.float32)
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
    out = np.zeros((3, size, size), np.float32)
    out[:, :rh, :rw] = x.transpose(2, 0, 1)
    return out


def set_kv_bias(model, bias: float) -> None:
    for bank in model.controller_banks():
        for slot in bank.slots:
            slot.kv_logit_bias.data.fill_(bias)


def kv_gradients(model, bias: float) -> dict:
    """Gradient norms of the K/V controller parameters after one MSE backward at 256²."""
    import torch

    set_kv_bias(model, bias)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    model.embed(x, 0).pow(2).mean().backward()
    norms = {k: 0.0 for k in ("kv_logit_bias", "kv_token", "expert.fc2")}
    for name, p in model.named_parameters():
        for k in norms:
            if k in name and p.grad is not None:
                norms[k] += float(p.grad.pow(2).sum())
    model.zero_grad(set_to_none=True)
    set_kv_bias(model, -30.0)
    return {k: v ** 0.5 for k, v in norms.items()}


def step_seconds(model, dtype, repeats: int = 2) -> float:
    """Median wall time of one stage-1 step (forward, MSE, backward) at 1024², batch 1."""
    import statistics

    import torch

    model.train()
    x, target = torch.rand(1, 3, 1024, 1024), torch.randn(1, 256, 64, 64)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            pred = model.embed(x, 0)
        torch.nn.functional.mse_loss(pred.float(), target).backward()
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    model.eval()
    return round(statistics.median(times[1:]), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-steps", action="store_true", help="skip the stage-1 step timing")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from espmed import __version__
    from espmed.atomic import write_text
    from espmed.machine import cpu_info
    from espmed.model import ESPMedSAM, get_preset
    from espmed.runtimes.preprocess import preprocess
    from espmed.train.distill import embedding_cosine, valid_grid
    from espmed.train.litemedsam import (
        PREPROCESSING,
        TAPS,
        asset_path,
        init_from_litemedsam,
        load_litemedsam_encoder,
    )

    torch.set_num_threads(args.threads)
    teacher, sha256 = load_litemedsam_encoder()
    cfg = get_preset("esp-medsam", image_size=1024, modalities=("any",), controller_map=(0,), num_queries=1)
    students = {}
    for taps in TAPS:
        torch.manual_seed(0)
        students[taps] = ESPMedSAM(cfg).eval()
        report = init_from_litemedsam(students[taps], taps=taps)
    student = students[TAPS[0]]
    mean, std = PREPROCESSING.mean, PREPROCESSING.std
    rows = []
    for modality, source, image in images():
        x, box = preprocess(image, 1024, mean, std, PREPROCESSING.resize)
        x = torch.from_numpy(x)[None]
        xt, _ = preprocess(image, 256, mean, std)
        valid = valid_grid(box, 64)[None]
        with torch.no_grad():
            started = time.perf_counter()
            s = student.embed(x, 0)
            student_s = time.perf_counter() - started
            started = time.perf_counter()
            t = teacher(torch.from_numpy(xt)[None])
            teacher_s = time.perf_counter() - started
            t_minmax = teacher(torch.from_numpy(minmax_input(image, 256))[None])
            others = {taps: students[taps].embed(x, 0) for taps in TAPS[1:]}
            set_kv_bias(student, -6.0)
            s_kv6 = student.embed(x, 0)
            set_kv_bias(student, -30.0)
        rows.append({
            "modality": modality, "source": source, "shape": list(np.asarray(image).shape),
            "valid_grid": [int(valid[0].any(1).sum()), int(valid[0].any(0).sum())],
            "cosine": round(float(embedding_cosine(s, t, valid)), 4),
            **{f"cosine_{taps}_taps": round(float(embedding_cosine(e, t, valid)), 4) for taps, e in others.items()},
            "cosine_vs_minmax_teacher": round(float(embedding_cosine(s, t_minmax, valid)), 4),
            "teacher_x255_vs_minmax": round(float(embedding_cosine(t, t_minmax, valid)), 4),
            "relative_error": round(float((s - t)[..., valid[0]].norm() / t[..., valid[0]].norm()), 4),
            "kv_bias_-6_max_abs_change": float((s_kv6 - s).abs().max()),
            "student_s": round(student_s, 2), "teacher_s": round(teacher_s, 2),
        })
        print(json.dumps(rows[-1]), flush=True)
    per_modality = {}
    for m in dict.fromkeys(r["modality"] for r in rows):
        mine = [r for r in rows if r["modality"] == m]
        per_modality[m] = {k: round(float(np.mean([r[k] for r in mine])), 4)
                           for k in ("cosine", *(f"cosine_{t}_taps" for t in TAPS[1:]), "cosine_vs_minmax_teacher",
                                     "teacher_x255_vs_minmax", "relative_error")}
        per_modality[m]["images"] = len(mine)
    result = {
        "what": "student (esp-medsam 1024², x/255, init_from_litemedsam: box taps, neutral controllers) "
                "vs LiteMedSAM teacher (256², x/255) embedding cosine before any training; per-position over "
                "the unpadded 64x64 grid, mean per image, then per modality",
        "teacher": {"file": asset_path().name, "sha256": sha256, "input": "x/255 at 256²"},
        "per_modality": per_modality,
        "images": rows,
        "init": report,
        "kv_gradients": {str(b): kv_gradients(student, b) for b in (-30.0, -10.0, -6.0)},
        "machine": {"cpu": cpu_info()["model"], "bf16": cpu_info()["bf16"], "threads": args.threads,
                    "torch": torch.__version__, "espmed": __version__, "python": platform.python_version()},
    }
    if not args.no_steps:
        result["stage1_step_s"] = {"fp32": step_seconds(student, None), "bf16": step_seconds(student, torch.bfloat16)}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_text(args.results_dir / "litemedsam_init.json", json.dumps(result, indent=2) + "\n")
    write_text(args.results_dir / "litemedsam_init.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    from espmed.train.litemedsam import TAPS

    lines = [
        "# LiteMedSAM initialisation: student vs teacher embedding cosine before training",
        "",
        f"`python benchmarks/litemedsam_init.py`. Student: esp-medsam at 1024², x/255, {TAPS[0]} patch-embed taps "
        f"(default; {' and '.join(TAPS[1:])} taps for comparison, see `spread_taps`); teacher: LiteMedSAM at 256², "
        "x/255 (min-max for comparison). Cosine per position over the unpadded 64x64 grid, mean per image, then "
        "per modality.",
        "",
        "| modality | images | cosine | " + " | ".join(f"cosine, {t} taps" for t in TAPS[1:])
        + " | cosine vs min-max teacher | teacher x/255 vs min-max | rel. error |",
        "|---|---:|---:|" + "---:|" * len(TAPS[1:]) + "---:|---:|---:|",
    ]
    for m, r in result["per_modality"].items():
        lines.append(f"| {m} | {r['images']} | {r['cosine']:.4f} | "
                     + " | ".join(f"{r[f'cosine_{t}_taps']:.4f}" for t in TAPS[1:])
                     + f" | {r['cosine_vs_minmax_teacher']:.4f} | {r['teacher_x255_vs_minmax']:.4f} | "
                     f"{r['relative_error']:.3f} |")
    lines += ["", "| part | values | from LiteMedSAM | set neutral |", "|---|---:|---:|---:|"]
    for part, r in result["init"].items():
        lines.append(f"| {part} | {r['values']:,} | {r['from_litemedsam']:,} | {r['neutral']:,} |")
    lines += ["", "K/V gradient norms after one backward (256²): "
              + "; ".join(f"bias {b}: " + ", ".join(f"{k} {v:.2e}" for k, v in g.items())
                          for b, g in result["kv_gradients"].items())]
    if "stage1_step_s" in result:
        s = result["stage1_step_s"]
        lines.append(f"\nStage-1 step (1024², batch 1, {result['machine']['threads']} threads): fp32 {s['fp32']} s, "
                     f"bf16 autocast {s['bf16']} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
