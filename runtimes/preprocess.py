"""Pre- and post-processing, defined once in numpy and used by every backend (torch included).

Pre: any 2-D image -> RGB uint8 -> resize the longest side to the model size (PIL bilinear,
antialiased) -> `(x - mean) / std` -> zero-pad right/bottom to size x size (after normalising,
as SAM and the release do). Resize modes (`Preprocessing.resize`, one of `RESIZE_MODES`):
- `longest-side`: as above (the release).
- `longest-side-block-exact`: resized so that each 4 x 4 block's mean is exactly the image resized
  (same rule) to a quarter of the model size: the plain resize to 4x the quarter's shape, plus the
  quarter-size shortfall sharpened and upsampled (`make_blocks_exact`). A model distilled from a
  teacher at a quarter of its size (LiteMedSAM, 256²), whose patch embed averages each 4 x 4 block
  (`spread_taps`), then reads every image as the teacher did, so the initialised student embeds
  held-out images much as the teacher does, where `longest-side`'s bilinear view does not (the
  figures: `espmed/assets/models/MODEL_CARD.md`, benchmarks/real_model/results/). A small image
  stays smooth (not replicated 4 x 4). The shipped model uses it (recorded in its checkpoint's
  preprocessing, so every runtime applies it). It costs more per image than `longest-side`: the
  quarter-size resize, its sharpening and upsampling come on top of the plain resize.

Intensity scaling to RGB uint8 (documented contract):
- uint8: used as is. bool: False/True -> 0/255.
- any other integer or float image (16-bit, signed, float): linearly min-max scaled to 0..255
  over the whole image (a constant image becomes 0). NaN/Inf are refused.
- gray (H, W) / (H, W, 1) -> replicated to RGB; gray+alpha (H, W, 2) -> gray; RGBA -> RGB.

Post: low-resolution logits (S/4 x S/4) -> bilinear to S x S -> crop the padding -> bilinear to the
original H x W (half-pixel centres, as `F.interpolate(align_corners=False)`), done as one pair of
interpolation matrices -> threshold. Box prompts' masks are restored MedSAM's way instead (crop at low
resolution, then bilinear to H x W: `restore_box_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from espmed.io.common import to_rgb_uint8


@dataclass(frozen=True)
class Letterbox:
    """Where an image sits inside the square model input."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    input_size: int


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Longest side -> `size`, aspect kept (SAM's ResizeLongestSide rounding)."""
    scale = size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


#: `Preprocessing.resize` values `preprocess` implements (see the module docstring).
RESIZE_MODES = ("longest-side", "longest-side-block-exact")
#: The block side of `longest-side-block-exact` (the model size over its teacher's).
BLOCK = 4


def _resize(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if hw == rgb.shape[:2]:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.BILINEAR))


def preprocess(
    image: np.ndarray,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resize: str = RESIZE_MODES[0],
) -> tuple[np.ndarray, Letterbox]:
    """Model input (3, size, size) float32 and the letterbox needed to map outputs back."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    if resize == "longest-side-block-exact":
        rh, rw = (BLOCK * n for n in resized_shape(h, w, size // BLOCK))
    else:
        rh, rw = resized_shape(h, w, size)
    out = np.zeros((3, size, size), np.float32)
    x = out[:, :rh, :rw]  # normalised in place: no second full-size float copy at peak memory
    x[...] = _resize(rgb, (rh, rw)).transpose(2, 0, 1)
    if resize == "longest-side-block-exact":
        make_blocks_exact(rgb, x)
    x -= np.asarray(mean, np.float32).reshape(-1, 1, 1)
    x /= np.asarray(std, np.float32).reshape(-1, 1, 1)
    return out, Letterbox((h, w), (rh, rw), size)


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) matrix of 1-D bilinear interpolation, half-pixel centres, no antialiasing.

    Matches `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` per axis.
    """
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    return m


def _add_upsample4(a: np.ndarray, out: np.ndarray, axis: int) -> None:
    """out += `a` (3, h, w) upsampled 4x along `axis` (1 or 2; `out` is 4x longer there):
    `bilinear_matrix(4n, n)` (half-pixel centres, edges clamped) as two-tap sums."""
    def along(start, stop=None, step=None):
        index = [slice(None)] * 3
        index[axis] = slice(start, stop, step)
        return tuple(index)

    before = np.concatenate([a[along(0, 1)], a[along(0, -1)]], axis=axis)
    after = np.concatenate([a[along(1)], a[along(-1)]], axis=axis)
    # row 4 + k of a 3-sample upsample: output 4j + k's weights on samples j - 1, j, j + 1 (two
    # of them nonzero)
    for k, weights in enumerate(bilinear_matrix(3 * BLOCK, 3)[BLOCK:2 * BLOCK]):
        first, second = (float(w) * v for w, v in zip(weights, (before, a, after), strict=True) if w)
        out[along(k, None, BLOCK)] += first + second


