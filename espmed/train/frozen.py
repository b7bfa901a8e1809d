"""`freeze`: a module made a fixed teacher (no gradients, eval mode).

Its own module so that the teachers (`espmed.train.teacher`, which loads the LiteMedSAM teacher from
`espmed.train.litemedsam`) and `litemedsam` share it without importing each other.
"""

from __future__ import annotations

from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """`module` with every parameter's `requires_grad` off, in eval mode (returned for chaining)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
