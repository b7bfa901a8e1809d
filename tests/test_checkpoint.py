"""Release `.pth` and native safetensors checkpoints: strict key accounting, safe loading, merging."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch

from espmed.errors import CheckpointError
from espmed.model import ESPMedSAM, get_preset, load_checkpoint, merge_release_checkpoints, save_checkpoint
from espmed.model.checkpoint import RELEASE_UNUSED_KEYS, release_to_native_key

from .conftest import SHARED
from .test_model import _randomise, tiny_two_controller_model

RELEASE_KEYS = SHARED / "reference" / "official_state_dict.json"


@pytest.fixture(scope="module")
def release_sd(golden_dir):
    return torch.load(golden_dir / "official_random_state_dict.pth", weights_only=True)


def test_every_release_key_is_mapped_or_listed_unused():
    if not RELEASE_KEYS.is_file():
        pytest.skip(f"{RELEASE_KEYS} not found")
    keys = json.loads(RELEASE_KEYS.read_text())["state_dict"]
    assert len(keys) == 504
    model_keys = set(ESPMedSAM(get_preset("esp-medsam")).state_dict())
    mapped = {k: release_to_native_key(k) for k in keys if k not in RELEASE_UNUSED_KEYS}
    assert all(v is not None for v in mapped.values())
    assert set(mapped.values()) == model_keys  # consumed exactly once each
    assert len(RELEASE_UNUSED_KEYS) == 20 and RELEASE_UNUSED_KEYS <= set(keys)
    unused_params = sum(_numel(keys[k]["shape"]) for k in RELEASE_UNUSED_KEYS)
    assert unused_params == 327_860


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda sd: sd.pop("mask_query.weight"), "missing keys: decoder.queries.weight"),
        (lambda sd: sd.__setitem__("extra.layer.weight", torch.zeros(1)), "unexpected keys .*extra.layer.weight"),
        (
            lambda sd: sd.__setitem__("patch_decoder.3.bias", torch.zeros(2)),
            r"wrong tensor shapes: sppg.patch_head.3.bias \(2,\) != \(1,\)",
        ),
        (
            lambda sd: sd["dense_prompter.0.bias"].__setitem__(0, float("nan")),
            "non-finite values in sppg.prompt_embed.0.bias",
        ),
    ],
)
def test_tampered_release_checkpoint_names_the_keys(release_sd, tmp_path, tamper, message):
    sd = {k: v.clone() for k, v in release_sd.items()}
    tamper(sd)
    path = tmp_path / "tampered.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"echo pwned > {self.marker}",))


def test_pickle_payload_is_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "x": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load checkpoint safely"):
        load_checkpoint(path)
    assert not marker.exists()
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(plain)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pth")
    model = tiny_two_controller_model()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors checkpoint"):
        load_checkpoint(tmp_path / "cut.safetensors")


def test_native_round_trip_is_exact(tmp_path):
    model = tiny_two_controller_model()
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    with open(path, "rb") as fh:
        assert fh.read(9)[8:9] == b"{"  # safetensors, not a pickle/zip
    assert not zipfile.is_zipfile(path)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(loaded(x, ["brain", "nuclei"]).masks, model(x, ["brain", "nuclei"]).masks)
    special = load_checkpoint(path, modality="nuclei")
    assert special.available_modalities == ("nuclei",)


def test_release_file_converts_to_native(release_sd, golden_dir, tmp_path):
    release = load_checkpoint(golden_dir / "official_random_state_dict.pth")
    native = load_checkpoint(save_checkpoint(release, tmp_path / "release.safetensors"))
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(native(x, 3).masks, release(x, 3).masks)


def test_merge_release_files(release_sd, tmp_path):
    a, b = tmp_path / "derm.pth", tmp_path / "xray.pth"
    torch.save(release_sd, a)
    other = {k: v.clone() for k, v in release_sd.items()}
    for k in other:
        if "med_dah" in k or "deep_QKV" in k or "med_attention" in k:
            other[k] += 0.5  # a different controller
    torch.save(other, b)
    merged = merge_release_checkpoints({"dermoscopy": a, "xray": b}, image_size=256)
    assert merged.available_modalities == ("dermoscopy", "xray")
    assert merged.config.num_controllers == 2
    x = torch.randn(2, 3, 256, 256)
    single_a = load_checkpoint(a, modality="dermoscopy", image_size=256)
    with torch.no_grad():
        torch.testing.assert_close(merged(x[:1], "dermoscopy").masks, single_a(x[:1], "dermoscopy").masks)
        mixed = merged(x, ["dermoscopy", "xray"])
        torch.testing.assert_close(mixed.masks[:1], single_a(x[:1], "dermoscopy").masks, rtol=1e-5, atol=1e-5)

    other["mask_query.weight"] += 1e-3  # shared weight differs now
    torch.save(other, b)
    with pytest.raises(
        CheckpointError, match=r"shared tensors differ .*decoder.queries.weight \(xray: max \|diff\| 0.001\)"
    ):
        merge_release_checkpoints({"dermoscopy": a, "xray": b})


def test_randomised_tiny_model_is_not_degenerate():
    """Guard for the fixtures above: random weights give varied masks, not a constant."""
    model = _randomise(ESPMedSAM(get_preset("esp-medsam-tiny")))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256), 0)
    assert out.masks.std() > 1e-3
