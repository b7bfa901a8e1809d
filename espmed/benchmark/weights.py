"""Seeded, fully randomised, non-degenerate ESP-MedSAM weights for benchmarking without a checkpoint.

Built like the release golden set: every parameter and buffer is random (BN statistics, norm
affines, TinyViT attention-bias tables, controller tokens and biases, decoder queries), with
scale-preserving weight initialisation so that activations stay finite through the 1024^2 trunk.
The SPPG output layer is then scaled so that the patch logits of the benchmark images have a
standard deviation of `PATCH_LOGIT_STD` (spread out, so that wide gaps exist), and its bias is
moved into the widest gap between the sorted patch logits near their 30th percentile: about 70 %
of the patches are positive and no patch logit lies close to the threshold, so float-level
differences between backends cannot flip a patch, and the masks that follow are neither empty
nor full.

Such weights are made once per preset, size, seed, modality and image set and kept in
`--out/weights` (`random_checkpoint`): placing the SPPG bias runs the model on every image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..atomic import write_text
from ..io import read_frame
from ..model import ESPMedSAM, ModelConfig, load_checkpoint, save_checkpoint
from ..runtimes.preprocess import preprocess

if TYPE_CHECKING:
    from .data import Sample

#: Version of the scheme below; part of the benchmark's weight-cache key.
SCHEME = 2
#: Target share of positive SPPG patches, and the window of shares the threshold may move in.
POSITIVE_SHARE = 0.70
POSITIVE_WINDOW = (0.55, 0.85)
PATCH_LOGIT_STD = 2.0
#: No patch logit may lie closer than this to the threshold.
MIN_MARGIN = 2e-3


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
    middle of a gap between sorted patch logits whose positive share lies in `POSITIVE_WINDOW`:
    the gap closest to `POSITIVE_SHARE` among those at least `2 * MIN_MARGIN` wide, else the
    widest. `half-gap` is then the smallest distance of any patch logit from the threshold."""
    values = np.sort(np.asarray(patch_logits, np.float64).ravel())
    n = values.size
    lo = max(int(np.floor(n * (1.0 - POSITIVE_WINDOW[1]))), 1)
    hi = min(int(np.ceil(n * (1.0 - POSITIVE_WINDOW[0]))), n - 1)
    gaps = values[lo : hi + 1] - values[lo - 1 : hi]
    positions = np.arange(lo, hi + 1)
    wide = np.flatnonzero(gaps >= 2 * MIN_MARGIN)
    if wide.size:
        k = wide[np.argmin(np.abs(positions[wide] - n * (1.0 - POSITIVE_SHARE)))]
    else:
        k = int(np.argmax(gaps))
    i = lo + int(k)
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
    head = model.sppg.patch_head[-1]
    scale = PATCH_LOGIT_STD / max(float(patch.std()), 1e-6)
    shift, margin = sppg_threshold_gap(patch.numpy() * scale)
    with torch.no_grad():
        head.weight *= scale
        head.bias.copy_(head.bias * scale - shift)
    with torch.inference_mode():
        outs = [model(images[i : i + 1], modality) for i in range(len(images))]
    patch = torch.cat([o.patch_logits for o in outs])
    masks = torch.cat([o.lowres_masks for o in outs])
    if not torch.isfinite(masks).all():
        raise RuntimeError(f"randomised weights (seed {seed}) give non-finite mask logits")
    record = {
        "seed": seed,
        "sppg_scale": round(scale, 6),
        "sppg_bias_shift": round(shift, 6),
        "positive_patch_share": round(float((patch >= 0).float().mean()), 4),
        "min_patch_logit_distance": float(patch.abs().min()),
        "positive_mask_share": round(float((masks >= 0).float().mean()), 4),
    }
    return model, record


def random_checkpoint(
    cfg: ModelConfig, *, seed: int, modality: str, samples: list[Sample], out: Path, log: Callable[[str], None]
) -> tuple[ESPMedSAM, Path, dict]:
    """(model, checkpoint path, weights record): seeded random weights for `cfg`, reused from
    `out/weights` when made before for the same preset, size, seed, modality and images."""
    pre = cfg.preprocessing
    key = {
        "preset": cfg.preset, "image_size": cfg.image_size, "seed": seed, "modality": modality,
        "images": [hashlib.sha256(Path(s.image).read_bytes()).hexdigest() for s in samples],
        "espmed": __version__,
        "scheme": SCHEME,
    }
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = out / "weights" / f"random-{cfg.preset}-{cfg.image_size}-seed{seed}-{tag}.safetensors"
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file():
        model = load_checkpoint(path)
        log(f"reusing random weights {path}")
        return model, path, json.loads(record_path.read_text(encoding="utf-8"))
    log(f"making seeded random weights (seed {seed}) at {cfg.image_size}x{cfg.image_size}")
    images = [preprocess(read_frame(s.image), cfg.image_size, pre.mean, pre.std, pre.resize)[0] for s in samples]
    model, placement = random_model(cfg, seed, torch.from_numpy(np.stack(images)), modality)
    save_checkpoint(model, path, metadata={"espmed.bench.random_weights": json.dumps(key, sort_keys=True)})
    weights = {"kind": "random", "key": key, **placement}
    write_text(record_path, json.dumps(weights, indent=2))
    return model, path, weights
