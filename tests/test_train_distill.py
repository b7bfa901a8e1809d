"""MMDKD: SAM teacher loading (no torchvision), embedding cache, the loss and its grid, stage 1/2
behaviour, MobileSAM init, the distill CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from espmed.data.reference import mni152_slices, nuclei_samples
from espmed.errors import CheckpointError
from espmed.model import ESPMedSAM, get_preset
from espmed.runtimes.preprocess import preprocess
from espmed.train.distill import distill, distill_autocast_dtype, embedding_loss, valid_grid
from espmed.train.mobilesam import load_mobilesam_into
from espmed.train.teacher import (
    SAM_MEAN,
    SAM_STD,
    TeacherEmbeddings,
    build_sam_encoder,
    infer_sam_encoder_args,
    load_sam_encoder,
)

TINY_TEACHER = dict(
    embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=64, out_chans=32, window_size=2
)


def _student(size=64):
    cfg = get_preset(
        "esp-medsam-tiny", image_size=size, modalities=("brain-mri", "microscopy"), controller_map=(0, 1), num_queries=3
    )
    torch.manual_seed(0)
    return ESPMedSAM(cfg)


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one intra-op thread


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    return build_sam_encoder(**TINY_TEACHER).eval()


@pytest.fixture(scope="module")
def samples():
    return mni152_slices("valid")[3:9] + nuclei_samples("valid")


def test_teacher_loads_without_torchvision_or_the_package_init():
    code = (
        "import sys; from espmed.train.teacher import build_sam_encoder; e = build_sam_encoder(embed_dim=32, depth=1, "
        "num_heads=1, global_attn_indexes=(0,), img_size=64, out_chans=16); "
        "print(type(e).__name__, 'torchvision' in sys.modules, 'segment_anything' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["ImageEncoderViT", "False", "False"], out.stderr


def test_sam_checkpoint_loads_into_the_same_function_as_metas_encoder(tmp_path, teacher):
    from tests.sam_oracle import import_segment_anything

    path = tmp_path / "sam_tiny.pth"
    state = {f"image_encoder.{k}": v for k, v in teacher.state_dict().items()}
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 32)  # full-SAM files carry the rest of SAM
    torch.save(state, path)
    loaded, ident = load_sam_encoder(path)
    assert len(ident) == 64 and not any(p.requires_grad for p in loaded.parameters())
    import_segment_anything()
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT

    oracle = ImageEncoderViT(
        depth=2, embed_dim=64, img_size=64, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2,
        patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=2, out_chans=32,
    )
    oracle.load_state_dict(teacher.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), oracle.eval()(x))


def test_encoder_args_are_inferred_for_vit_b():
    with torch.device("meta"):
        vit_b = build_sam_encoder()
    args = infer_sam_encoder_args(vit_b.state_dict())
    assert args == {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11),
                    "img_size": 1024, "out_chans": 256, "window_size": 14}


def test_teacher_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such teacher checkpoint"):
        load_sam_encoder(tmp_path / "missing.pth")
    torch.save({"layers.0.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a SAM ViT checkpoint"):
        load_sam_encoder(tmp_path / "other.pth")
    torch.save({"obj": object.__new__(TeacherEmbeddings)}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="refused to load teacher checkpoint safely"):
        load_sam_encoder(tmp_path / "pickle.pth")


def module_identity(module) -> str:
    """A content hash of a module's weights: the cache key of a teacher not loaded from a file."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _embeddings(teacher, cache_dir, identity=None, mean=SAM_MEAN, std=SAM_STD, size=64):
    identity = identity or module_identity(teacher)
    return TeacherEmbeddings(
        teacher, kind="sam", identity=identity, input_size=size, mean=mean, std=std, cache_dir=cache_dir
    )


