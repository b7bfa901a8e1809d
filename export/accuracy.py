"""The accuracy gate: does an artifact still segment each held-out image as the FP32 model does?

A self-prompted export is judged by each image's mask; a box-prompted pair by each image's masks of
a fixed set of boxes (`GATE_BOXES`: the whole image and its quadrants), through `embed` and `decode`.

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
    """One judged mask through a Segmenter: raw outputs and the mask a device would return."""

    logits: np.ndarray  # self-prompted: lowres (S/4, S/4) mask logits; box: the box's logits at the image's size
    side: np.ndarray  # self-prompted: SPPG patch logits (S/32, S/32); box: the IoU estimate (1,)
    mask: np.ndarray  # bool (H, W), the image's own size


def segment(segmenter: Segmenter, images: Sequence[np.ndarray], batch: int) -> list[list[Outputs]]:
    """Each image's self-prompted mask through `segmenter`'s preprocess, graph and postprocess,
    `max(batch, 1)` images per call."""
    outputs = []
    for part in segmenter.run_chunks(images, max(batch, 1)):
        for i, box in enumerate(part.boxes):
            pred = segmenter.postprocess(part.lowres[i, 0], part.patches[i, 0], box)
            outputs.append([Outputs(part.lowres[i, 0], part.patches[i, 0], pred.mask)])
    return outputs


#: The boxes a box export is judged with on each held-out image, as fractions (x0, y0, x1, y1) of its
#: last column and row: the whole image, then its four quadrants.
GATE_BOXES = ((0, 0, 1, 1), (0, 0, 0.5, 0.5), (0.5, 0, 1, 0.5), (0, 0.5, 0.5, 1), (0.5, 0.5, 1, 1))


def gate_boxes(image_hw: tuple[int, int]) -> np.ndarray:
    """`GATE_BOXES` in the pixels of an image of `image_hw`."""
    h, w = image_hw
    return np.asarray(GATE_BOXES, np.float64) * [w - 1, h - 1, w - 1, h - 1]


def segment_boxes(segmenter: Segmenter, images: Sequence[np.ndarray], batch: int) -> list[list[Outputs]]:
    """Each image's masks of its `gate_boxes` through `segmenter.embed` and `decode` (the box path's
    preprocess, letterbox mapping, restore and mask rule a device runs); `batch` does not apply."""
    outputs = []
    for image in images:
        pred = segmenter.decode(segmenter.embed(image), gate_boxes(image.shape[:2]), return_logits=True)
        outputs.append([Outputs(lo, np.asarray([q], np.float32), m) for lo, q, m in zip(
            pred.logits, pred.iou, pred.masks, strict=True)])
    return outputs


@dataclass(frozen=True)
class Judge:
    """How a gate runs images through a Segmenter, and how its record names what it compared."""

    run: Callable[[Segmenter, Sequence[np.ndarray], int], list[list[Outputs]]]  # per image, its masks
    keys: tuple[str, str]  # the record's names of the largest |Δ| of `Outputs.logits` and `Outputs.side`
    name: Callable[[str, int], str]  # (image name, mask k of the image) -> the mask's name in the record
    rule: dict = field(default_factory=dict)  # what else the record states about the judged masks


#: The judges of each graph kind an export makes (`espmed.runtimes.formats.PROMPTS`).
JUDGES = {
    "self": Judge(segment, ("max_abs_lowres_logit", "max_abs_patch_logit"), lambda image, k: image),
    "box": Judge(
        segment_boxes, ("max_abs_logit", "max_abs_iou"), lambda image, k: f"{image} box {k + 1}",
        {"boxes": "per image: the whole image, then its four quadrants (top left, top right, bottom left, "
                   "bottom right); one mask per box through the runtime's embed and decode",
         "box_fractions": [list(b) for b in GATE_BOXES]},
    ),
}


@dataclass
class Comparison:
    """A candidate against the FP32 reference, per gated mask."""

    images: list[str]  # the gated masks' names: an image's, or for box prompts "<image> box <k>"
    dice: list[float]
    max_abs_logit: float
    max_abs_side: float

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
    """FP32 reference outputs of the held-out masks with foreground, and the rule to pass."""

    images: dict[str, np.ndarray]  # name -> decoded image, the held-out images with a gated mask
    reference: list[Outputs]  # FP32, one per gated mask
    masks: list[tuple[int, int]]  # per gated mask: (its image's position in `images`, its index in the image)
    names: list[str]  # per gated mask: its name in the record
    max_drop: float  # largest allowed per-mask Dice drop vs FP32
    threshold: float  # the mask threshold every candidate's metadata must carry
    batch: int  # images per graph call: the artifact's fixed batch (0: dynamic, one at a time)
    judge: Judge = JUDGES["self"]
    without_foreground: list[str] = field(default_factory=list)  # held-out masks empty in FP32: not gated
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
        judge: Judge = JUDGES["self"],
        on_attempt: Callable[[Attempt], None] | None = None,
    ) -> Gate:
        """Run the FP32 `reference` on `held_out` and keep the masks with foreground."""
        _check_threshold(reference, threshold)
        outputs = judge.run(reference, list(held_out.values()), batch)
        judged = [(image, k, out) for image, outs in zip(held_out, outputs, strict=True) for k, out in enumerate(outs)]
        kept = [(image, k, out) for image, k, out in judged if out.mask.any()]
        if not kept:
            raise ExportError(
                f"no held-out image has foreground in the FP32 mask ({', '.join(held_out)}): the accuracy gate "
                "would compare empty masks only; give --calib images that show the structure"
            )
        images = list(dict.fromkeys(image for image, _, _ in kept))
        return cls(
            images={image: held_out[image] for image in images},
            reference=[out for _, _, out in kept],
            masks=[(images.index(image), k) for image, k, _ in kept],
            names=[judge.name(image, k) for image, k, _ in kept],
            max_drop=max_drop,
            threshold=threshold,
            batch=batch,
            judge=judge,
            without_foreground=[judge.name(image, k) for image, k, out in judged if not out.mask.any()],
            on_attempt=on_attempt,
        )

    def compare(self, candidate: Segmenter) -> Comparison:
        _check_threshold(candidate, self.threshold)
        outputs = self.judge.run(candidate, list(self.images.values()), self.batch)
        pairs = [(outputs[i][k], ref) for (i, k), ref in zip(self.masks, self.reference, strict=True)]
        return Comparison(
            images=list(self.names),
            dice=[dice(out.mask, ref.mask) for out, ref in pairs],
            max_abs_logit=max(float(np.abs(out.logits - ref.logits).max()) for out, ref in pairs),
            max_abs_side=max(float(np.abs(out.side - ref.side).max()) for out, ref in pairs),
        )

    def dice_of(self, candidate: Segmenter, indices: Sequence[int]) -> list[float]:
        """Dice vs FP32 of the gated masks of the images at `indices` (positions in `images`) through `candidate`."""
        names = list(self.images)
        runs = self.judge.run(candidate, [self.images[names[i]] for i in indices], self.batch)
        reference = dict(zip(self.masks, self.reference, strict=True))
        return [dice(out.mask, reference[i, k].mask) for i, outs in zip(indices, runs, strict=True)
                for k, out in enumerate(outs) if (i, k) in reference]

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
        logit_key, side_key = self.judge.keys
        return {
            "reference": "fp32",
            "threshold": self.threshold,
            "max_drop": self.max_drop,
            "images": result.images,
            "dice": [round(d, 6) for d in result.dice],
            "drop": [round(d, 6) for d in result.drops],
            "min_dice": round(min(result.dice), 6),
            "without_foreground": list(self.without_foreground),
            logit_key: result.max_abs_logit,
            side_key: result.max_abs_side,
            **self.judge.rule,
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
