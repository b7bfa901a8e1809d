"""ONNX Runtime static INT8: QDQ, per-channel, symmetric weights and activations.

Symmetric QDQ is what TensorRT consumes for explicit INT8 (`trt-int8` builds from this graph).
Only Conv, MatMul and Gemm are quantized; every other op (Softmax, LayerNormalization, GELU's Erf,
the attention-bias adds, resizes) stays float. On top of that, named layers are kept float in
growing sets (`FLOAT_LEVELS`) until the accuracy gate passes on held-out images; a model's float-layer
recipe (`recipe.py`, chosen by a sensitivity ranking) is tried first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from espmed.runtimes.base import Segmenter
from espmed.runtimes.metadata import INPUT_NAME, ArtifactMetadata

from .accuracy import Attempt, Gate
from .calibration import CalibrationImage
from .recipe import Recipe

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")

#: (label, regex over module paths) of layers kept float; each level adds to the ones before.
#: Level 0 is the fixed sensitive set: the first conv (the box encoder's: its patch embed), the mask
#: head (upscaling, hypernetwork, the final mask product) and the SPPG patch head. The last level still
#: quantizes the patch embed and the convolutional first stage: a graph with nothing quantized is not
#: an INT8 artifact.
FLOAT_LEVELS: tuple[tuple[str, str], ...] = (
    (
        "sensitive layers",
        r"^(trunk\.patch_embed\.seq\.0([./]|$)|box_patch_embed([./]|$)|decoder\.(output_upscaling|hypernetworks)"
        r"|decoder/|sppg\.patch_head)",
    ),
    ("+ decoder, SPPG, neck", r"^(decoder|sppg|neck)([./]|$)"),
    ("+ trunk attention", r"^trunk\..*\.attn([./]|$)"),
    ("+ trunk stages 3-4", r"^trunk\.layers\.[23]([./]|$)"),
    ("+ trunk stages 2-4", r"^trunk\.layers\.[123]([./]|$)"),
)


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES]


def float_levels(node_names: Sequence[str], always_float: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """Cumulative float-layer sets over `node_names` (ONNX `<module>/<Op>_<i>` or OpenVINO friendly
    names), each level adding the names its pattern matches to `always_float` and the levels before."""
    levels, keep = [], set(always_float)
    for label, pattern in FLOAT_LEVELS:
        rx = re.compile(pattern)
        keep |= {n for n in node_names if rx.search(n)}
        levels.append((label, sorted(keep)))
    return levels


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed images."""

    def __init__(self, images: Sequence[CalibrationImage], batch: int) -> None:
        self._items = [np.repeat(im.x[None], max(batch, 1), axis=0) for im in images]
        self._it = iter(self._items)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {INPUT_NAME: x}

    def rewind(self) -> None:
        self._it = iter(self._items)


def quantize_static_qdq(
    source: Path, out: Path, *, calibration: Sequence[CalibrationImage], batch: int, float_layers: Sequence[str]
) -> None:
    """Static QDQ INT8 of `source` at `out`, calibrated on `calibration` repeated to `batch` (0: 1)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(source),
        str(out),
        _Reader(calibration, batch),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(float_layers),
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


def search_levels(
    node_names: Sequence[str], *, recipe: Recipe | None, backend: str, always_float: Sequence[str] = ()
) -> list[tuple[str, list[str]]]:
    """The float-layer sets an INT8 search tries: the recipe's (when there is one), then the growing
    `FLOAT_LEVELS`, each on top of the recipe's layers."""
    kept = sorted(set(always_float) | set(recipe.float_layers(backend, list(node_names)) if recipe else ()))
    first = [("recipe (sensitivity ranking)", kept)] if recipe else []
    return first + [(f"recipe {label}" if recipe else label, layers)
                    for label, layers in float_levels(node_names, kept)]


def quantize_onnx_int8(
    *,
    source: Path,
    out: Path,
    calibration: Sequence[CalibrationImage],
    gate: Gate,
    metadata: ArtifactMetadata,
    recipe: Recipe | None = None,
) -> tuple[Attempt, list[Attempt]]:
    """Write at `out` the first INT8 model of `source` (FP32 ONNX) that passes `gate`.

    Each attempt is saved with `metadata` embedded and judged through ONNX Runtime's Segmenter; the
    `recipe`'s float layers are tried first. Returns (the passing attempt, all attempts).
    """
    from .onnx_export import save_and_open

    nodes = quantizable_nodes(onnx.load(str(source), load_external_data=False))

    def quantize(float_layers: list[str]) -> Segmenter:
        quantize_static_qdq(source, out, calibration=calibration, batch=metadata.batch, float_layers=float_layers)
        return save_and_open(onnx.load(str(out)), metadata, out)

    return gate.search(search_levels(nodes, recipe=recipe, backend="onnxruntime"), quantize)
