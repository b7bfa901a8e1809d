"""Modality controller: the per-modality part of the semi-parameter-sharing image encoder.

Each TinyViT block holds one controller per modality. A controller adds one learnable key/value
token per attention head (the same vector is appended to K and to V) with a scalar logit bias, and
an expert MLP that runs in parallel with the block MLP (release names: `deep_QKV_embeddings_med`,
`med_attention_biases`, `med_dah`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertMLP(nn.Module):
    """LayerNorm -> Linear(d, r*d) -> GELU -> Linear(r*d, d) (TinyViT's Mlp layout)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class ModalityController(nn.Module):
    """One modality's controller parameters for one TinyViT block."""

    def __init__(self, *, dim: int, num_heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.kv_token = nn.Parameter(torch.zeros(num_heads, 1, head_dim))
        self.kv_logit_bias = nn.Parameter(torch.zeros(1))
        self.expert = ExpertMLP(dim, int(dim * mlp_ratio))


class ControllerBank(nn.Module):
    """The controllers of one block, selected per sample by a controller index tensor.

    A batch of one modality (an int index: release files, exported graphs, single-modality
    training batches) runs plain layers. A mixed batch (a tensor of indices) stacks the parameters
    and gathers them per sample, so there is no Python loop over samples.
    """

    def __init__(self, *, num_controllers: int, dim: int, num_heads: int, head_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.slots = nn.ModuleList(
            ModalityController(dim=dim, num_heads=num_heads, head_dim=head_dim, mlp_ratio=mlp_ratio)
            for _ in range(num_controllers)
        )

    def kv(self, ctrl: int | torch.Tensor, rows: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Extra K/V token `(rows, heads, 1, hd)` and its logit bias, `(rows, 1, 1, 1)` for a mixed
        batch or `(1, 1, 1, 1)` for one controller (broadcast, so an exported graph keeps one small
        constant attention bias per block instead of one per window).

        `ctrl` is one controller index for the whole batch, or a (B,) tensor of them; `rows` =
        batch x windows, each sample's entry repeated for its `repeats` windows.
        """
        if isinstance(ctrl, int):
            c = self.slots[ctrl]
            token = c.kv_token.unsqueeze(0).expand(rows, -1, -1, -1)
            return token, c.kv_logit_bias.view(1, 1, 1, 1)
        tokens = torch.stack([c.kv_token for c in self.slots])[ctrl]
        biases = torch.stack([c.kv_logit_bias for c in self.slots])[ctrl]
        token = tokens.repeat_interleave(repeats, dim=0)
        bias = biases.view(-1, 1, 1, 1).repeat_interleave(repeats, dim=0)
        return token, bias

    def expert(self, x: torch.Tensor, ctrl: int | torch.Tensor) -> torch.Tensor:
        """Expert MLP of each sample's controller on `x` (B, H, W, C)."""
        if isinstance(ctrl, int):
            return self.slots[ctrl].expert(x)
        experts = [c.expert for c in self.slots]
        b, h, w, d = x.shape
        nw = torch.stack([e.norm.weight for e in experts])[ctrl].unsqueeze(1)
        nb = torch.stack([e.norm.bias for e in experts])[ctrl].unsqueeze(1)
        w1 = torch.stack([e.fc1.weight for e in experts])[ctrl]
        b1 = torch.stack([e.fc1.bias for e in experts])[ctrl].unsqueeze(1)
        w2 = torch.stack([e.fc2.weight for e in experts])[ctrl]
        b2 = torch.stack([e.fc2.bias for e in experts])[ctrl].unsqueeze(1)
        eps = experts[0].norm.eps
        t = F.layer_norm(x.reshape(b, h * w, d), (d,), eps=eps) * nw + nb
        t = F.gelu(torch.baddbmm(b1, t, w1.transpose(1, 2)))
        t = torch.baddbmm(b2, t, w2.transpose(1, 2))
        return t.view(b, h, w, d)
