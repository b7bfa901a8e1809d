"""ONNX -> OpenVINO IR (.xml + .bin): FP32, FP16-compressed weights, NNCF INT8.

The IR is converted from the FP32 ONNX that `onnx_export` wrote, so every backend starts from one
graph. The CPU plugin would run BF16 by default on AVX512-BF16 machines; the precision a runtime
must pin (`INFERENCE_PRECISION_HINT`) is recorded as `runtime_precision` ("f32" unless "bf16" is
asked for), and the gate opens every candidate with that precision, as a device does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from espmed.runtimes.base import Segmenter
from espmed.runtimes.metadata import METADATA_KEY, ArtifactMetadata

from .accuracy import Gate
from .calibration import CalibrationImage
from .quantize import float_levels

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


def ops_of_types(model, types: Sequence[str]) -> list[str]:
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in types]


def save_and_open(
    model, meta: ArtifactMetadata, xml_path: Path, *, compress_to_fp16: bool, precision: str
) -> Segmenter:
    """Embed `meta`, save the IR at `xml_path` and open it as a device would (the gate's candidate)."""
    from espmed.runtimes import load

    embed_metadata(model, meta)
    save_ir(model, xml_path, compress_to_fp16=compress_to_fp16)
    return load(xml_path, verify=False, precision=precision)


def quantize_nncf(
    *,
    source,
    out: Path,
    calibration: Sequence[CalibrationImage],
    gate: Gate,
    metadata: ArtifactMetadata,
    runtime_precision: str = "f32",
):
    """NNCF post-training INT8 of `source` (FP32 ov.Model) with the float-layer fallback of ONNX
    Runtime: symmetric 'performance' preset, transformer patterns keep Softmax/LayerNorm/GELU float,
    fused attention ops stay float. Each attempt is staged beside `out` (`<stem>.try<n>.xml`, n float
    layers) and judged through OpenVINO's Segmenter at `runtime_precision`.
    Returns (quantized ov.Model, passing attempt, all attempts)."""
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)
    data = nncf.Dataset([np.repeat(im.x[None], max(metadata.batch, 1), axis=0) for im in calibration])
    last: list = []  # the search stops at the first passing model, so the last one is it

    def quantize(float_layers: list[str]) -> Segmenter:
        model = nncf.quantize(
            source.clone(),
            data,
            preset=nncf.QuantizationPreset.PERFORMANCE,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(names=list(float_layers), types=list(FLOAT_OV_TYPES), validate=False),
        )
        last[:] = [model]
        probe = out.with_name(f"{out.stem}.try{len(float_layers)}{out.suffix}")  # each level adds layers
        return save_and_open(model, metadata, probe, compress_to_fp16=False, precision=runtime_precision)

    levels = float_levels(ops_of_types(source, QUANTIZABLE_OV_TYPES), ops_of_types(source, FLOAT_OV_TYPES))
    best, attempts = gate.search(levels, quantize)
    return last[0], best, attempts
