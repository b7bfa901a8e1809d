"""The accuracy gate: does an artifact still segment each held-out image as the FP32 model does?

Candidates are judged through the runtime's own `Segmenter` (the staged file, metadata embedded,
opened by `espmed.runtimes.load`), so the gate runs what a device runs: the same preprocessing of
the decoded image, the same graph call (a fixed batch zero-padded), the same restoration and mask
rule (`runtimes.masks`). The FP32 reference is the torch graph behind the same Segmenter steps.
Only images whose FP32 mask has foreground are gated: two empty masks have Dice 1.0 and prove
nothing. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from espmed.errors import ExportError
from espmed.metrics import dice
from espmed.runtimes.base import Segmenter


@dataclass(frozen=True)
class Outputs:
    """One image through a Segmenter: raw graph outputs and the mask a device would return."""

    lowres: np.ndarray  # (S/4, S/4) mask logits
    patches: np.ndarray  # (S/32, S/32) SPPG patch logits
    mask: np.ndarray  # bool (H, W), the image's own size


def segment(segmenter: Segmenter, images: Sequence[np.ndarray], batch: int) -> list[Outputs]:
    """`images` through `segmenter`'s preprocess, graph and postprocess, `max(batch, 1)` per call."""
    outputs = []
    for part in segmenter.run_chunks(images, max(batch, 1)):
        for i, box in enumerate(part.boxes):
            pred = segmenter.postprocess(part.lowres[i, 0], part.patches[i, 0], box)
            outputs.append(Outputs(part.lowres[i, 0], part.patches[i, 0], pred.mask))
    return outputs


@dataclass
class Comparison:
    """A candidate against the FP32 reference, per gated image."""

    images: list[str]
    dice: list[float]
    max_abs_lowres: float
    max_abs_patch: float

    @property
    def drops(self) -> list[float]:
        return [1.0 - d for d in self.dice]

    @property
    def worst_drop(self) -> float:
        return max(self.drops)

    def passes(self, max_drop: float) -> bool:
        return self.worst_drop <= max_drop + 1e-12


@dataclass
class Attempt:
    label: str
    float_layers: list[str]
    comparison: Comparison


