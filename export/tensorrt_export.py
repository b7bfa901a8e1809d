"""ONNX -> TensorRT 10 engine with the ONNX parser; FP16 with numerically sensitive layers
pinned to FP32; INT8 from the symmetric QDQ ONNX (explicit quantization, no calibrator). A box
export's prompt decoder is a second engine, its number of boxes dynamic (`DECODER_BOXES`).

The preflight and the precision plan only read the ONNX graph, so they run (and are tested)
without TensorRT. Building and running need `tensorrt` >= 10 and `pycuda` on an NVIDIA GPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from espmed.errors import BackendUnavailableError, ExportError, require
from espmed.runtimes.engine_header import EngineBuildInfo
from espmed.runtimes.metadata import BOXES_NAME, INPUT_NAME

#: ONNX ops this graph family may contain that TensorRT 10's ONNX parser supports
#: (subset of onnx-tensorrt's operators.md that covers what the exporter emits).
TRT_SUPPORTED_OPS = frozenset(
    """Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos CumSum DepthToSpace DequantizeLinear Div Einsum Elu Equal
    Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
    GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity
    InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max
    MaxPool Mean Min Mod Mul Neg Not Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL2
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ScatterElements ScatterND Shape Sigmoid Sign Sin Slice Softmax Softplus SpaceToDepth Split Sqrt
    Squeeze Sub Sum Tanh Tile TopK Transpose Trilu Unsqueeze Where Xor""".split()
)

#: Op types computed in FP32 inside an FP16 engine: normalisation statistics, softmax and
#: reductions overflow or lose too many bits in half precision; so do a prompt decoder's sin/cos of
#: its boxes' large Fourier phases.
FP32_PINNED_OPS = (
    "LayerNormalization", "Softmax",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "ReduceSumSquare",
    "Pow", "Sqrt", "Sin", "Cos",
)
#: A prompt decoder engine's boxes per call (min, opt, max) of its optimisation profile; the
#: runtime sends at most `runtimes.base.BOX_CHUNK` (16).
DECODER_BOXES = (1, 4, 64)
#: An optimisation profile: input name -> (min, opt, max) shapes.
Profiles = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def preflight(model: onnx.ModelProto, dynamic: bool) -> None:
    """Refuse a graph TensorRT would not build: unsupported ops, dynamic dims other than batch."""
    problems = []
    unsupported = sorted({
        n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in TRT_SUPPORTED_OPS
    })
    if unsupported:
        problems.append(f"ops TensorRT's ONNX parser does not support: {', '.join(unsupported)}")
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if d.HasField("dim_value"):
                continue
            if i == 0 and dynamic:
                continue
            problems.append(
                f"{value.name} has a dynamic dimension {i} ({d.dim_param or '?'}); only the batch may be dynamic"
            )
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append(f"{value.name} is not float32")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 17:
        problems.append(f"opset {opset} < 17 (LayerNormalization needs 17)")
    if problems:
        raise ExportError("TensorRT preflight failed: " + "; ".join(problems))


def precision_plan(model: onnx.ModelProto) -> list[str]:
    """ONNX node names whose TensorRT layers are pinned to FP32 in an FP16 engine."""
    return [n.name for n in model.graph.node if n.op_type in FP32_PINNED_OPS]


def plan_matcher(plan: list[str]):
    """A predicate on TensorRT layer names: the parser names a node's layers after the node,
    sometimes with a numeric or `_output` suffix (never another digit directly)."""
    if not plan:
        return lambda name: False
    rx = re.compile(r"^(?:" + "|".join(re.escape(n) for n in sorted(plan, key=len, reverse=True)) + r")(?![0-9])")
    return lambda name: bool(rx.match(name))


def _import_tensorrt():
    trt = require("tensorrt", "tensorrt", hint=" on an NVIDIA GPU machine")
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old; espmed builds with TensorRT 10")
    return trt


def gpu_info() -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of CUDA device 0, via pycuda."""
    cuda = require("pycuda.driver", "tensorrt")
    cuda.init()
    dev = cuda.Device(0)
    major, minor = dev.compute_capability()
    return dev.name(), f"{major}.{minor}"


def batch_profiles(image_size: int, batch: int, max_batch: int) -> Profiles:
    """The profile of an image graph: over the batch, 1 to `max_batch`, where `batch` is 0 (dynamic);
    none for a fixed batch."""
    if batch:
        return {}
    shape = (3, image_size, image_size)
    return {INPUT_NAME: ((1, *shape), (max(1, max_batch // 2), *shape), (max_batch, *shape))}


def box_profiles() -> Profiles:
    """The profile of a prompt decoder: over its number of boxes (`DECODER_BOXES`)."""
    return {BOXES_NAME: tuple((n, 4) for n in DECODER_BOXES)}


def build_engine(
    onnx_path: Path,
    precision: str,
    *,
    profiles: Profiles,
    workspace_mb: int | None = None,
    timing_cache: str | Path | None = None,
) -> tuple[bytes, EngineBuildInfo, list[str]]:
    """(serialized engine, build info, FP32-pinned ONNX node names); `profiles` gives each dynamic
    input's shapes (none: every shape is fixed)."""
    trt = _import_tensorrt()
    gpu, cc = gpu_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    plan: list[str] = []
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes
    if precision == "fp16":
        plan = precision_plan(onnx.load(str(onnx_path), load_external_data=False))
        pinned_names = plan_matcher(plan)
        pinned_types = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in pinned_types or pinned_names(layer.name):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    if layer.get_output(j).dtype in (trt.float32, trt.float16):
                        layer.set_output_type(j, trt.float32)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    if profiles:
        profile = builder.create_optimization_profile()
        for name, (smallest, typical, largest) in profiles.items():
            profile.set_shape(name, smallest, typical, largest)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build a {precision} engine from {onnx_path.name} (see the log above)")
    if cache_path:
        from espmed.atomic import write_bytes

        write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), EngineBuildInfo(trt.__version__, gpu, cc), plan
