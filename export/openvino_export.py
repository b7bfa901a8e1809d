"""ONNX -> OpenVINO IR (.xml + .bin): FP32, FP16-compressed weights, NNCF INT8.

The IR is converted from the FP32 ONNX that `onnx_export` wrote, so every backend starts from one
graph. The CPU plugin would run BF16 by default on AVX512-BF16 machines; the precision a runtime
must pin (`INFERENCE_PRECISION_HINT`) is recorded as `runtime_precision` ("f32" unless "bf16" is
asked for), and every check here compiles with that hint set explicitly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from espmed.errors import ArtifactError
from espmed.runtimes.metadata import METADATA_KEY, ArtifactMetadata

from .accuracy import Attempt, Runner, search_float_layers
from .calibration import CalibrationImage
from .quantize import FLOAT_LEVELS

RUNTIME_PRECISIONS = ("f32", "bf16")
#: OpenVINO op types that NNCF quantizes (weights and inputs) in this graph.
QUANTIZABLE_OV_TYPES = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")
#: Always float: the converter fuses each attention (Softmax included) into one op, and
#: quantizing its inputs cost up to 2.5 points of Dice that no other fallback recovered.
FLOAT_OV_TYPES = ("ScaledDotProductAttention",)


def convert_onnx(onnx_path: Path):
    import openvino as ov

    return ov.convert_model(str(onnx_path))


def embed_metadata(model, meta: ArtifactMetadata) -> None:
    model.set_rt_info(meta.to_json(), [METADATA_KEY])


def save_ir(model, xml_path: Path, compress_to_fp16: bool) -> list[Path]:
    import openvino as ov

    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return [xml_path, xml_path.with_suffix(".bin")]


def read_metadata(xml_path: str | Path) -> ArtifactMetadata:
    import openvino as ov

    try:
        model = ov.Core().read_model(str(xml_path))
    except Exception as exc:
        raise ArtifactError(f"{xml_path}: not a readable OpenVINO IR ({type(exc).__name__})") from None
    if not model.has_rt_info([METADATA_KEY]):
        raise ArtifactError(f"{xml_path}: OpenVINO IR without espmed metadata")
    return ArtifactMetadata.from_json(model.get_rt_info([METADATA_KEY]).astype(str), str(xml_path))


def ov_runner(model, precision: str = "f32") -> Runner:
    """Compile `model` (ov.Model or IR path) for CPU with the inference precision pinned."""
    import openvino as ov

    if precision not in RUNTIME_PRECISIONS:
        raise ValueError(f"runtime precision must be one of {RUNTIME_PRECISIONS}")
    core = ov.Core()
    if isinstance(model, (str, Path)):
        model = core.read_model(str(model))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()

    def run(x: np.ndarray):
        result = request.infer({0: np.ascontiguousarray(x, np.float32)})
        return np.array(result[compiled.output(0)]), np.array(result[compiled.output(1)])

    return run


def ops_of_types(model, types: Sequence[str]) -> list[str]:
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in types]


def float_levels(names: Sequence[str], always_float: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    levels, keep = [], set(always_float)
    for label, pattern in FLOAT_LEVELS:
        rx = re.compile(pattern)
        keep |= {n for n in names if rx.search(n)}
        levels.append((label, sorted(keep)))
    return levels


def quantize_nncf(
    fp32_model,
    calibration: Sequence[CalibrationImage],
    held_out: Sequence[CalibrationImage],
    reference: list[tuple[np.ndarray, np.ndarray]],
    batch: int,
    max_drop: float,
    precision: str = "f32",
    threshold: float = 0.0,
    on_attempt: Callable[[Attempt], None] | None = None,
):
    """NNCF post-training INT8 (symmetric 'performance' preset, transformer patterns keep
    Softmax/LayerNorm/GELU float; fused attention ops stay float), with the same float-layer
    fallback as ONNX Runtime.
    Returns (quantized ov.Model, passing attempt, all attempts)."""
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)
    data = nncf.Dataset([np.repeat(im.x[None], max(batch, 1), axis=0) for im in calibration])
    last: list = []  # the search stops at the first passing model, so the last one is it

    def quantize(float_layers: list[str]) -> Runner:
        model = nncf.quantize(
            fp32_model.clone(),
            data,
            preset=nncf.QuantizationPreset.PERFORMANCE,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(names=list(float_layers), types=list(FLOAT_OV_TYPES), validate=False),
        )
        last[:] = [model]
        return ov_runner(model, precision)

    best, attempts = search_float_layers(
        float_levels(ops_of_types(fp32_model, QUANTIZABLE_OV_TYPES), ops_of_types(fp32_model, FLOAT_OV_TYPES)), quantize, reference, held_out, batch, max_drop, threshold, on_attempt
    )
    return last[0], best, attempts
