"""The real 1024² ESP-MedSAM: LiteMedSAM initialisation, MMDKD stages 1-3 on real data, shipping.

    bash benchmarks/real_model/fetch_data.sh               # once: weights and data (install time)
    nice python benchmarks/real_model/make_model.py all    # every stage below, in order
    nice python benchmarks/real_model/make_model.py STAGE  # one stage, from the previous one's output

Stages (outputs and training logs under runs/real/<stage>/, results under benchmarks/real_model/results/):
  init     `init_from_litemedsam` (box taps, neutral controllers, LiteMedSAM's box-prompted path, frozen
           from here on) + SPPG's prompt LayerNorm zeroed,
           so the decoder starts from LiteMedSAM's prompt-free state; held-out cosine at 1024².
  stage1   shared trunk + neck distilled at 1024² (teacher 256²) on every `configs/real-distill.toml`
           [[data.train]] image (optionally `--epochs-512` first at 512², teacher 128²); images of
           modalities the model ships no controller for pass through a neutral controller (controller
           0). BatchNorm statistics stay LiteMedSAM's (eval mode; affine parameters train). Measured
           here (results/README.md): BatchNorm statistics updated from batches of 2, lr 1e-4 or any
           512² epochs lower the held-out 1024² cosine well below the initialisation's.
  stage2   K/V logit bias -30 -> -6 (at -30 its gradients are ~1e-17), then each shipped controller
           distilled at 1024² on its own modality's images, trunk frozen.
  stage3   segmentation (`configs/real-segment.toml`: SPPG and decoder; trunk, controllers and neck
           frozen, BatchNorm statistics too) on real masks at its image size (1024²).
  eval     the stage-3 model at 1024² on the held-out images/volumes: Dice/IoU/HD95/NSD per image
           and per volume (pooled over its slices), plus the held-out teacher cosine.
  ship     fp16 safetensors under espmed/assets/models/ (the loader upcasts to fp32), but the shared
           encoder (trunk without controllers, neck) and the box-prompted path in fp32; measured again
           from the stored file, and its model card.
  box      (not part of `all`) the stage-3 model of a file shipped before the box-prompted path, as
           `all` now makes it (see `stage_box`); then `ship`.
  report   (not part of `all`) rewrite results/README.md and the model card from the stages' JSON.

The cosine: student at 1024² vs LiteMedSAM at 256², per-position over the unpadded 64x64 grid, mean
per image, then per modality (`espmed.train.distill.embedding_cosine`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNS = REPO / "runs" / "real"
RESULTS = REPO / "benchmarks" / "real_model" / "results"
DISTILL_CONFIG = REPO / "configs" / "real-distill.toml"
SEGMENT_CONFIG = REPO / "configs" / "real-segment.toml"
STAGES = ("init", "stage1", "stage2", "stage3", "eval", "ship")
#: The K/V logit bias stage 2 starts from (see the module docstring).
STAGE2_KV_BIAS = -6.0
EVAL_SIZE = 1024
#: Distillation batch sizes the shipped model was made with (`--batch-size` overrides both).
DISTILL_BATCH = {"stage1": 2, "stage2": 4}


def _checkpoint(stage: str) -> Path:
    return RUNS / stage / "model.safetensors"


def _samples(cfg, split: str):
    from espmed.data import load_samples

    return [s for spec in cfg.data[split] for s in load_samples(spec, cfg.base_dir)]


def _routed(samples, modalities):
    """Samples of modalities without a controller in the model, relabelled to the first one (neutral in
    stage 1, so only the shared trunk learns from them)."""
    return [s if s.modality in modalities else dataclasses.replace(s, modality=modalities[0]) for s in samples]


def _teacher(size: int):
    from espmed.train.teacher import load_teacher

    return load_teacher("litemedsam", None, student_size=size, cache_dir=RUNS / "teacher-cache")


def held_out_cosine(model, samples, *, neutral_for_unshipped: bool) -> dict:
    """Per-image and per-modality cosine at 1024² vs the teacher at 256² on held-out images."""
    import numpy as np
    import torch

    from espmed.runtimes.preprocess import preprocess
    from espmed.train.distill import embedding_cosine, valid_grid

    teacher, cfg = _teacher(EVAL_SIZE), model.config
    pre = cfg.preprocessing
    rows = []
    model.eval()
    for s in samples:
        shipped = s.modality in cfg.modalities
        if not shipped and not neutral_for_unshipped:
            continue
        x, box = preprocess(s.image, EVAL_SIZE, pre.mean, pre.std, pre.resize)
        with torch.no_grad():
            student = model.embed(torch.from_numpy(x)[None], s.modality if shipped else 0)
        target = teacher(s.image)[None]
        valid = valid_grid(box, student.shape[-1])[None]
        rows.append({"modality": s.modality, "image": s.name,
                     "cosine": round(float(embedding_cosine(student, target, valid)), 4)})
    per = {m: round(float(np.mean([r["cosine"] for r in rows if r["modality"] == m])), 4)
           for m in dict.fromkeys(r["modality"] for r in rows)}
    return {"per_modality": per, "images": rows}


def _neutral_copy(model):
    """The model with every controller neutral again (K/V bias -30, expert fc2 0): how the shared trunk
    alone embeds an image of a modality that ships no controller."""
    import copy

    from espmed.train.litemedsam import NEUTRAL_KV_LOGIT_BIAS

    neutral = copy.deepcopy(model)
    for bank in neutral.controller_banks():
        for slot in bank.slots:
            slot.expert.fc2.weight.data.zero_()
            slot.expert.fc2.bias.data.zero_()
            slot.kv_logit_bias.data.fill_(NEUTRAL_KV_LOGIT_BIAS)
    return neutral


def _write(name: str, result: dict) -> None:
    from espmed.atomic import write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / f"{name}.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("images", "history")}, indent=2), flush=True)


def _machine(threads: int) -> dict:
    import platform

    import torch

    from espmed.machine import cpu_info

    info = cpu_info()
    return {"where": "CPU (no GPU lent to this session)", "cpu": info["model"], "bf16": info["bf16"],
            "threads": threads, "torch": torch.__version__, "python": platform.python_version()}


# -- stages ------------------------------------------------------------------------------------
def stage_init(args) -> None:
    import torch

    from espmed.model import save_checkpoint
    from espmed.train import build_model, load_config
    from espmed.train.litemedsam import init_from_litemedsam

    cfg = load_config(DISTILL_CONFIG)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    report = init_from_litemedsam(model)
    ln = model.sppg.prompt_embed[1]
    with torch.no_grad():  # dense prompt GELU(0) = 0 until stage 3 trains SPPG
        ln.weight.zero_()
        ln.bias.zero_()
    save_checkpoint(model, _checkpoint("init"), {"espmed.real.stage": "init"})
    cosine = held_out_cosine(model, _samples(cfg, "test"), neutral_for_unshipped=True)
    _write("init", {"stage": "init", "init": report, "cosine": cosine, "machine": _machine(args.threads)})


def stage_distill(args, stage: str) -> None:
    from espmed.model import load_checkpoint, save_checkpoint
    from espmed.train import load_config
    from espmed.train.distill import distill

    cfg = load_config(DISTILL_CONFIG)
    d = cfg.distill
    previous = "init" if stage == "stage1" else "stage1"
    model = load_checkpoint(args.start or _checkpoint(previous))
    mods = model.config.modalities
    train = _samples(cfg, "train")
    batch_size = args.batch_size or DISTILL_BATCH[stage]
    fit = dict(batch_size=batch_size, lr=d.lr, gamma=d.gamma, cosine_weight=d.cosine_weight,
               amp=cfg.train.amp, seed=cfg.train.seed, show_progress=False)
    runs, started = [], time.monotonic()
    if stage == "stage1":
        epochs_1024 = d.stage1_epochs if args.epochs is None else args.epochs
        plan = [(cfg.model.image_size, args.epochs_512, "512"), (EVAL_SIZE, epochs_1024, "1024")]
        _freeze_batchnorm(model)  # batches of 2-4 images: keep LiteMedSAM's BatchNorm statistics
        for size, epochs, tag in plan:
            if not epochs:
                continue
            model.config = model.config.with_(image_size=size)
            shutil.rmtree(RUNS / stage / tag, ignore_errors=True)  # a fresh log: JsonlLog appends
            t0 = time.monotonic()
            result = distill(model, _routed(train, mods), stage1_teacher=_teacher(size), stage1_epochs=epochs,
                             out_dir=RUNS / stage / tag, **fit)
            runs.append({"image_size": size, "epochs": epochs, "images": len(train),
                         "seconds": round(time.monotonic() - t0, 1), "loss": result["stage1"],
                         "cosine_train": result["stage1_cosine"],
                         "steps": epochs * -(-len(train) // batch_size)})
            _write(f"stage1-{tag}", runs[-1])
    else:
        for bank in model.controller_banks():
            for slot in bank.slots:
                slot.kv_logit_bias.data.fill_(STAGE2_KV_BIAS)
        model.config = model.config.with_(image_size=EVAL_SIZE)
        shipped = [s for s in train if s.modality in mods]
        shutil.rmtree(RUNS / stage, ignore_errors=True)
        epochs = d.stage2_epochs if args.epochs is None else args.epochs
        t0 = time.monotonic()
        result = distill(model, shipped, stage2_teacher=_teacher(EVAL_SIZE), stage2_epochs=epochs,
                         out_dir=RUNS / stage, **fit)
        per_controller = [sum(model.config.controller_map[mods.index(s.modality)] == c for s in shipped)
                          for c in range(model.config.num_controllers)]
        runs.append({"image_size": EVAL_SIZE, "images": len(shipped), "epochs": epochs,
                     "steps": epochs * sum(-(-n // batch_size) for n in per_controller),
                     "seconds": round(time.monotonic() - t0, 1),
                     **{k: v for k, v in result.items() if k.startswith("stage2/")}})
    model.config = model.config.with_(image_size=cfg.model.image_size)
    save_checkpoint(model, _checkpoint(stage), {"espmed.real.stage": stage})
    test = _samples(cfg, "test")
    cosine = held_out_cosine(model, test, neutral_for_unshipped=stage == "stage1")
    if stage == "stage2":
        cosine["shared_trunk_neutral"] = held_out_cosine(_neutral_copy(model), test, neutral_for_unshipped=True)
    _write(stage, {"stage": stage, "runs": runs, "seconds": round(time.monotonic() - started, 1),
                   "cosine": cosine, "machine": _machine(args.threads),
                   "settings": {"lr": d.lr, "gamma": d.gamma, "cosine_weight": d.cosine_weight,
                                "batch_size": batch_size,
                                "kv_bias": STAGE2_KV_BIAS if stage == "stage2" else None}})


def _freeze_batchnorm(module) -> None:
    """Keep every BatchNorm of `module` in eval mode even when the model is put in train mode: a frozen
    trunk must not move its statistics to a few hundred crops of three modalities."""
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
            m.train = types.MethodType(lambda self, mode=True: self, m)


def stage_segment(args) -> None:
    from espmed.data import train_items
    from espmed.model import load_checkpoint
    from espmed.train import load_config, train

    cfg = load_config(SEGMENT_CONFIG)
    changes = {"out_dir": str(RUNS / "stage3")}
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    cfg = cfg.with_train(**changes)
    model = load_checkpoint(args.start or _checkpoint("stage2"))
    model.config = model.config.with_(image_size=cfg.model.image_size)
    if "trunk" not in cfg.train.trainable:
        _freeze_batchnorm(model.trunk)
    items = [i for spec in cfg.data["train"] for i in train_items(spec, cfg.base_dir)]
    shutil.rmtree(RUNS / "stage3", ignore_errors=True)  # a fresh run, not a resume
    started = time.monotonic()
    summary = train(cfg, items, [], show_progress=False, model=model)
    _write("stage3", {"stage": "stage3", "items": len(items), "trainable": list(cfg.train.trainable),
                      "seconds": round(time.monotonic() - started, 1), "machine": _machine(cfg.train.threads),
                      **{k: v for k, v in summary.items() if k != "losses"}})


def evaluate_model(model, out_dir: Path) -> dict:
    """Held-out metrics at 1024²: per image, per modality, and per volume (Dice pooled over its slices)."""
    from collections import defaultdict

    from espmed.train import load_config
    from espmed.train.evaluate import evaluate

    cfg = load_config(SEGMENT_CONFIG)
    samples = _samples(cfg, "test")
    model.config = model.config.with_(image_size=EVAL_SIZE)
    result = evaluate(model, samples, out_dir, save_predictions=True, nsd_tolerance=2.0, batch_size=2)
    volumes: dict[tuple, dict] = defaultdict(lambda: {"slices": 0, "tp": 0, "pred": 0, "truth": 0})
    from espmed.io import read_mask

    for s in samples:
        pred = read_mask(out_dir / "predictions" / f"{s.name}.png")
        v = volumes[(s.modality, s.name.split("_ax")[0], s.domain)]
        v["slices"] += 1
        v["tp"] += int((pred & s.mask).sum())
        v["pred"] += int(pred.sum())
        v["truth"] += int(s.mask.sum())
    per_volume = []
    for (modality, name, domain), v in volumes.items():
        rows = [r for r in result["images"] if r["name"].split("_ax")[0] == name]
        per_volume.append({
            "modality": modality, "volume_or_image": name, "domain": domain, "slices": v["slices"],
            "truth_pixels": v["truth"],
            "pred_pixels": v["pred"], "dice_pooled": round(2 * v["tp"] / max(1, v["pred"] + v["truth"]), 4),
            **{f"{m}_mean": round(sum(r[m] for r in rows) / len(rows), 4) for m in ("dice", "iou", "hd95", "nsd")},
        })
    return {"image_size": EVAL_SIZE, "summary": result["summary"], "per_volume": per_volume,
            "images": result["images"]}


def stage_eval(args) -> None:
    from espmed.model import load_checkpoint
    from espmed.train import load_config

    model = load_checkpoint(_checkpoint("stage3"))
    result = evaluate_model(model, RUNS / "eval")
    result["cosine"] = held_out_cosine(model, _samples(load_config(DISTILL_CONFIG), "test"),
                                       neutral_for_unshipped=False)
    _write("eval", result)


def stage_ship(args) -> None:
    import torch

    from espmed.atomic import file_sha256
    from espmed.model import default_checkpoint, load_checkpoint, save_checkpoint
    from espmed.train import load_config

    model = load_checkpoint(args.start or _checkpoint("stage3"))
    model.config = model.config.with_(image_size=EVAL_SIZE)
    out = default_checkpoint(required=False)
    save_checkpoint(model, out, {"espmed.real.recipe": "python benchmarks/real_model/make_model.py all"},
                    dtype=torch.float16, float32_keys=model.float32_keys())
    shipped = load_checkpoint(out)
    result = evaluate_model(shipped, RUNS / "ship")
    result["cosine"] = held_out_cosine(shipped, _samples(load_config(DISTILL_CONFIG), "test"),
                                       neutral_for_unshipped=False)
    result["file"] = {"path": str(out.relative_to(REPO)), "bytes": out.stat().st_size, "sha256": file_sha256(out)}
    from espmed.model.summary import parameter_table

    result["parameters"] = parameter_table(shipped)
    _write("ship", result)


def stage_box(args) -> None:
    """The stage-3 model of a file shipped before the box-prompted path existed (`--start`, default the
    shipped file), rebuilt as `all` now makes it: its controllers, SPPG and decoder as stored; the
    shared encoder LiteMedSAM's in float32 (stages 1-3 leave it as initialised: the file's copy must
    be its float16 rounding, checked tensor by tensor); LiteMedSAM's box-prompted path. Then `ship`."""
    import torch

    from espmed.model import ESPMedSAM, default_checkpoint, load_checkpoint, save_checkpoint
    from espmed.train.litemedsam import init_from_litemedsam

    old = load_checkpoint(args.start or default_checkpoint())
    fresh = ESPMedSAM(old.config.with_(box_prompts=True))
    init_from_litemedsam(fresh)
    state, init = old.state_dict(), fresh.state_dict()
    for key in fresh.float32_keys():
        if not key.startswith(("trunk.", "neck.")) or key.endswith("num_batches_tracked"):
            continue
        if not torch.equal(state[key], init[key].half().float()):
            raise SystemExit(f"{key}: not LiteMedSAM's initialisation; the shared encoder was trained, rerun `all`")
        state[key] = init[key]
    for key, value in init.items():
        state.setdefault(key, value)  # the box-prompted path
    fresh.load_state_dict(state, strict=True)
    save_checkpoint(fresh, _checkpoint("stage3"), {"espmed.real.stage": "stage3 (box path attached)"})


