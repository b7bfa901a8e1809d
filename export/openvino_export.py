"""ONNX -> OpenVINO IR (.xml + .bin): FP32, FP16-compressed weights, NNCF INT8.

The IR is converted from the FP32 ONNX that `onnx_export` wrote, so every backend starts from one
graph. The CPU plugin would run BF16 by default on AVX512-BF16 machines; the precision a runtime
must pin (`INFERENCE_PRECISION_HINT`) is recorded as `runtime_precision` ("f32" unless "bf16" is
asked for), and the gate opens every candidate with that precision, as a device does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from espmed.runtimes.base import Segmenter
from espmed.runtimes.metadata import METADATA_KEY, ArtifactMetadata

from .accuracy import Gate
from .calibration import CalibrationImage
from .quantize import search_levels
from .recipe import Recipe

#: OpenVINO op types that NNCF quantizes (weights and inputs) in this graph.
QUANTIZABLE_OV_TYPES = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")
#: Always float: the converter fuses each attention (Softmax included) into one op, and
#: quantizing its inputs cost Dice that no other fallback recovered.
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


def with_fp16_weights(model, scratch: Path):
    """`model` with its float weights stored in FP16 (a Constant f16 -> Convert pair each), read back
    into memory (not mapped) from an IR saved at `scratch`, which is then removed. Why:
    `save_model` leaves every weight of a model that already holds FakeQuantize ops in FP32, so an
    INT8 IR's float layers (the recipe's, a large part of its file) stay FP32 unless the FP32 model is
    compressed before NNCF quantizes it; NNCF then stores the quantized weights int8 and keeps the
    rest FP16. The CPU plugin decompresses FP16 weights at compile time."""
    import openvino as ov

    paths = save_ir(model, scratch, compress_to_fp16=True)
    core = ov.Core()
    core.set_property({"ENABLE_MMAP": False})
    compressed = core.read_model(str(scratch))
    for path in paths:
        path.unlink()
    return compressed


def ops_of_types(model, types: Sequence[str]) -> list[str]:
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in types]


def save_and_open(
    model, meta: ArtifactMetadata, xml_path: Path, *, compress_to_fp16: bool, precision: str,
    threads: int | None = None,
) -> Segmenter:
    """Embed `meta`, save the IR at `xml_path` and open it as a device would (the gate's candidate)."""
    from espmed.runtimes import load

    embed_metadata(model, meta)
    save_ir(model, xml_path, compress_to_fp16=compress_to_fp16)
    return load(xml_path, verify=False, precision=precision, threads=threads)


@dataclass(frozen=True, kw_only=True)
class NncfSettings:
    """The NNCF post-training knobs an INT8 export uses (recorded in the artifact's metadata)."""

    smooth_quant_alpha: float | None = None  # SmoothQuant alpha for MatMul; None: NNCF's default
    fast_bias_correction: bool = False  # False: NNCF's full bias correction (slower, closer to FP32)
    bias_correction: bool = True  # False only for the sensitivity ranking's bypass model
    accuracy_control: bool = False  # nncf.quantize_with_accuracy_control, Dice vs FP32 as the metric

    def describe(self) -> dict:
        return {
            "tool": "nncf post-training", "preset": "performance (symmetric)", "model_type": "transformer",
            "smooth_quant_alpha": self.smooth_quant_alpha if self.smooth_quant_alpha is not None else "nncf default",
            "fast_bias_correction": self.fast_bias_correction, "bias_correction": self.bias_correction,
            "accuracy_control": self.accuracy_control,
        }

    def advanced(self):
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

        advanced = AdvancedQuantizationParameters(disable_bias_correction=not self.bias_correction)
        if self.smooth_quant_alpha is not None:
            advanced.smooth_quant_alphas = AdvancedSmoothQuantParameters(matmul=self.smooth_quant_alpha)
        return advanced

    def common(self, subset_size: int) -> dict:
        """The keyword arguments `nncf.quantize` and `nncf.quantize_with_accuracy_control` share."""
        import nncf

        return dict(
            preset=nncf.QuantizationPreset.PERFORMANCE, model_type=nncf.ModelType.TRANSFORMER,
            subset_size=subset_size, fast_bias_correction=self.fast_bias_correction,
        )


def ignored_scope(float_layers: Sequence[str]):
    """NNCF's ignored scope: `float_layers` by name plus the op types that always stay float."""
    import nncf

    return nncf.IgnoredScope(names=list(float_layers), types=list(FLOAT_OV_TYPES), validate=False)


def nncf_quantize(source, inputs: Sequence[np.ndarray], *, settings: NncfSettings, float_layers: Sequence[str]):
    """One NNCF post-training INT8 of `source` (FP32 ov.Model, not modified) on `inputs` (model
    input arrays), `float_layers` kept float."""
    import nncf

    return nncf.quantize(
        source.clone(), nncf.Dataset(list(inputs)), ignored_scope=ignored_scope(float_layers),
        advanced_parameters=settings.advanced(), **settings.common(len(inputs)),
    )


class _CompiledSegmenter(Segmenter):
    """A compiled OpenVINO model behind the Segmenter steps of `like` (NNCF's validation hands the
    accuracy-control loop compiled models, not files)."""

    backend = "openvino"

    def __init__(self, compiled, like: Segmenter) -> None:
        super().__init__(like.metadata, like.source)
        self._compiled = compiled

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self._compiled({self.metadata.input_name: x})
        return tuple(np.asarray(result[self._compiled.output(n)], np.float32) for n in self.metadata.output_names)


def quantize_nncf(
    *,
    source,
    out: Path,
    calibration: Sequence[CalibrationImage],
    gate: Gate,
    metadata: ArtifactMetadata,
    runtime_precision: str = "f32",
    settings: NncfSettings = NncfSettings(),
    recipe: Recipe | None = None,
):
    """NNCF post-training INT8 of `source` (FP32 ov.Model): symmetric 'performance' preset,
    transformer patterns keep Softmax/LayerNorm/GELU float, fused attention ops stay float, then the
    `recipe`'s float layers and the growing fallback levels (`quantize.search_levels`). Each attempt
    is staged beside `out` (`<stem>.try<n>.xml`, n float layers) and judged through OpenVINO's
    Segmenter at `runtime_precision`. With `settings.accuracy_control`, NNCF's accuracy-control loop
    chooses the float layers itself (metric: min Dice vs FP32 over the gated images) and the gate
    judges its one result. Returns (quantized ov.Model, passing attempt, all attempts)."""
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)
    inputs = [np.repeat(im.x[None], max(metadata.batch, 1), axis=0) for im in calibration]
    last: list = []  # the search stops at the first passing model, so the last one is it

    def stage(model, float_layers: list[str]) -> Segmenter:
        last[:] = [model]
        probe = out.with_name(f"{out.stem}.try{len(float_layers)}{out.suffix}")  # each level adds layers
        return save_and_open(model, metadata, probe, compress_to_fp16=False, precision=runtime_precision)

    def quantize(float_layers: list[str]) -> Segmenter:
        return stage(nncf_quantize(source, inputs, settings=settings, float_layers=float_layers), float_layers)

    levels = search_levels(
        ops_of_types(source, QUANTIZABLE_OV_TYPES), recipe=recipe, backend="openvino",
        always_float=ops_of_types(source, FLOAT_OV_TYPES),
    )
    if not settings.accuracy_control:
        best, attempts = gate.search(levels, quantize)
        return last[0], best, attempts

    like = stage(source, [])  # the FP32 model staged once: the Segmenter steps the metric runs
    indices = nncf.Dataset(list(range(len(gate.images))))

    def min_dice(compiled, items) -> tuple[float, list[float]]:
        dice = gate.dice_of(_CompiledSegmenter(compiled, like), [int(i) for i in items])
        return min(dice), dice

    model = nncf.quantize_with_accuracy_control(
        source.clone(), nncf.Dataset(inputs), indices, min_dice, max_drop=gate.max_drop,
        drop_type=nncf.DropType.ABSOLUTE, ignored_scope=ignored_scope(levels[0][1]),
        advanced_quantization_parameters=settings.advanced(), **settings.common(len(inputs)),
    )
    float_layers = sorted(set(ops_of_types(source, QUANTIZABLE_OV_TYPES)) - quantized_ops(model))
    best, attempts = gate.search([("nncf accuracy control", float_layers)], lambda layers: stage(model, layers))
    return model, best, attempts


#: Ops between a quantizer (FakeQuantize, or an int8 weight Constant) and the op it feeds.
_PASS_THROUGH = ("Transpose", "Reshape", "Convert", "Multiply", "Subtract", "Squeeze", "Unsqueeze")


def quantized_ops(model) -> set[str]:
    """Names of the quantizable ops NNCF left quantized: an input reaches a FakeQuantize or an
    int8 weight constant through at most three layout / dequantize ops."""

    def quantized(node, hops: int) -> bool:
        kind = node.get_type_name()
        if kind == "FakeQuantize" or (kind == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8")):
            return True
        return hops > 0 and kind in _PASS_THROUGH and any(
            quantized(v.get_node(), hops - 1) for v in node.input_values()
        )

    return {
        op.get_friendly_name() for op in model.get_ordered_ops()
        if op.get_type_name() in QUANTIZABLE_OV_TYPES and any(quantized(v.get_node(), 3) for v in op.input_values())
    }
