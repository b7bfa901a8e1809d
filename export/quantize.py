"""ONNX Runtime static INT8: QDQ, per-channel, symmetric weights and activations.

Symmetric QDQ is what TensorRT consumes for explicit INT8 (`trt-int8` builds from this graph).
Only Conv, MatMul and Gemm are quantized; every other op (Softmax, LayerNormalization, GELU's Erf,
the attention-bias adds, resizes) stays float. On top of that, named layers are kept float in
growing sets (`FLOAT_LEVELS`) until the accuracy gate passes on held-out images.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from espmed.runtimes.metadata import INPUT_NAME

from .accuracy import Attempt, Runner, search_float_layers
from .calibration import CalibrationImage

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")

#: (label, regex over module paths) of layers kept float; each level adds to the ones before.
#: Level 0 is the fixed sensitive set: the first conv, the mask head (upscaling, hypernetwork,
#: the final mask product) and the SPPG patch head. The last level still quantizes the patch embed
#: and the convolutional first stage: a graph with nothing quantized is not an INT8 artifact.
FLOAT_LEVELS: tuple[tuple[str, str], ...] = (
    ("sensitive layers", r"^(trunk\.patch_embed\.seq\.0([./]|$)|decoder\.(output_upscaling|hypernetworks)|decoder/|sppg\.patch_head)"),
    ("+ decoder, SPPG, neck", r"^(decoder|sppg|neck)([./]|$)"),
    ("+ trunk attention", r"^trunk\..*\.attn([./]|$)"),
    ("+ trunk stages 3-4", r"^trunk\.layers\.[23]([./]|$)"),
    ("+ trunk stages 2-4", r"^trunk\.layers\.[123]([./]|$)"),
)


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES]


def float_levels(node_names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Cumulative float-layer sets over `node_names` (named `<module>/<Op>_<i>`)."""
    levels, keep = [], set()
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


def onnx_runner(path: str | Path) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray):
        low, patch = session.run(None, {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
        return low, patch

    return run


def quantize_static_qdq(fp32_path: Path, out_path: Path, images: Sequence[CalibrationImage], batch: int, float_layers: Sequence[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp32_path),
        str(out_path),
        _Reader(images, batch),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(float_layers),
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


def quantize_onnx_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: Sequence[CalibrationImage],
    held_out: Sequence[CalibrationImage],
    reference: list[tuple[np.ndarray, np.ndarray]],
    batch: int,
    max_drop: float,
    threshold: float = 0.0,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> tuple[Attempt, list[Attempt]]:
    """Write the first INT8 model (at `out_path`) that passes the gate; return the attempts."""
    nodes = quantizable_nodes(onnx.load(str(fp32_path), load_external_data=False))

    def quantize(float_layers: list[str]) -> Runner:
        quantize_static_qdq(fp32_path, out_path, calibration, batch, float_layers)
        return onnx_runner(out_path)

    return search_float_layers(float_levels(nodes), quantize, reference, held_out, batch, max_drop, threshold, on_attempt)