# -- reports -----------------------------------------------------------------------------------
def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cosine_table() -> list[str]:
    """Held-out cosine per modality after each stage that has run."""
    stages = {n: r for n in ("init", "stage1", "stage2", "ship") if (r := _load(n))}
    cols = {n: r["cosine"]["per_modality"] for n, r in stages.items()}
    if "stage2" in stages:
        cols["stage2 (shared trunk, neutral controllers)"] = stages["stage2"]["cosine"]["shared_trunk_neutral"][
            "per_modality"]
    modalities = list(dict.fromkeys(m for c in cols.values() for m in c))
    lines = ["| modality | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in modalities:
        lines.append(f"| {m} | " + " | ".join(f"{c[m]:.4f}" if m in c else "–" for c in cols.values()) + " |")
    return lines


def baseline_per_volume() -> dict[str, dict]:
    """The classical baseline (`espmed.baseline`) on the held-out images of the modalities that have
    one, per volume or image as `evaluate_model` groups them; no model involved."""
    from espmed.baseline import BASELINES
    from espmed.metrics import segmentation_metrics
    from espmed.train import load_config

    groups: dict[str, list] = {}
    for s in _samples(load_config(SEGMENT_CONFIG), "test"):
        if s.modality in BASELINES:
            groups.setdefault(s.name.split("_ax")[0], []).append((s, BASELINES[s.modality](s.image)))
    out = {}
    for name, pairs in groups.items():
        rows = [segmentation_metrics(pred, s.mask, nsd_tolerance=2.0) for s, pred in pairs]
        tp, pred_px, truth = (sum(int(x.sum()) for x in xs) for xs in zip(*(
            (p & s.mask, p, s.mask) for s, p in pairs), strict=True))
        out[name] = {"method": BASELINES[pairs[0][0].modality].name, "dice_pooled": 2 * tp / max(1, pred_px + truth),
                     **{f"{m}_mean": sum(r[m] for r in rows) / len(rows) for m in ("dice", "iou", "hd95", "nsd")}}
    return out


def metrics_table(result: dict) -> list[str]:
    """Per held-out volume or image; under each one with a classical baseline, the baseline's row."""
    baselines = baseline_per_volume()
    lines = ["| modality | held-out volume / image | slices | truth px | Dice (pooled) | Dice (mean/slice) | IoU "
             "| HD95 (px) | NSD (2 px) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in result["per_volume"]:
        source = v["volume_or_image"] + (" (unseen source)" if v.get("domain") == "unseen" else "")
        rows = [(v["modality"], source, v)]
        if b := baselines.get(v["volume_or_image"]):
            rows.append(("", f"↳ baseline: {b['method']}", b))
        for modality, what, m in rows:
            lines.append(f"| {modality} | {what} | {v['slices']} | {v['truth_pixels']:,} | "
                         f"{m['dice_pooled']:.4f} | {m['dice_mean']:.4f} | {m['iou_mean']:.4f} | "
                         f"{m['hd95_mean']:.2f} | {m['nsd_mean']:.4f} |")
    return lines


def box_prompt_tables(path: Path) -> str:
    """The parity and ground-truth tables of `benchmarks/box_prompts.py`'s Markdown, one heading level down."""
    text = path.read_text(encoding="utf-8")
    body = text[text.index("## Parity"):]
    return body.replace("\n## ", "\n### ").replace("## Parity", "### Parity", 1).strip()


def write_reports() -> None:
    """benchmarks/real_model/results/README.md from the stages' JSON; the model card when shipped."""
    from espmed.atomic import write_text

    lines = ["# The real ESP-MedSAM: stage results", "",
             "`python benchmarks/real_model/make_model.py STAGE`; each stage's JSON beside this file "
             "(its training log, `metrics.jsonl`, stays in the stage's folder under `runs/real/`).", "",
             "## Held-out teacher cosine (student 1024² vs LiteMedSAM 256²)", "", *cosine_table(), ""]
    if exps := _load("stage1-experiments"):
        lines += ["## Stage-1 variants (held-out cosine at 1024²)", "", exps["what"] + ".", ""]
        mods = list(exps["experiments"][0]["cosine"])
        lines += ["| variant | " + " | ".join(mods) + " |", "|---|" + "---:|" * len(mods)]
        lines += [f"| {e['name']} | " + " | ".join(f"{e['cosine'][m]:.4f}" for m in mods) + " |"
                  for e in exps["experiments"]]
        lines.append("")
    if resize := _load("resize-experiment"):
        lines += ["## Resize experiment (not shipped)", "", resize["what"], "",
                  "| stage-3 crops | resize at evaluation | held-out Dice |", "|---|---|---|"]
        lines += [f"| {r['stage3_crops']} | {r['eval_resize']} | "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)) + " |"
                  for r in resize["dice_held_out"]]
        lines += ["", resize["conclusion"], ""]
    for stage in ("stage1", "stage2", "stage3"):
        r = _load(stage)
        if r:
            lines.append(f"- {stage}: {r['seconds']:.0f} s on {r['machine']['where']}, {r['machine']['cpu']}, "
                         f"{r['machine']['threads']} threads" + _cost(r))
    for name in ("eval", "ship"):
        r = _load(name)
        if r:
            lines += ["", f"## Held-out segmentation at 1024² ({name})", "", *metrics_table(r)]
    write_text(RESULTS / "README.md", "\n".join(lines) + "\n")
    ship = _load("ship")
    box_results = REPO / "benchmarks" / "results" / "box_prompts.md"
    if ship:
        card = (Path(__file__).with_name("MODEL_CARD.template.md")).read_text()
        card = card.replace("{{FILE}}", f"`{Path(ship['file']['path']).name}`, {ship['file']['bytes']:,} bytes, "
                            f"sha256 `{ship['file']['sha256']}`")
        card = card.replace("{{COSINE}}", "\n".join(cosine_table()))
        card = card.replace("{{METRICS}}", "\n".join(metrics_table(ship)))
        card = card.replace("{{BOX_PROMPTS}}", box_prompt_tables(box_results) if box_results.is_file()
                            else "(not measured yet: run the command above)")
        card = card.replace("{{PARAMETERS}}", "\n".join(
            ["| part | parameters |", "|---|---:|"] + [f"| {k} | {v:,} |" for k, v in ship["parameters"].items()]))
        card = card.replace("{{INIT}}", "\n".join(
            ["| part | values | from LiteMedSAM | set neutral |", "|---|---:|---:|---:|"]
            + [f"| {k} | {v['values']:,} | {v['from_litemedsam']:,} | {v['neutral']:,} |"
               for k, v in _load("init")["init"].items()]))
        card = card.replace("{{STAGES}}", "\n".join(
            f"- {s}: {r['seconds']:.0f} s, {r['machine']['where']}, {r['machine']['cpu']}, "
            f"{r['machine']['threads']} threads" + _cost(r)
            for s in ("stage1", "stage2", "stage3") if (r := _load(s))))
        write_text((REPO / ship["file"]["path"]).with_name("MODEL_CARD.md"), card)


