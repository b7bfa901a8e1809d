"""The real data kinds (pyradiomics, stardist-nuclei, unlabelled), fp16 checkpoints and the shipped model."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from espmed.atomic import file_sha256
from espmed.data import load_samples, train_items
from espmed.errors import CheckpointError, DatasetSpecError, ImageReadError
from espmed.model import ESPMedSAM, default_checkpoint, get_preset, load_checkpoint, save_checkpoint
from espmed.model.checkpoint import STORED_DTYPE_METADATA_KEY

from .test_model import _randomise

HAS_STARDIST = importlib.util.find_spec("stardist") is not None


def test_unlabelled_image_has_an_empty_mask_and_cannot_train_segmentation():
    spec = {"kind": "unlabelled", "source": "skimage:camera", "modality": "xray"}
    (sample,) = load_samples(spec)
    assert sample.image.shape == (512, 512) and sample.mask.shape == (512, 512) and not sample.mask.any()
    with pytest.raises(DatasetSpecError, match="no masks"):
        train_items(spec)


@pytest.mark.parametrize("source, message", [
    ("camera", "<scheme>:<name>"), ("skimage:_fetch", "no image"), ("pydicom:nonexistent.dcm", "not found"),
])
def test_unlabelled_bad_source_is_a_read_error(source, message):
    with pytest.raises(ImageReadError, match=message):
        load_samples({"kind": "unlabelled", "source": source, "modality": "xray"})


def test_pyradiomics_missing_volume_names_the_fetch_script(tmp_path):
    with pytest.raises(ImageReadError, match="fetch_data.sh"):
        load_samples({"kind": "pyradiomics", "root": str(tmp_path), "volume": "lung1", "modality": "ct-lesion"})
    with pytest.raises(ImageReadError, match="unknown pyradiomics volume"):
        load_samples({"kind": "pyradiomics", "root": str(tmp_path), "volume": "lung9", "modality": "ct-lesion"})


def test_pyradiomics_volume_gives_its_foreground_slices(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    image = np.arange(4 * 32 * 32, dtype=np.int16).reshape(32, 32, 4)
    label = np.zeros_like(image, dtype=np.uint8)
    label[10:20, 12:18, 1] = 1
    label[5:8, 5:8, 3] = 1
    nrrd.write(str(tmp_path / "brain2_image.nrrd"), image)
    nrrd.write(str(tmp_path / "brain2_label.nrrd"), label)
    samples = load_samples({"kind": "pyradiomics", "root": str(tmp_path), "volume": "brain2", "modality": "mr-lesion"})
    assert [s.name for s in samples] == ["brain2_image_ax2_001", "brain2_image_ax2_003"]
    assert [int(s.mask.sum()) for s in samples] == [60, 9] and all(s.modality == "mr-lesion" for s in samples)


@pytest.mark.skipif(not HAS_STARDIST, reason="needs the stardist wheel (pip install --no-deps stardist==0.9.1)")
def test_stardist_nuclei_splits_are_disjoint_regions_with_foreground():
    (train,) = load_samples({"kind": "stardist-nuclei", "split": "train", "modality": "microscopy"})
    test = load_samples({"kind": "stardist-nuclei", "split": "test", "modality": "microscopy"})
    assert train.image.shape == (512, 256) and [s.image.shape for s in test] == [(256, 256), (256, 256)]
    assert all(s.mask.sum() > 1000 for s in [train, *test])
    with pytest.raises(ImageReadError, match="unknown stardist-nuclei split"):
        load_samples({"kind": "stardist-nuclei", "split": "valid", "modality": "microscopy"})


def test_dicom_overlay_mask_is_the_filled_outline():
    spec = {"kind": "dicom-overlay", "path": "pydicom:examples_overlay.dcm", "modality": "mr-lesion",
            "domain": "unseen"}
    (sample,) = load_samples(spec)
    assert sample.image.shape == (300, 484) and sample.domain == "unseen" and sample.name == "examples_overlay_6000"
    outline = np.asarray(load_dataset_overlay(), dtype=bool)
    # the plane also holds the viewer's "Tra" label and a box at the lower edge: only the lesion contour
    # (128 px) and the region it encloses are the mask
    assert outline.sum() == 222 and sample.mask.sum() == 920 and (sample.mask & outline).sum() == 128
    rows, cols = np.nonzero(sample.mask)
    assert 130 <= rows.min() and rows.max() <= 175 and 40 <= cols.min() and cols.max() <= 85  # the liver lesion


def load_dataset_overlay():
    from pydicom import examples

    return examples.overlay.overlay_array(0x6000)


@pytest.mark.parametrize("spec, error, message", [
    ({"path": "pydicom:CT_small.dcm"}, ImageReadError, "no overlay plane 6000"),
    ({"path": "pydicom:absent.dcm"}, ImageReadError, "not found"),
    ({"path": "absent.dcm"}, ImageReadError, "no such file"),
    ({"path": "scan.png"}, ImageReadError, "not a DICOM file"),
    ({"path": "pydicom:examples_overlay.dcm", "group": 0x6001}, DatasetSpecError, "overlay group"),
    ({"path": "pydicom:examples_overlay.dcm", "group": 0x6002}, ImageReadError, "no overlay plane 6002"),
])
def test_dicom_overlay_refusals(tmp_path, spec, error, message):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "scan.png")
    with pytest.raises(error, match=message):
        load_samples({"kind": "dicom-overlay", "modality": "mr-lesion", **spec}, tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda ds: setattr(ds[0x6000, 0x3000], "value", bytes(len(ds[0x6000, 0x3000].value))), "is empty"),
    (lambda ds: setattr(ds[0x6000, 0x0050], "value", [100, 1]), "outside the"),
])
def test_dicom_overlay_empty_or_misplaced_plane_is_a_read_error(tmp_path, change, message):
    from pydicom import examples

    ds = examples.overlay
    change(ds)
    ds.save_as(tmp_path / "marked.dcm")
    with pytest.raises(ImageReadError, match=message):
        load_samples({"kind": "dicom-overlay", "path": "marked.dcm", "modality": "mr-lesion"}, tmp_path)


def test_fp16_checkpoint_is_half_the_size_and_loads_as_float32(tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("esp-medsam-tiny", image_size=64)
    model = _randomise(ESPMedSAM(cfg)).eval()
    full, half = save_checkpoint(model, tmp_path / "fp32.safetensors"), tmp_path / "fp16.safetensors"
    save_checkpoint(model, half, dtype=torch.float16)
    with safe_open(str(half), framework="pt") as fh:
        assert fh.metadata()[STORED_DTYPE_METADATA_KEY] == "float16"
        assert {fh.get_tensor(k).dtype for k in fh.keys()} <= {torch.float16, torch.int64}
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert b.dtype == a.dtype and torch.allclose(a, b, rtol=1e-3, atol=1e-4), k
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x, 0).masks, loaded(x, 0).masks, atol=5e-2)
    with pytest.raises(ValueError, match="floating-point"):
        save_checkpoint(model, tmp_path / "int.safetensors", dtype=torch.int8)


def test_default_checkpoint_is_the_shipped_real_model():
    """fp16 but for the shared encoder and the box-prompted path (fp32: parity with LiteMedSAM)."""
    path = default_checkpoint()
    assert path.is_file() and path.stat().st_size <= 70e6
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert meta[STORED_DTYPE_METADATA_KEY] == "float16"
    assert dtypes["box_decoder.iou_token.weight"] == dtypes["trunk.layers.1.blocks.0.attn.qkv.weight"] == "F32"
    assert dtypes["trunk.layers.1.blocks.0.controllers.slots.0.kv_token"] == dtypes["decoder.queries.weight"] == "F16"
    cfg = json.loads(meta["espmed.config"])
    assert cfg["preset"] == "esp-medsam" and cfg["image_size"] == 1024
    assert cfg["modalities"] == ["microscopy", "ct-lesion", "mr-lesion"]
    assert cfg["preprocessing"]["mean"] == [0, 0, 0] and cfg["preprocessing"]["std"] == [255, 255, 255]
    card = path.with_name("MODEL_CARD.md")
    assert card.is_file() and file_sha256(path) in card.read_text()


def test_default_checkpoint_missing_is_a_checkpoint_error(monkeypatch, tmp_path):
    from espmed.model import checkpoint

    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT", tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="--random-weights"):
        checkpoint.default_checkpoint()
    assert checkpoint.default_checkpoint(required=False) == tmp_path / "absent.safetensors"


def test_info_describes_the_shipped_model_by_default_and_a_preset_on_request():
    from typer.testing import CliRunner

    from espmed.cli import app

    shipped = CliRunner().invoke(app, ["info", "--json"])
    assert shipped.exit_code == 0, shipped.output
    data = json.loads(shipped.output)
    assert data["checkpoint"] == str(default_checkpoint()) and data["modalities_with_controller"] == [
        "microscopy", "ct-lesion", "mr-lesion"]
    assert data["input_size"] == 1024 and data["preprocessing"]["std"] == [255, 255, 255]
    preset = json.loads(CliRunner().invoke(app, ["info", "--preset", "esp-medsam-tiny", "--json"]).output)
    assert preset["checkpoint"] is None and preset["preset"] == "esp-medsam-tiny"
    both = CliRunner().invoke(app, ["info", "--preset", "esp-medsam", "--checkpoint", str(default_checkpoint())])
    assert both.exit_code != 0 and "not both" in str(both.exception or both.output)


def test_bench_refuses_a_checkpoint_with_random_weights(tmp_path):
    from typer.testing import CliRunner

    from espmed.cli import app

    r = CliRunner().invoke(app, ["bench", "--random-weights", "--checkpoint", str(default_checkpoint()),
                                 "--out", str(tmp_path)])
    assert r.exit_code != 0 and "not both" in str(r.exception)