def test_embedding_cache(tmp_path, teacher, samples):
    first = _embeddings(teacher, tmp_path)
    a = [first(s.image) for s in samples[:3]]
    assert (first.hits, first.misses) == (0, 3) and a[0].shape == (32, 4, 4)
    second = _embeddings(teacher, tmp_path)
    b = [second(s.image) for s in samples[:3]]
    assert (second.hits, second.misses) == (3, 0) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    image = samples[0].image
    for other in (_embeddings(teacher, tmp_path, identity="f" * 64),  # another teacher,
                  _embeddings(teacher, tmp_path, mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))):  # normalisation
        other(image)
        assert (other.hits, other.misses) == (0, 1)
    assert _embeddings(teacher, tmp_path, size=32).key(image) != first.key(image)  # or input size: never these entries
    assert first.describe() == {"kind": "sam", "sha256": first.identity, "input_size": 64, "mean": SAM_MEAN,
                                "std": SAM_STD}


def test_loss_and_cosine_cover_only_the_image_not_its_padding():
    x, box = preprocess(np.zeros((100, 50), np.uint8), 64, (0, 0, 0), (1, 1, 1))  # resized to 64 x 32
    valid = valid_grid(box, 4)
    assert valid.tolist() == [[True, True, False, False]] * 4
    torch.manual_seed(0)
    target = torch.randn(1, 8, 4, 4)
    pred = target.clone()
    pred[..., 2:] = -target[..., 2:]  # wrong only in the padding
    loss, mse, cosine = embedding_loss(pred, target, valid[None], cosine_weight=1.0)
    assert float(loss) == float(mse) == 0.0 and abs(float(cosine) - 1.0) < 1e-6
    loss, mse, cosine = embedding_loss(pred, target, torch.ones(1, 4, 4, dtype=torch.bool), cosine_weight=0.5)
    assert abs(float(cosine)) < 1e-6 and abs(float(loss) - float(mse) - 0.5) < 1e-6


def test_bf16_autocast_only_where_the_cpu_has_it(monkeypatch):
    import espmed.machine as machine

    cpu = torch.device("cpu")
    monkeypatch.setattr(machine, "cpu_info", lambda: {"bf16": False})
    assert distill_autocast_dtype("auto", cpu) is None and distill_autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(machine, "cpu_info", lambda: {"bf16": True})
    assert distill_autocast_dtype("auto", cpu) is torch.bfloat16 and distill_autocast_dtype("none", cpu) is None


def test_embed_is_the_forward_embedding():
    model = _student().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.embed(x, "microscopy"), model(x, "microscopy").embeddings)
        mixed = model.embed(x, ["microscopy", "brain-mri"])
        assert torch.allclose(mixed[1], model.embed(x[1:], "brain-mri")[0], atol=1e-5)
    assert mixed.shape == (2, 64, 4, 4)
    with pytest.raises(ValueError, match="multiples of 32"):
        model.embed(torch.zeros(1, 3, 40, 64), 0)


def test_stage1_and_stage2_losses_fall_and_stage2_keeps_the_trunk(tmp_path, teacher, samples):
    model = _student()
    embeddings = _embeddings(teacher, tmp_path / "cache")
    r1 = distill(model, samples, stage1_teacher=embeddings, stage1_epochs=8, batch_size=4, lr=2e-3, cosine_weight=0.5,
                 show_progress=False)
    assert r1["stage1"][-1] < 0.5 * r1["stage1"][0] and r1["stage1_cosine"][-1] > r1["stage1_cosine"][0]
    assert r1["teachers"] == {"stage1": embeddings.describe()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r2 = distill(model, samples, stage2_teacher=embeddings, stage2_epochs=8, batch_size=4, lr=2e-3, show_progress=False,
                 out_dir=tmp_path / "out")
    for ctrl in (0, 1):
        losses = r2[f"stage2/{ctrl}"]
        assert losses[-1] < 0.9 * losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".controllers.slots." in k for k in changed)  # trunk, neck, BN stats: bit-identical
    assert any(".slots.0." in k for k in changed) and any(".slots.1." in k for k in changed)
    assert r2["stage2_cache"] == {"hits": len(samples), "misses": len(samples)}  # stage 2 reused stage 1's entries
    assert (tmp_path / "out" / "distilled.safetensors").is_file()


