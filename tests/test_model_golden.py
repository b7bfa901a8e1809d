"""The release weights must reproduce the release's own forward pass (golden outputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from espmed.model import load_checkpoint

TOL = 1e-4
MEAN = np.array([123.675, 116.28, 103.53], np.float32)


def _prep(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((u8.astype(np.float32) - MEAN) / MEAN).transpose(2, 0, 1)[None].copy())


@pytest.fixture(scope="module")
def golden(golden_dir):
    model = load_checkpoint(golden_dir / "official_random_state_dict.pth")
    images = np.load(golden_dir / "images.npz")
    outputs = np.load(golden_dir / "official_golden_outputs.npz")
    return model, images, outputs


def _maxerr(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape
    return float(np.abs(a.numpy() - b).max())


def test_retina_single_image_matches_release(golden):
    model, images, ref = golden
    with torch.no_grad():
        out = model(_prep(images["retina"]), "fundus")
        hs, upscaled = model.decoder.decode_queries(out.embeddings, model.sppg(out.embeddings)[1])
        all_six = torch.cat([model.decoder.query_masks(hs[:, q], upscaled, 0) for q in range(6)], dim=1)
    assert _maxerr(out.embeddings, ref["retina_embeddings"]) <= TOL
    assert _maxerr(out.patch_logits, ref["retina_patch_map"]) <= TOL
    assert _maxerr(out.masks, ref["retina_masks_m3"]) <= TOL
    assert _maxerr(all_six, ref["retina_lowres_masks_all"]) <= TOL
    # the selected query's low-resolution mask is the fourth of the six
    assert torch.equal(out.lowres_masks, all_six[:, 3:4])


def test_batch_of_two_matches_release(golden):
    model, images, ref = golden
    x = torch.cat([_prep(images["retina"]), _prep(images["nuclei"])])
    with torch.no_grad():
        out = model(x, 0)
    assert _maxerr(out.masks, ref["batch2_masks_m0"]) <= TOL
    assert _maxerr(out.patch_logits, ref["batch2_patch_map"]) <= TOL


def test_release_checkpoint_restricted_to_one_modality(golden_dir):
    from espmed.errors import ModalityError

    model = load_checkpoint(golden_dir / "official_random_state_dict.pth", modality="fundus")
    assert model.available_modalities == ("fundus",)
    with pytest.raises(ModalityError, match="no modality controller for 'xray'"):
        model(torch.zeros(1, 3, 64, 64), "xray")
