"""Seeded, fully randomised, non-degenerate ESP-MedSAM weights for benchmarking without a checkpoint.

Built like the release golden set: every parameter and buffer is random (BN statistics, norm
affines, TinyViT attention-bias tables, controller tokens and biases, decoder queries), with
scale-preserving weight initialisation so that activations stay finite through the 1024^2 trunk.
The SPPG output bias is then moved into the widest gap between the sorted patch logits of the
benchmark images near their 30th percentile, so that about 70 % of the patches are positive and
no patch logit lies close to the threshold: float-level differences between backends cannot flip
a patch, and the masks that follow are neither empty nor full.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..model import ESPMedSAM, ModelConfig

#: Target share of positive SPPG patches, and the window of shares the threshold may move in.
POSITIVE_SHARE = 0.70
POSITIVE_WINDOW = (0.60, 0.80)


def randomise_(model: ESPMedSAM, seed: int) -> ESPMedSAM:
    """Replace every parameter and buffer of `model` with seeded random values (in place)."""
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=g) * std + mean

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(normal(module.weight, 0.0, (1.0 / fan_in) ** 0.5))
                if module.bias is not None:
                    module.bias.copy_(normal(module.bias, 0.0, 0.02))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(normal(module.weight, 1.0, 0.1))
                module.bias.copy_(normal(module.bias, 0.0, 0.1))
                module.running_mean.copy_(normal(module.running_mean, 0.0, 0.1))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
        handled = {
            id(p)
            for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm))
            for p in m.parameters(recurse=False)
        }
        for name, p in model.named_parameters():
            if id(p) in handled:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" and p.dim() == 1:  # LayerNorm / LayerNorm2d scale
                p.copy_(normal(p, 1.0, 0.1))
            elif leaf == "bias" and p.dim() == 1:
                p.copy_(normal(p, 0.0, 0.1))
            else:  # attention-bias tables, controller tokens and biases, queries, embeddings
                p.copy_(normal(p, 0.0, 0.5))
        for name, b in model.named_buffers():
            if b.is_floating_point() and "running_" not in name:
                b.copy_(normal(b, 0.0, 1.0))  # e.g. the positional-encoding Gaussian matrix
    return model.eval()


def sppg_threshold_gap(patch_logits: np.ndarray) -> tuple[float, float]:
    """(shift, half-gap): subtracting `shift` from every patch logit puts the threshold 0 in the
    middle of the widest gap whose positive share lies in `POSITIVE_WINDOW`; `half-gap` is then
    the smallest distance of any patch logit from the threshold."""
    values = np.sort(np.asarray(patch_logits, np.float64).ravel())
    n = values.size
    lo = int(np.floor(n * (1.0 - POSITIVE_WINDOW[1])))
    hi = int(np.ceil(n * (1.0 - POSITIVE_WINDOW[0])))
    lo, hi = max(lo, 1), min(hi, n - 1)
    gaps = values[lo : hi + 1] - values[lo - 1 : hi]
    # Prefer wide gaps, and among near-equal ones the one closest to the target share.
    target = n * (1.0 - POSITIVE_SHARE)
    score = gaps / (1.0 + 0.5 * np.abs(np.arange(lo, hi + 1) - target) / max(hi - lo, 1))
    i = lo + int(np.argmax(score))
    return float((values[i - 1] + values[i]) / 2.0), float((values[i] - values[i - 1]) / 2.0)


def random_model(config: ModelConfig, seed: int, images: torch.Tensor, modality: int | str) -> tuple[ESPMedSAM, dict]:
    """A randomised model whose SPPG bias is placed for `images` (B, 3, S, S) at `modality`.

    Returns the model and a record of the placement (share of positive patches, smallest
    distance of a patch logit from the threshold, share of positive mask pixels).
    """
    torch.manual_seed(seed)
    model = randomise_(ESPMedSAM(config), seed)
    with torch.inference_mode():
        patch = torch.cat([model(images[i : i + 1], modality).patch_logits for i in range(len(images))])
    shift, margin = sppg_threshold_gap(patch.numpy())
    head = model.sppg.patch_head[-1]
    with torch.no_grad():
        head.bias -= shift
    with torch.inference_mode():
        outs = [model(images[i : i + 1], modality) for i in range(len(images))]
    patch = torch.cat([o.patch_logits for o in outs])
    masks = torch.cat([o.lowres_masks for o in outs])
    if not torch.isfinite(masks).all():
        raise RuntimeError(f"randomised weights (seed {seed}) give non-finite mask logits")
    record = {
        "seed": seed,
        "sppg_bias_shift": round(shift, 6),
        "positive_patch_share": round(float((patch >= 0).float().mean()), 4),
        "min_patch_logit_distance": float(patch.abs().min()),
        "positive_mask_share": round(float((masks >= 0).float().mean()), 4),
    }
    return model, record
