"""Training engine: learning, exact resume, best-model export, partial training, configs, CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from espmed.data import TrainItem
from espmed.data.reference import mni152_slices, nuclei_samples
from espmed.errors import ConfigError
from espmed.model import load_checkpoint
from espmed.train import build_model, evaluate, load_config, parse_config, train
from espmed.train.engine import make_scheduler

REPO = Path(__file__).resolve().parents[1]


def tiny_config(out_dir, **train):
    return parse_config({
        "model": {"preset": "esp-medsam-tiny", "image_size": 64, "modalities": ["brain-mri", "microscopy"],
                  "controller_map": [0, 1], "num_queries": 3},
        "train": {"out_dir": str(out_dir), "epochs": 2, "batch_size": 2, "lr": 3e-3, "warmup_steps": 0,
                  "amp": "bf16", "threads": 1, **train},
    })


@pytest.fixture(scope="module")
def items():
    brain = mni152_slices("valid")[4:8]
    nuclei = nuclei_samples("valid")
    return [TrainItem(s, augment=True) for s in brain + nuclei]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_reaches_the_same_weights(tmp_path, items):
    straight = tiny_config(tmp_path / "a", checkpoint_every=2)
    ref = train(straight, items, show_progress=False)
    interrupted = tiny_config(tmp_path / "b", checkpoint_every=2)
    first = train(interrupted.with_train(max_steps=3), items, show_progress=False)
    assert first["steps"] == 3
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())["global_step"] == 3
    rest = train(interrupted, items, resume=True, show_progress=False)
    assert rest["steps"] == ref["steps"] == 8
    assert first["losses"] + rest["losses"] == ref["losses"]  # bit-identical loss curve
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step-0000008" / "model.safetensors").state_dict()
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "step-0000008" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    trainer_state = torch.load(tmp_path / "b" / "checkpoints" / "step-0000008" / "trainer_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(trainer_state)
    assert len(list((tmp_path / "b" / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_time_limit_fails_loudly_and_resume_finishes_the_same_model(tmp_path, items):
    from espmed.errors import TimeLimitError

    ref = train(tiny_config(tmp_path / "a", max_steps=4), items, show_progress=False)
    capped = tiny_config(tmp_path / "b", max_steps=4, max_minutes=1e-9)  # hit after the first step
    with pytest.raises(TimeLimitError, match=r"after step 1 of 4.*--resume"):
        train(capped, items, show_progress=False)
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())["global_step"] == 1
    assert not (tmp_path / "b" / "model.safetensors").exists()  # no half-trained model under the final name
    rest = train(tiny_config(tmp_path / "b", max_steps=4), items, resume=True, show_progress=False)
    assert rest["steps"] == ref["steps"] == 4
    assert rest["losses"] == ref["losses"][1:]
    a = load_checkpoint(tmp_path / "a" / "model.safetensors").state_dict()
    b = load_checkpoint(tmp_path / "b" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns_and_exports_the_best_model(tmp_path, items):
    valid = [it.sample for it in items]
    items = [TrainItem(s, augment=False) for s in valid]  # a steady loss curve to test against
    cfg = tiny_config(tmp_path, epochs=10, eval_every=5)
    before = evaluate(build_model(cfg), valid)["summary"]["seen"]
    summary = train(cfg, items, valid, show_progress=False)
    losses = summary["losses"]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    best = load_checkpoint(tmp_path / "model.safetensors")
    after = evaluate(best, valid)["summary"]["seen"]
    assert after["brain-mri"]["dice"] > before["brain-mri"]["dice"] + 0.2
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valids = [r for r in log if r["event"] == "valid"]
    assert summary["best_valid_dice"] == pytest.approx(max(r["mean_dice"] for r in valids))
    assert [r["step"] for r in log if r["event"] == "step"] == list(range(1, summary["steps"] + 1))


def test_only_the_trainable_parts_change(tmp_path, items):
    cfg = tiny_config(tmp_path, trainable=["decoder", "sppg"], max_steps=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    before = _weights(model)
    train(cfg, items, show_progress=False, model=model)
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k]) and after[k].is_floating_point()}
    # BatchNorm running statistics in the trunk move in train mode; no trunk/neck parameter does.
    params = dict(model.named_parameters())
    moved_params = {k.split(".")[0] for k in params if not torch.equal(before[k], params[k].detach())}
    assert moved_params == {"decoder", "sppg"}
    assert changed <= {"decoder", "sppg", "trunk"}


def test_lr_schedules():
    p = torch.nn.Parameter(torch.zeros(1))
    for schedule, last in (("cosine", 0.01), ("exponential", 0.5 ** (9 / 5)), ("constant", 1.0)):
        cfg = tiny_config("unused", schedule=schedule, gamma=0.5, epochs=2, warmup_steps=0, min_lr_ratio=0.01)
        opt = torch.optim.SGD([p], lr=1.0)
        sched = make_scheduler(opt, cfg.train, steps_per_epoch=5)
        lrs = []
        for _ in range(10):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[0] == pytest.approx(1.0)
        cosine_last = 0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.9)).item())
        assert lrs[-1] == pytest.approx(last if schedule != "cosine" else cosine_last, rel=1e-5)
        assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # consecutive pairs: one fewer than lrs


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="schedule"):
        tiny_config(tmp_path, schedule="linear")
    with pytest.raises(ConfigError, match="unknown keys"):
        tiny_config(tmp_path, learning_rate=1.0)
    with pytest.raises(ConfigError, match="unknown parts"):
        tiny_config(tmp_path, trainable=["encoder"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    cfg = load_config(REPO / "configs" / "reference.toml")
    assert cfg.model.modalities == ("brain-mri", "microscopy") and len(cfg.data["test"]) == 3


def _cli(*args):
    code = "import sys; from espmed.cli import run; sys.argv[0] = 'espmed'; run()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two threads on a shared 2-core CI box are far slower
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_train_then_eval(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
[model]
preset = "esp-medsam-tiny"
image_size = 64
modalities = ["brain-mri", "microscopy"]
controller_map = [0, 1]
num_queries = 3
[train]
out_dir = "{tmp_path / 'run'}"
epochs = 1
batch_size = 2
threads = 1
[[data.train]]
kind = "dsb2018-nuclei"
split = "train"
modality = "microscopy"
repeat = 4
crop = [64, 128]
[[data.valid]]
kind = "dsb2018-nuclei"
split = "valid"
modality = "microscopy"
[[data.test]]
kind = "dsb2018-nuclei"
split = "test"
modality = "microscopy"
""")
    r = _cli("train", "--config", str(cfg), "--no-progress")
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "run" / "model.safetensors"
    assert ckpt.is_file() and '"steps": 2' in r.stdout
    out = tmp_path / "eval"
    r = _cli("eval", "--checkpoint", str(ckpt), "--config", str(cfg), "--out-dir", str(out), "--save-png")
    assert r.returncode == 0, r.stderr
    rows = (out / "per_image.csv").read_text().splitlines()
    assert rows[0].startswith("name,modality,domain") and len(rows) == 5
    assert len(list((out / "predictions").glob("*.png"))) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert "microscopy" in summary["summary"]["seen"]
    # the classical baseline's row beside the model's: the recipe recomputed here by hand
    from scipy.ndimage import binary_fill_holes, gaussian_filter
    from skimage.filters import threshold_otsu

    from espmed.metrics import dice

    assert summary["baseline"]["methods"] == {"microscopy": "blur σ1.5 + Otsu + fill"}
    assert "↳ baseline (microscopy): blur σ1.5 + Otsu + fill" in r.stdout
    by_name = {row["name"]: row for row in csv.DictReader((out / "per_image.csv").open())}
    expected = []
    for s in nuclei_samples("test"):
        blurred = gaussian_filter(s.image.astype(np.float64), 1.5, mode="nearest", truncate=4.0)
        expected.append(dice(binary_fill_holes(blurred > threshold_otsu(blurred)), s.mask))
        assert float(by_name[s.name]["baseline_dice"]) == pytest.approx(expected[-1], abs=1e-5)
    assert summary["baseline"]["summary"]["seen"]["microscopy"]["dice"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert 0.5 < np.mean(expected) < 1.0
    # bad input: one-line error, exit 2, no traceback, nothing half-written
    r = _cli("eval", "--checkpoint", str(tmp_path / "missing.safetensors"), "--config", str(cfg))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = _cli("train", "--config", str(cfg), "--resume", "--out-dir", str(tmp_path / "fresh"))
    assert r.returncode == 2 and "no training checkpoint to resume from" in r.stderr
    r = _cli(
        "train", "--config", str(cfg), "--mobilesam", str(tmp_path / "mobile_sam.pt"), "--out-dir", str(tmp_path / "m")
    )
    assert r.returncode == 2 and "no such MobileSAM/TinyViT checkpoint" in r.stderr
    r = _cli("eval", "--checkpoint", str(ckpt), "--images", str(tmp_path))
    assert r.returncode == 2 and "--modality" in r.stderr
