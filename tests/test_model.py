"""Model structure: any input size, mixed-modality batches, specialisation, parameter counts."""

from __future__ import annotations

import pytest
import torch

from espmed.errors import ModalityError
from espmed.model import ESPMedSAM, get_preset
from espmed.model.summary import count_flops, parameter_table


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and BN statistic random, so every part influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


def tiny_two_controller_model() -> ESPMedSAM:
    cfg = get_preset("esp-medsam-tiny", modalities=("brain", "nuclei"), controller_map=(0, 1), num_queries=3)
    return _randomise(ESPMedSAM(cfg))


@pytest.mark.parametrize("size", [256, 512])
def test_release_architecture_forward_backward_at_reduced_size(size):
    model = ESPMedSAM(get_preset("esp-medsam", image_size=size)).train()
    x = torch.randn(1, 3, size, size)
    out = model(x, "dermoscopy")
    assert out.masks.shape == (1, 1, size, size)
    assert out.patch_logits.shape == (1, 1, size // 32, size // 32)
    assert out.embeddings.shape == (1, 256, size // 16, size // 16)
    (out.masks.mean() + out.patch_logits.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:5])
    assert model.trunk.patch_embed.seq[0].c.weight.grad.abs().sum() > 0


def test_non_square_input():
    model = tiny_two_controller_model()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 192, 320), "brain")
    assert out.masks.shape == (1, 1, 192, 320)
    assert out.patch_logits.shape == (1, 1, 6, 10)


def test_mixed_modality_batch_equals_one_by_one():
    model = tiny_two_controller_model()
    x = torch.randn(4, 3, 256, 256)
    mods = ["brain", "nuclei", "nuclei", "brain"]
    with torch.no_grad():
        batched = model(x, mods)
        single = [model(x[i : i + 1], mods[i]) for i in range(4)]
        as_tensor = model(x, torch.tensor([0, 1, 1, 0]))
    for field in ("masks", "patch_logits", "embeddings"):
        one = torch.cat([getattr(s, field) for s in single])
        torch.testing.assert_close(getattr(batched, field), one, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(getattr(as_tensor, field), getattr(batched, field), rtol=0, atol=0)
    # the two controllers really differ
    assert not torch.allclose(single[0].masks, model(x[:1], "nuclei").masks)


def test_specialize_keeps_one_controller_and_same_output():
    model = tiny_two_controller_model()
    special = model.specialize("nuclei")
    assert special.config.num_controllers == 1
    assert special.available_modalities == ("nuclei",)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(special(x, "nuclei").masks, model(x, "nuclei").masks, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModalityError):
        special(x, "brain")


def test_bad_modality_and_shapes_are_clear_errors():
    model = tiny_two_controller_model()
    x = torch.randn(1, 3, 256, 256)
    with pytest.raises(ModalityError, match="unknown modality 'liver'"):
        model(x, "liver")
    with pytest.raises(ModalityError, match="out of range"):
        model(x, 7)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 250, 256), "brain")
    with pytest.raises(ValueError, match="2 modalities for a batch of 1"):
        model(x, ["brain", "nuclei"])


def test_release_parameter_counts_and_flops():
    model = ESPMedSAM(get_preset("esp-medsam"))
    table = parameter_table(model)
    assert table["total"] == 12_461_727  # release 12,789,587 minus 327,860 unused
    assert table["controller 0 (all modalities)"] == 3_144_202
    assert table["SPPG"] == 66_817
    assert abs(count_flops(model) / 1e9 - 113.4) < 0.1


def test_six_controllers_count_the_trunk_once():
    cfg = get_preset("esp-medsam", controller_map=(0, 1, 2, 3, 4, 5))
    table = parameter_table(ESPMedSAM(cfg))
    assert table["total"] == 12_461_727 + 5 * 3_144_202
    assert [k for k in table if k.startswith("controller")][5] == "controller 5 (colonoscopy)"
