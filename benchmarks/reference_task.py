"""Reference task: train one two-controller ESP-MedSAM on real data and report held-out accuracy.

    python benchmarks/reference_task.py                       # configs/reference.toml
    python benchmarks/reference_task.py --config my.toml --results-dir /tmp/res

Brain: MNI152 2009 T1 axial slices with the brain mask (nilearn); nuclei: DSB-2018 (stardist, CC0);
splits in `espmed/data/reference.py`. Trains from scratch at 256x256 on CPU, keeps the best model by
validation Dice (`<out_dir>/model.safetensors`), evaluates it on the held-out test split and an
unseen-domain split (coronal brain slices), and writes `benchmarks/results/reference_task.json`
and `.md`. Targets: held-out Dice >= 0.95 (brain) and >= 0.80 (nuclei).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"brain-mri": 0.95, "microscopy": 0.80}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "reference.toml")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--out-dir", type=Path, default=None, help="run folder (default: the config's out_dir)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import psutil
    import torch

    from espmed import __version__
    from espmed.atomic import file_sha256, write_text
    from espmed.data import load_samples, train_items
    from espmed.model import load_checkpoint
    from espmed.model.summary import count_flops
    from espmed.train import evaluate, load_config, train

    cfg = load_config(args.config)
    if args.out_dir is not None:
        cfg = cfg.with_train(out_dir=str(args.out_dir))
    run_dir = Path(cfg.train.out_dir)
    started = time.monotonic()
    items = [i for spec in cfg.data["train"] for i in train_items(spec, cfg.base_dir)]
    valid = [s for spec in cfg.data["valid"] for s in load_samples(spec, cfg.base_dir)]
    test = [s for spec in cfg.data["test"] for s in load_samples(spec, cfg.base_dir)]
    load_s = time.monotonic() - started
    summary = train(cfg, items, valid, show_progress=not args.no_progress)
    best = load_checkpoint(run_dir / "model.safetensors")
    result = evaluate(best, test, out_dir=run_dir / "eval")
    total_s = time.monotonic() - started

    seen = result["summary"].get("seen", {})
    passed = {m: seen.get(m, {}).get("dice", 0.0) >= target for m, target in TARGETS.items()}
    report = {
        "task": "reference: MNI152 brain slices (brain-mri) + DSB-2018 nuclei (microscopy), one model, two controllers",
        "command": "python benchmarks/reference_task.py",
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "espmed_version": __version__,
        "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "model": {"preset": best.config.preset, "image_size": best.config.image_size,
                  "modalities": list(best.config.modalities), "controller_map": list(best.config.controller_map),
                  "parameters": sum(p.numel() for p in best.parameters()),
                  "gflops_per_image": round(count_flops(best) / 1e9, 3)},
        "data": {"train_items_per_epoch": len(items), "valid_images": len(valid), "test_images": len(test),
                 "splits": "see espmed/data/reference.py (disjoint slices / image regions)"},
        "training": {k: v for k, v in summary.items() if k != "losses"},
        "checkpoint": {"path": str(run_dir / "model.safetensors"),
                       "sha256": file_sha256(run_dir / "model.safetensors")},
        "test": result["summary"],
        "targets": {m: {"dice_at_least": t, "passed": passed[m]} for m, t in TARGETS.items()},
        "seconds": {"data": round(load_s, 1), "train": summary["seconds"], "total": round(total_s, 1)},
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_text(args.results_dir / "reference_task.json", json.dumps(report, indent=2) + "\n")
    write_text(args.results_dir / "reference_task.md", _markdown(report))
    print(_markdown(report))
    return 0 if all(passed.values()) else 1


def _markdown(r: dict) -> str:
    lines = [
        "# Reference task results",
        "",
        f"Command: `{r['command']}` (config `{r['config']}`), espmed {r['espmed_version']}, torch {r['torch']}.",
        f"Machine: {r['machine']['platform']}, {r['machine']['cpu_count']} CPU cores, "
        f"{r['machine']['torch_threads']} torch threads (shared with other jobs while it ran).",
        f"Model: {r['model']['preset']} at {r['model']['image_size']}², {r['model']['parameters']:,} parameters, "
        f"{r['model']['gflops_per_image']} GFLOPs/image, "
        f"controllers {r['model']['controller_map']} for {r['model']['modalities']}.",
        f"Training: {r['training']['steps']} optimizer steps, {r['training']['epochs_completed']} epochs, "
        f"best validation mean Dice {r['training']['best_valid_dice']:.4f} at step {r['training']['best_step']}; "
        f"wall time {r['seconds']['total'] / 60:.1f} min total ({r['seconds']['train'] / 60:.1f} min training).",
        "Held-out test data (disjoint from training): brain = axial MNI152 slices z = 20, 30, …, 140 (training "
        "uses z mod 10 in {2, 3, 7, 8}, validation z mod 10 = 5); nuclei = bottom-right quadrant of the 512² DSB-2018 "
        "image as four 128² tiles (training: left half; validation: top-right quadrant); unseen domain = coronal "
        "brain slices (training saw axial slices only). Metrics at each image's original size, through the shared "
        "numpy pre/post-processing. The brain mask is the non-zero region of nilearn's MNI152 T1, which is "
        "skull-stripped: the brain Dice measures foreground vs background, not brain extraction.",
        "",
        "| domain | modality | images | Dice | IoU | HD95 (px) | NSD (2 px) | target | passed |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for domain, mods in r["test"].items():
        for m, s in mods.items():
            target = r["targets"].get(m) if domain == "seen" else None
            target_cell = "Dice ≥ " + str(target["dice_at_least"]) if target else "–"
            passed_cell = ("yes" if target["passed"] else "NO") if target else "–"
            lines.append(
                f"| {domain} | {m} | {s['images']} | {s['dice']:.4f} | {s['iou']:.4f} | {s['hd95']:.2f} | "
                f"{s['nsd']:.4f} | {target_cell} | {passed_cell} |"
            )
    lines += ["", f"Checkpoint: `{r['checkpoint']['path']}` (sha256 `{r['checkpoint']['sha256'][:16]}…`).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
