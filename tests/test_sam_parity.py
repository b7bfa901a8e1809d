"""Our in-tree copies of SAM's two-way transformer and positional encoding equal Meta's modules."""

from __future__ import annotations

import pytest
import torch

from espmed.model.position_encoding import PositionEmbeddingRandom
from espmed.model.transformer import TwoWayTransformer

from .sam_oracle import import_segment_anything


@pytest.fixture(scope="module")
def sam():
    try:
        import_segment_anything()
    except ImportError as exc:
        pytest.skip(f"segment-anything not installed: {exc}")
    from segment_anything.modeling import prompt_encoder, transformer

    return transformer, prompt_encoder


def test_two_way_transformer_matches_meta(sam):
    transformer, _ = sam
    torch.manual_seed(0)
    ref = transformer.TwoWayTransformer(depth=2, embedding_dim=64, num_heads=4, mlp_dim=128).eval()
    ours = TwoWayTransformer(depth=2, embedding_dim=64, num_heads=4, mlp_dim=128).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    img, pe, tokens = torch.randn(2, 64, 8, 12), torch.randn(2, 64, 8, 12), torch.randn(2, 7, 64)
    with torch.no_grad():
        q_ref, k_ref = ref(img, pe, tokens)
        q, k = ours(img, pe, tokens)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)


def test_dense_positional_encoding_matches_meta(sam):
    _, prompt_encoder = sam
    ref = prompt_encoder.PositionEmbeddingRandom(num_pos_feats=32)
    ours = PositionEmbeddingRandom(32)
    ours.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ours(16, 24), ref((16, 24)), rtol=1e-6, atol=1e-6)