@lru_cache(maxsize=16)
def _sharpening_matrix(n: int) -> np.ndarray:
    """(n, n) float32 inverse of the [1, 6, 1] / 8 blur (edges: [7, 1] / 8) that a 4x bilinear
    upsample then a 4-sample block mean applies; the blur's smallest gain is 1/2, so it is well
    conditioned."""
    block_mean = np.kron(np.eye(n), np.full((1, BLOCK), 1.0 / BLOCK))
    return np.linalg.inv(block_mean @ bilinear_matrix(BLOCK * n, n)).astype(np.float32)


def make_blocks_exact(rgb: np.ndarray, resized: np.ndarray) -> None:
    """Add to `resized` (3, 4h, 4w), the plain resize of the (H, W, 3) image `rgb`, what makes its
    4 x 4 block means `rgb` resized to (h, w): the blocks' shortfall, sharpened so that its 4x
    bilinear upsample keeps it as the blocks' mean. Sharp edges may overshoot 0..255 a little."""
    h, w = resized.shape[1] // BLOCK, resized.shape[2] // BLOCK
    blocks = sum(resized[:, :, i::BLOCK] for i in range(BLOCK))
    blocks = sum(blocks[:, i::BLOCK] for i in range(BLOCK)) / BLOCK**2
    shortfall = _resize(rgb, (h, w)).transpose(2, 0, 1) - blocks
    sharpened = _sharpening_matrix(h) @ shortfall @ _sharpening_matrix(w).T
    wide = np.zeros((3, h, BLOCK * w), np.float32)
    _add_upsample4(sharpened, wide, axis=2)
    _add_upsample4(wide, resized, axis=1)


@lru_cache(maxsize=64)
def _restore_matrices(box: Letterbox, lowres_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    s = box.input_size
    mats = []
    for axis in (0, 1):
        up = bilinear_matrix(s, lowres_hw[axis])[: box.resized_hw[axis]]  # upsample, crop padding
        back = bilinear_matrix(box.original_hw[axis], box.resized_hw[axis])  # to original size
        mats.append((back @ up).astype(np.float32))
    return mats[0], mats[1]


def restore_logits(lowres: np.ndarray, box: Letterbox) -> np.ndarray:
    """Low-resolution logits (h, w) -> logits (H, W) at the original image size."""
    lowres = np.asarray(lowres, np.float32)
    if lowres.ndim != 2:
        raise ValueError(f"expected 2-D low-resolution logits, got shape {lowres.shape}")
    ry, rx = _restore_matrices(box, lowres.shape)
    return ry @ lowres @ rx.T


@lru_cache(maxsize=64)
def _box_restore_matrices(box: Letterbox, lowres_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    mats = []
    for axis in (0, 1):
        n = lowres_hw[axis]
        crop = -(-box.resized_hw[axis] * n // box.input_size)  # the low-res cells the image covers
        m = np.zeros((box.original_hw[axis], n), np.float64)
        m[:, :crop] = bilinear_matrix(box.original_hw[axis], crop)
        mats.append(m.astype(np.float32))
    return mats[0], mats[1]


def restore_box_logits(lowres: np.ndarray, box: Letterbox) -> np.ndarray:
    """A box prompt's low-resolution logits (h, w) -> logits (H, W), MedSAM's way: crop the padding
    at low resolution, then bilinear to the original size (as LiteMedSAM's `postprocess_masks`, so
    that box masks match it; the self-prompted path upsamples first, `restore_logits`)."""
    lowres = np.asarray(lowres, np.float32)
    if lowres.ndim != 2:
        raise ValueError(f"expected 2-D low-resolution logits, got shape {lowres.shape}")
    ry, rx = _box_restore_matrices(box, lowres.shape)
    return ry @ lowres @ rx.T


def patch_region(patch_logits: np.ndarray, box: Letterbox) -> np.ndarray:
    """The SPPG patch logits that cover the image (padding cells dropped)."""
    s = box.input_size
    ph, pw = patch_logits.shape[-2:]
    hh = -(-box.resized_hw[0] * ph // s)
    ww = -(-box.resized_hw[1] * pw // s)
    return patch_logits[..., :hh, :ww]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float32)))).astype(np.float32)
