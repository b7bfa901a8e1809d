"""Does an artifact still compute the model? Logit error and per-image mask Dice vs FP32.

Masks are compared the way a user sees them: low-resolution logits restored to the original
image size with `runtimes.preprocess.restore_logits`, then thresholded. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from espmed.errors import ExportError
from espmed.runtimes.preprocess import restore_logits

from .calibration import CalibrationImage

#: images (B, 3, S, S) -> (lowres_masks, patch_logits)
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; two empty masks agree perfectly."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def run_batched(runner: Runner, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Run one image (3, S, S) through a runner whose batch is fixed (>0) or dynamic (0)."""
    xb = np.repeat(x[None], max(batch, 1), axis=0)
    lowres, patch = runner(xb)
    return np.asarray(lowres[:1], np.float32), np.asarray(patch[:1], np.float32)


@dataclass
class Comparison:
    """Candidate vs reference on a set of images."""

    images: list[str]
    dice: list[float]
    max_abs_lowres: float
    max_abs_patch: float
    threshold: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def worst_drop(self) -> float:
        return max(1.0 - d for d in self.dice) if self.dice else 0.0

    def passes(self, max_drop: float) -> bool:
        return self.worst_drop <= max_drop + 1e-12

    def to_dict(self) -> dict:
        return {
            "reference": "fp32",
            "images": self.images,
            "dice": [round(d, 6) for d in self.dice],
            "min_dice": round(min(self.dice), 6) if self.dice else None,
            "max_abs_lowres_logit": float(self.max_abs_lowres),
            "max_abs_patch_logit": float(self.max_abs_patch),
        }


def reference_outputs(runner: Runner, images: Sequence[CalibrationImage], batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [run_batched(runner, im.x, batch) for im in images]


def compare(
    candidate: Runner,
    reference: list[tuple[np.ndarray, np.ndarray]],
    images: Sequence[CalibrationImage],
    batch: int,
    threshold: float = 0.0,
) -> Comparison:
    dices, err_low, err_patch = [], 0.0, 0.0
    for im, (ref_low, ref_patch) in zip(images, reference):
        low, patch = run_batched(candidate, im.x, batch)
        err_low = max(err_low, float(np.abs(low - ref_low).max()))
        err_patch = max(err_patch, float(np.abs(patch - ref_patch).max()))
        mask = restore_logits(low[0, 0], im.box) > threshold
        ref_mask = restore_logits(ref_low[0, 0], im.box) > threshold
        dices.append(dice(mask, ref_mask))
    return Comparison([im.path.name for im in images], dices, err_low, err_patch, threshold)


@dataclass
class Attempt:
    label: str
    float_layers: list[str]
    comparison: Comparison


def gate_table(attempts: Sequence[Attempt], max_drop: float) -> str:
    lines = [f"{'attempt':<34} {'float layers':>12} {'min Dice':>9} {'worst drop':>10}  result"]
    for a in attempts:
        c = a.comparison
        lines.append(
            f"{a.label:<34} {len(a.float_layers):>12} {min(c.dice):>9.4f} {c.worst_drop:>10.4f}  "
            f"{'pass' if c.passes(max_drop) else 'FAIL'}"
        )
    return "\n".join(lines)


def search_float_layers(
    levels: Sequence[tuple[str, list[str]]],
    quantize: Callable[[list[str]], Runner],
    reference: list[tuple[np.ndarray, np.ndarray]],
    images: Sequence[CalibrationImage],
    batch: int,
    max_drop: float,
    threshold: float = 0.0,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> tuple[Attempt, list[Attempt]]:
    """Quantize with growing sets of float layers until every held-out image passes.

    `levels` are (label, float layer names), each a superset of the previous. Returns the first
    passing attempt and all attempts; raises ExportError with the table when none passes.
    """
    attempts: list[Attempt] = []
    for label, float_layers in levels:
        if attempts and list(float_layers) == attempts[-1].float_layers:
            continue  # this level adds no layer of this graph
        runner = quantize(float_layers)
        attempt = Attempt(label, list(float_layers), compare(runner, reference, images, batch, threshold))
        attempts.append(attempt)
        if on_attempt:
            on_attempt(attempt)
        if attempt.comparison.passes(max_drop):
            return attempt, attempts
    raise ExportError(
        f"INT8 accuracy gate failed: some held-out image's Dice vs FP32 dropped by more than "
        f"{max_drop} with every fallback tried:\n{gate_table(attempts, max_drop)}"
    )