def _cost(result: dict) -> str:
    """Optimizer steps and training seconds per 100 steps (loading and held-out measurements excluded
    for the distillation stages, whose runs time themselves)."""
    runs = result.get("runs", [])
    steps = result.get("steps") or sum(r.get("steps", 0) for r in runs)
    seconds = sum(r["seconds"] for r in runs) if runs else result["seconds"]
    return f"; {steps} optimizer steps, {100 * seconds / steps:.0f} s per 100 steps" if steps else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=(*STAGES, "all", "box", "report"))
    parser.add_argument("--epochs", type=int, default=None, help="override the stage's epochs (stage1: at 1024²)")
    parser.add_argument("--epochs-512", type=int, default=0,
                        help="stage1: epochs at 512² (teacher 128²) before 1024²; default 0: they lower 1024² cosine")
    parser.add_argument("--start", type=Path, default=None,
                        help="stage1/2/3/ship: start from this checkpoint instead of the previous stage's output; "
                             "box: the shipped file to rebuild")
    parser.add_argument("--batch-size", type=int, default=0, help="distillation batch size (default: DISTILL_BATCH)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    run = {"init": stage_init, "stage1": lambda a: stage_distill(a, "stage1"),
           "stage2": lambda a: stage_distill(a, "stage2"), "stage3": stage_segment, "eval": stage_eval,
           "ship": stage_ship, "box": stage_box, "report": lambda a: None}
    for stage in STAGES if args.stage == "all" else (args.stage,):
        started = time.monotonic()
        run[stage](args)
        write_reports()
        print(f"{stage}: {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