def _as_mobilesam(model: ESPMedSAM) -> dict[str, torch.Tensor]:
    """What a MobileSAM file of this width would hold: image_encoder.* without controllers, plus extras."""
    state = {}
    for k, v in model.state_dict().items():
        if ".controllers." in k:
            continue
        if k.startswith("trunk."):
            state["image_encoder." + k[len("trunk."):]] = v.clone()
        elif k.startswith("neck."):
            state["image_encoder." + k] = v.clone()
    state["image_encoder.head.weight"] = torch.zeros(1000, 64)
    state["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 256)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    return state


def test_mobilesam_initialises_trunk_and_neck(tmp_path):
    source = _student(64)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    torch.save({"model": _as_mobilesam(source)}, tmp_path / "mobile_sam.pt")
    target = _student(64)
    keys = load_mobilesam_into(target, tmp_path / "mobile_sam.pt")
    assert keys and all(k.startswith(("trunk.", "neck.")) for k in keys)
    s, t = source.state_dict(), target.state_dict()
    shared = [k for k in t if k.startswith(("trunk.", "neck.")) and ".controllers." not in k]
    assert sorted(shared) == keys and all(torch.equal(s[k], t[k]) for k in keys)
    untouched = [k for k, _ in target.named_parameters() if k not in keys]
    assert untouched and not any(torch.equal(s[k], t[k]) for k in untouched)  # controllers, SPPG, decoder
    wide = ESPMedSAM(get_preset("esp-medsam-tiny", image_size=64, embed_dims=(32, 64, 96, 128)))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_mobilesam_into(wide, tmp_path / "mobile_sam.pt")


def test_cli_distill(tmp_path, teacher):
    torch.save({f"image_encoder.{k}": v for k, v in teacher.state_dict().items()}, tmp_path / "sam_tiny.pth")
    cfg = tmp_path / "distill.toml"
    cfg.write_text(f"""
[model]
preset = "esp-medsam-tiny"
image_size = 64
modalities = ["brain-mri", "microscopy"]
controller_map = [0, 1]
num_queries = 3
[train]
threads = 1
[distill]
cache_dir = "{tmp_path / 'cache'}"
[[data.train]]
kind = "dsb2018-nuclei"
split = "valid"
modality = "microscopy"
""")
    code = "import sys; from espmed.cli import run; sys.argv[0] = 'espmed'; run()"

    def cli(*args):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)

    out = tmp_path / "out"
    r = cli("distill", "--config", str(cfg), "--teacher", "sam", "--teacher-checkpoint", str(tmp_path / "sam_tiny.pth"),
            "--epochs", "3", "--cosine-weight", "0.5", "--out-dir", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout[: r.stdout.rindex("}") + 1])
    assert len(result["stage1"]) == 3 and len(result["stage2/1"]) == 3 and "stage2/0" not in result
    assert result["teachers"]["stage1"]["kind"] == "sam" and result["teachers"]["stage1"]["input_size"] == 64
    from espmed.model import load_checkpoint

    assert load_checkpoint(out / "distilled.safetensors").config.image_size == 64
    errors = ((("--teacher", "sam"), "needs a SAM ViT checkpoint"), (("--teacher", "dino"), "unknown teacher"))
    for args, message in errors:
        r = cli("distill", "--config", str(cfg), "--out-dir", str(out), *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_model_preprocessing_table_in_a_run_config():
    """A LiteMedSAM-initialised model takes x / 255; a config that trains it further says so."""
    from espmed.errors import ConfigError
    from espmed.train import build_model, parse_config

    raw = {"model": {"preset": "esp-medsam-tiny", "image_size": 64,
                     "preprocessing": {"mean": [0, 0, 0], "std": [255, 255, 255]}}}
    model = build_model(parse_config(raw))
    assert model.config.preprocessing.mean == (0, 0, 0) and model.config.preprocessing.std == (255, 255, 255)
    raw["model"]["preprocessing"]["resize"] = "longest-side-block-exact"
    assert build_model(parse_config(raw)).config.preprocessing.resize == "longest-side-block-exact"
    raw["model"]["preprocessing"]["resize"] = "stretch"
    with pytest.raises(ConfigError, match=r"\[model.preprocessing\]: resize must be one of"):
        parse_config(raw)
    raw["model"]["preprocessing"] = {"mean": [0, 0, 0]}
    with pytest.raises(ConfigError, match=r"\[model.preprocessing\]"):
        parse_config(raw)
