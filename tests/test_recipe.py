"""The INT8 float-layer recipe: read, refused when tampered or for another checkpoint, tried first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from espmed.errors import ExportError
from espmed.export.calibration import default_calibration_dir, load_calibration
from espmed.export.quantize import FLOAT_LEVELS, search_levels
from espmed.export.recipe import Recipe, find_recipe, read_recipe, recipe_beside

NODES = [
    "trunk.patch_embed.seq.0.bn/Conv_0",
    "trunk.layers.1.blocks.0.attn.qkv/MatMul_3",
    "trunk.layers.1.blocks.1.mlp.fc1/MatMul_9",
    "trunk.layers.10.blocks.0.mlp.fc1/MatMul_11",
    "decoder.output_upscaling.0/ConvTranspose_40",
]


def _recipe(**kw) -> Recipe:
    return Recipe(checkpoint_sha256="ab" * 32, float_blocks={"openvino": [r"^trunk\.layers\.1\.blocks\.0([./]|$)"]},
                  **kw)


def test_recipe_round_trip_and_matching(tmp_path):
    path = tmp_path / "m.quantization.json"
    _recipe(smooth_quant_alpha=0.5, runtime_precision="bf16").write(path)
    got = read_recipe(path, "ab" * 32)
    assert got.smooth_quant_alpha == 0.5 and got.runtime_precision == "bf16" and got.source == str(path)
    assert got.float_layers("openvino", NODES) == ["trunk.layers.1.blocks.0.attn.qkv/MatMul_3"]
    assert got.float_layers("onnxruntime", NODES) == []  # no patterns for that backend


def test_recipe_for_another_checkpoint_or_tampered_is_refused(tmp_path):
    path = tmp_path / "m.quantization.json"
    _recipe().write(path)
    with pytest.raises(ExportError, match="ranked on checkpoint abababababab"):
        read_recipe(path, "cd" * 32)
    data = json.loads(path.read_text())
    for bad, match in (
        ({**data, "schema": "x"}, "not an espmed quantization recipe"),
        ({**data, "float_blocks": {"openvino": ["("]}}, "malformed quantization recipe"),
        ({**data, "unknown": 1}, "malformed quantization recipe"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ExportError, match=match):
            read_recipe(path, "ab" * 32)
    path.write_text("{not json")
    with pytest.raises(ExportError, match="cannot read the quantization recipe"):
        read_recipe(path, "ab" * 32)


def test_find_recipe_beside_the_checkpoint_unless_none(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    assert find_recipe(None, ckpt, "ab" * 32) is None
    _recipe().write(recipe_beside(ckpt))
    assert recipe_beside(ckpt).name == "model.quantization.json"
    assert find_recipe(None, ckpt, "ab" * 32).source == str(recipe_beside(ckpt))
    assert find_recipe("none", ckpt, "ab" * 32) is None
    with pytest.raises(ExportError, match="cannot read"):
        find_recipe(tmp_path / "missing.json", ckpt, "ab" * 32)


def test_search_tries_the_recipe_first_then_the_levels_on_top_of_it():
    levels = search_levels(NODES, recipe=_recipe(), backend="openvino")
    assert levels[0] == ("recipe (sensitivity ranking)", ["trunk.layers.1.blocks.0.attn.qkv/MatMul_3"])
    assert len(levels) == 1 + len(FLOAT_LEVELS)
    assert all("trunk.layers.1.blocks.0.attn.qkv/MatMul_3" in layers for _, layers in levels)
    plain = search_levels(NODES, recipe=None, backend="openvino")
    assert [label for label, _ in plain] == [label for label, _ in FLOAT_LEVELS]


def test_calibration_folder_with_calibration_and_held_out_subfolders(tmp_path):
    samples = default_calibration_dir()
    (tmp_path / "calibration").mkdir()
    (tmp_path / "held_out").mkdir()
    for name in ("fundus_retina.png", "ct_small.png"):
        shutil.copy(samples / name, tmp_path / "calibration" / name)
    np.save(tmp_path / "held_out" / "slice.npy", np.arange(64 * 48, dtype=np.int16).reshape(64, 48))
    got = load_calibration(tmp_path, 64, (0, 0, 0), (255, 255, 255))
    assert [im.path.name for im in got.calibration] == ["ct_small.png", "fundus_retina.png"]
    assert [im.path.name for im in got.held_out] == ["slice.npy"]
    assert got.held_out[0].x.shape == (3, 64, 64)



def test_the_shipped_recipe_belongs_to_the_shipped_checkpoint():
    from espmed.atomic import file_sha256
    from espmed.model import default_checkpoint

    ckpt = default_checkpoint()
    recipe = find_recipe(None, ckpt, file_sha256(ckpt))
    assert recipe is not None and recipe.runtime_precision in ("f32", "bf16")
    assert recipe.float_blocks["openvino"] and recipe.float_blocks["onnxruntime"]
    verified = recipe.ranking["verified"]
    assert verified["mixes"][recipe.runtime_precision]["passes"]
    names = ["trunk.layers.0.blocks.0.conv1/Conv_3", "trunk.layers.3.blocks.1.mlp.fc1/MatMul_9"]
    assert recipe.float_layers("openvino", names) == names[:1]


def test_bench_measures_a_calibration_folder_on_its_held_out_images(tmp_path):
    from PIL import Image

    from espmed.benchmark.data import list_samples
    from espmed.export.calibration import set_files

    for sub in ("calibration", "held_out", "held_out/masks"):
        (tmp_path / sub).mkdir()
    np.save(tmp_path / "calibration" / "c.npy", np.ones((32, 32), np.int16))
    np.save(tmp_path / "held_out" / "h.npy", np.ones((32, 32), np.int16))
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "held_out" / "masks" / "h.png")
    [sample] = list_samples(tmp_path)
    assert sample.name == "h" and sample.mask == str((tmp_path / "held_out" / "masks" / "h.png").resolve())
    assert [p.name for p in set_files(tmp_path)] == ["c.npy", "h.npy"]


def test_bench_calibrates_a_trained_model_on_its_modalitys_bundled_images(tmp_path):
    from espmed.benchmark.data import list_samples
    from espmed.benchmark.exports import calibration_dir
    from espmed.benchmark.options import BenchOptions
    from espmed.model import default_checkpoint

    trained = BenchOptions(checkpoint=default_checkpoint())
    got = calibration_dir(trained, "microscopy", tmp_path)
    nuclei = sorted(Path(s.image).name for s in list_samples() if s.modality == "microscopy")
    assert got == tmp_path / "calibration" / "microscopy" and sorted(p.name for p in got.iterdir()) == nuclei
    assert calibration_dir(BenchOptions(checkpoint=None), "microscopy", tmp_path) is None  # random weights: all
    folder = tmp_path / "own"
    folder.mkdir()
    assert calibration_dir(BenchOptions(checkpoint=default_checkpoint(), data=folder), "microscopy", tmp_path) == folder
    other = calibration_dir(trained, "ct-lesion", tmp_path)  # no bundled image of it: all
    assert other is None