@dataclass(kw_only=True)
class Gate:
    """FP32 reference outputs on the held-out images with foreground, and the rule to pass."""

    images: dict[str, np.ndarray]  # name -> decoded image, the gated held-out images
    reference: list[Outputs]  # FP32, one per gated image
    max_drop: float  # largest allowed per-image Dice drop vs FP32
    threshold: float  # the mask threshold every candidate's metadata must carry
    batch: int  # images per graph call: the artifact's fixed batch (0: dynamic, one at a time)
    without_foreground: list[str] = field(default_factory=list)  # held out, FP32 mask empty: not gated
    on_attempt: Callable[[Attempt], None] | None = None

    @classmethod
    def build(
        cls,
        reference: Segmenter,
        held_out: Mapping[str, np.ndarray],
        *,
        max_drop: float,
        threshold: float,
        batch: int,
        on_attempt: Callable[[Attempt], None] | None = None,
    ) -> Gate:
        """Run the FP32 `reference` on `held_out` and keep the images whose mask has foreground."""
        _check_threshold(reference, threshold)
        outputs = segment(reference, list(held_out.values()), batch)
        kept = {name: out for name, out in zip(held_out, outputs, strict=True) if out.mask.any()}
        if not kept:
            raise ExportError(
                f"no held-out image has foreground in the FP32 mask ({', '.join(held_out)}): the accuracy gate "
                "would compare empty masks only; give --calib images that show the structure"
            )
        return cls(
            images={name: held_out[name] for name in kept},
            reference=list(kept.values()),
            max_drop=max_drop,
            threshold=threshold,
            batch=batch,
            without_foreground=[name for name in held_out if name not in kept],
            on_attempt=on_attempt,
        )

    def compare(self, candidate: Segmenter) -> Comparison:
        _check_threshold(candidate, self.threshold)
        pairs = list(zip(segment(candidate, list(self.images.values()), self.batch), self.reference, strict=True))
        return Comparison(
            images=list(self.images),
            dice=[dice(out.mask, ref.mask) for out, ref in pairs],
            max_abs_lowres=max(float(np.abs(out.lowres - ref.lowres).max()) for out, ref in pairs),
            max_abs_patch=max(float(np.abs(out.patches - ref.patches).max()) for out, ref in pairs),
        )

    def dice_of(self, candidate: Segmenter, indices: Sequence[int]) -> list[float]:
        """Dice vs FP32 of the gated images at `indices` (positions in `images`) through `candidate`."""
        names = list(self.images)
        outputs = segment(candidate, [self.images[names[i]] for i in indices], self.batch)
        return [dice(out.mask, self.reference[i].mask) for out, i in zip(outputs, indices, strict=True)]

    def check(self, candidate: Segmenter, target: str) -> Comparison:
        """Compare, and refuse a candidate that drops more than `max_drop` on any gated image."""
        result = self.compare(candidate)
        if not result.passes(self.max_drop):
            raise ExportError(
                f"{target}: Dice vs FP32 dropped to {min(result.dice):.4f} on a held-out image "
                f"(allowed drop {self.max_drop}); the artifact was not written"
            )
        return result

    def search(
        self, levels: Sequence[tuple[str, list[str]]], quantize: Callable[[list[str]], Segmenter]
    ) -> tuple[Attempt, list[Attempt]]:
        """Quantize with growing sets of float layers until every gated image passes.

        `levels` are (label, float layer names), each a superset of the previous; `quantize` stages
        one candidate and opens it. Returns the first passing attempt and all attempts; raises
        ExportError with the table when none passes.
        """
        attempts: list[Attempt] = []
        for label, float_layers in levels:
            if attempts and list(float_layers) == attempts[-1].float_layers:
                continue  # this level adds no layer of this graph
            attempt = Attempt(label, list(float_layers), self.compare(quantize(list(float_layers))))
            attempts.append(attempt)
            if self.on_attempt:
                self.on_attempt(attempt)
            if attempt.comparison.passes(self.max_drop):
                return attempt, attempts
        raise ExportError(
            f"INT8 accuracy gate failed: some held-out image's Dice vs FP32 dropped by more than "
            f"{self.max_drop} with every fallback tried:\n{self.table(attempts)}"
        )

    def describe(self, result: Comparison) -> dict:
        """The `accuracy` entry of the metadata: every gated image's Dice and drop."""
        return {
            "reference": "fp32",
            "threshold": self.threshold,
            "max_drop": self.max_drop,
            "images": result.images,
            "dice": [round(d, 6) for d in result.dice],
            "drop": [round(d, 6) for d in result.drops],
            "min_dice": round(min(result.dice), 6),
            "without_foreground": list(self.without_foreground),
            "max_abs_lowres_logit": result.max_abs_lowres,
            "max_abs_patch_logit": result.max_abs_patch,
        }

    def describe_search(self, best: Attempt, attempts: Sequence[Attempt]) -> dict:
        """`describe` of the chosen attempt plus every attempt's per-image Dice."""
        accuracy = self.describe(best.comparison)
        accuracy["gate"] = {
            "max_drop": self.max_drop,
            "chosen": best.label,
            "attempts": [
                {
                    "label": a.label,
                    "float_layers": len(a.float_layers),
                    "min_dice": round(min(a.comparison.dice), 6),
                    "dice": [round(d, 6) for d in a.comparison.dice],
                }
                for a in attempts
            ],
        }
        return accuracy

    def table(self, attempts: Sequence[Attempt]) -> str:
        lines = [f"{'attempt':<34} {'float layers':>12} {'min Dice':>9} {'worst drop':>10}  result"]
        for a in attempts:
            c = a.comparison
            lines.append(
                f"{a.label:<34} {len(a.float_layers):>12} {min(c.dice):>9.4f} {c.worst_drop:>10.4f}  "
                f"{'pass' if c.passes(self.max_drop) else 'FAIL'}"
            )
        return "\n".join(lines)


def _check_threshold(segmenter: Segmenter, threshold: float) -> None:
    carried = float(segmenter.metadata.preprocessing.get("mask_threshold", 0.0))
    if carried != threshold:
        raise ExportError(f"{segmenter.source.name}: metadata mask threshold {carried} is not the model's {threshold}")
