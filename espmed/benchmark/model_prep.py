"""The model a benchmark measures: a checkpoint, or seeded random weights (`weights.py`), and the
facts bench.json records about it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EspmedError
from .data import Sample
from .options import BenchOptions


@dataclass
class BenchModel:
    """bench.json's `model`; every export and worker of the run is made from it."""

    checkpoint: str
    checkpoint_sha256: str
    checkpoint_mb: float
    weights: dict  # {"kind": "checkpoint"}, or the random weights' key and placement
    preset: str
    image_size: int
    modality: str
    modalities: list[str]
    gflops: float  # per image at `image_size`
    threshold: float  # mask = logit >= threshold
    calibration: str | None = None  # what INT8 exports calibrate on (`exports.calibration_dir`)
    images: list[str] = field(default_factory=list)  # the names of the images measured
    prompt: str = "self"  # `BenchOptions.prompt`; "box": gflops are the encoder's per image
    decoder_gflops_per_box: float | None = None  # box: the prompt decoder's per box


def modality_with_most_masks(available: tuple[str, ...], samples: list[Sample]) -> str:
    """Of several modalities, the one with the most ground-truth masks (then images) in `samples`;
    the first one when the data has none of them."""
    score = {
        m: (sum(1 for s in samples if s.modality == m and s.mask), sum(1 for s in samples if s.modality == m))
        for m in available
    }
    best = max(available, key=lambda m: score[m])
    return best if score[best] > (0, 0) else available[0]


def prepare_model(
    opts: BenchOptions, samples: list[Sample], *, out: Path, log: Callable[[str], None]
) -> BenchModel:
    """Load the checkpoint, or make (or reuse) the seeded random weights; returns the model facts.

    The modality is `--modality`, or the model's only one; of several, the one the data has most
    masks for (the export's default, the first in query order, when the data has none).
    """
    from espmed.export.graph import choose_modality

    from ..atomic import file_sha256
    from ..model import ESPMedSAM, get_preset, load_checkpoint
    from ..model.summary import count_box_flops, count_flops
    from ..runtimes.metadata import SHARED_TRUNK
    from .weights import random_checkpoint

    def pick(available: tuple[str, ...]) -> str:
        return modality_with_most_masks(available, samples)

    if opts.checkpoint is not None:
        model = load_checkpoint(opts.checkpoint, image_size=opts.imgsz)
        modality = choose_modality(model, opts.modality, pick=pick)
        path, weights = Path(opts.checkpoint), {"kind": "checkpoint"}
    else:
        cfg = get_preset(opts.preset, image_size=opts.imgsz) if opts.imgsz else get_preset(opts.preset)
        cfg = cfg.with_(box_prompts=opts.prompt == "box")
        modality = choose_modality(ESPMedSAM(cfg), opts.modality, pick=pick)  # what random weights of cfg serve
        model, path, weights = random_checkpoint(
            cfg, seed=opts.seed, modality=modality, samples=samples, out=out, log=log
        )
    cfg = model.config
    if opts.prompt == "box":
        if not model.has_box_prompts:
            raise EspmedError(f"{path}: --prompt box needs a model with a box-prompted path; this one has none")
        encoder, decoder = count_box_flops(model, cfg.image_size)
        return BenchModel(
            checkpoint=str(path), checkpoint_sha256=file_sha256(path), checkpoint_mb=path.stat().st_size / 1e6,
            weights=weights, preset=cfg.preset, image_size=cfg.image_size,
            modality=opts.modality or SHARED_TRUNK,  # boxes: the shared trunk unless a modality is named
            modalities=list(cfg.modalities), gflops=encoder / 1e9, threshold=cfg.preprocessing.mask_threshold,
            prompt="box", decoder_gflops_per_box=decoder / 1e9,
        )
    return BenchModel(
        checkpoint=str(path),
        checkpoint_sha256=file_sha256(path),
        checkpoint_mb=path.stat().st_size / 1e6,
        weights=weights,
        preset=cfg.preset,
        image_size=cfg.image_size,
        modality=modality,
        modalities=list(cfg.modalities),
        gflops=count_flops(model, cfg.image_size, modality) / 1e9,
        threshold=cfg.preprocessing.mask_threshold,
    )
