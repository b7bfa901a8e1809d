"""ESP-MedSAM graph -> ONNX (FP32, FP16 with FP32 I/O), metadata embedded in `metadata_props`.

Exporter: the dynamo exporter (`torch.onnx.export(dynamo=True)`), chosen explicitly. The
TorchScript exporter cannot export a dynamic batch here (LayerNorm2d's normalised shape becomes a
traced tensor). Tracing runs with the math SDPA kernel: the fused CPU kernel returns an output
layout that the ONNX decomposition does not reproduce, which breaks the window-attention reshape.
Opset >= 17 keeps LayerNorm as one LayerNormalization op. A dynamic batch is exported from a
batch-2 example (a batch-1 example silently specialises the batch to 1); a prompt decoder's number of
boxes likewise from two boxes.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import warnings
from pathlib import Path

import onnx

from espmed.errors import ExportError, first_line
from espmed.runtimes.base import Segmenter
from espmed.runtimes.metadata import GRAPH_IO, METADATA_KEY, ArtifactMetadata

EXPORTER = "torch.onnx dynamo"
MIN_OPSET = 17
SIMPLIFIERS = ("onnxsim", "onnxslim", "none")
FOLDED_TENSOR_LIMIT = 4 << 20
MAX_FOLD_GROWTH = 1.1
#: Ops that stay FP32 in the FP16 graph: normalisation statistics, softmax, GELU's erf and the
#: final resize overflow or lose too many bits in half precision; so do the box prompt encoder's
#: sin/cos of large Fourier phases (a prompt decoder's only).
FP16_KEEP_FLOAT_OPS = ("LayerNormalization", "Softmax", "Erf", "Resize", "ReduceMean", "Pow", "Sqrt", "Sin", "Cos")


def export_onnx(graph, path: Path, *, batch: int, dynamic: bool, opset: int, simplify: str) -> onnx.ModelProto:
    """Export `graph` (an `espmed.export.graph.Graph`) and return the cleaned, simplified ONNX model (not
    yet saved). `dynamic`: its first dimension (`graph.dim`) is dynamic, else `batch`."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: LayerNorm needs opset >= {MIN_OPSET}")
    if simplify not in SIMPLIFIERS:
        raise ExportError(f"unknown simplifier {simplify!r}; choose from {', '.join(SIMPLIFIERS)}")
    example = graph.example(2 if dynamic else batch)
    kwargs = {}
    if dynamic:
        dim = torch.export.Dim(graph.dim, min=1, max=1024)  # a bound for tracing only: the ONNX dim is symbolic
        kwargs["dynamic_shapes"] = tuple({0: dim} if d else None for d in graph.dynamic_inputs)
    names_in, names_out = GRAPH_IO[graph.kind]
    raw = path.with_name(path.stem + ".raw.onnx")
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), _quiet_exporter():
            torch.onnx.export(
                graph, example, str(raw), dynamo=True, opset_version=opset,
                input_names=list(names_in), output_names=list(names_out), verbose=False, report=False, **kwargs,
            )
        model = onnx.load(str(raw), load_external_data=True)
    except Exception as exc:  # the exporter raises many internal error types
        raise ExportError(f"ONNX export failed: {first_line(exc)}") from exc
    finally:
        for leftover in raw.parent.glob(raw.name + "*"):
            leftover.unlink(missing_ok=True)
    name_nodes_by_module(model)
    if dynamic:
        name_dynamic_dim(model, graph.dim)
    return simplify_model(model, simplify)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's deprecation warnings and registry chatter (errors still raise)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def name_nodes_by_module(model: onnx.ModelProto) -> None:
    """Rename nodes `<module path>/<Op>_<i>` from the exporter's name scopes and drop the bulky
    per-node metadata (stack traces). Readable names are what float-layer lists, OpenVINO/NNCF
    ignored scopes and the TensorRT precision plan refer to."""
    used: set[str] = set()
    for i, node in enumerate(model.graph.node):
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        module = ""
        if scopes:
            try:
                parts = [s for s in ast.literal_eval(scopes) if s.startswith("model.") or s == "model"]
            except (ValueError, SyntaxError):
                parts = []
            if parts:
                module = parts[-1].removeprefix("model.").removeprefix("model")
        name = f"{module or 'graph'}/{node.op_type}_{i}"
        while name in used:
            name += "_"
        used.add(name)
        node.name = name
        del node.metadata_props[:]


def name_dynamic_dim(model: onnx.ModelProto, name: str) -> None:
    """Call the dynamic first dimension `name` on the graph inputs and outputs."""
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_param = name


def simplify_model(model: onnx.ModelProto, simplify: str) -> onnx.ModelProto:
    """Simplify without letting constant folding bloat the file.

    With a static batch, each window-attention bias (a small table gathered and expanded over
    all windows) is constant, and a full fold stores it expanded: at 1024^2, several times the
    weights. So a fold that grows the model by more than `MAX_FOLD_GROWTH` is redone without folding
    weights (onnxsim) or without folding tensors above `FOLDED_TENSOR_LIMIT` bytes (onnxslim).
    """
    before = model.ByteSize()
    if simplify == "onnxsim":
        import onnxsim

        # MatMul+Add stay two nodes (ONNX Runtime fuses them itself): a fused Gemm gets a
        # fresh name, losing the module path that float-layer lists and plans refer to.
        skip = ["fuse_matmul_add_bias_into_gemm"]
        simplified, ok = onnxsim.simplify(_copy(model), skipped_optimizers=skip)
        if ok and simplified.ByteSize() > MAX_FOLD_GROWTH * before:
            simplified, ok = onnxsim.simplify(_copy(model), skipped_optimizers=skip, initializers_as_constants=False)
        if not ok:
            raise ExportError("onnxsim could not validate the simplified graph (use --simplify onnxslim or none)")
        name_new_nodes(simplified)
        return simplified
    if simplify == "onnxslim":
        import onnxslim

        slimmed = onnxslim.slim(_copy(model), size_threshold=FOLDED_TENSOR_LIMIT)
        name_new_nodes(slimmed)
        return slimmed
    return model


def name_new_nodes(model: onnx.ModelProto) -> None:
    """Give nodes a simplifier created (no `<module>/` prefix) the module of a neighbour."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    used = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if "/" in node.name:
            continue
        neighbours = [producer[x] for x in node.input if x in producer]
        neighbours += [c for o in node.output for c in consumers.get(o, [])]
        module = next((node_module(n.name) for n in neighbours if "/" in n.name), "graph")
        name = f"{module}/{node.op_type}_s{i}"
        while name in used:
            name += "_"
        used.add(name)
        node.name = name


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    return twin


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and compute, FP32 graph inputs/outputs; sensitive ops kept FP32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(FP16_KEEP_FLOAT_OPS), disable_shape_infer=False
    )


def embed_metadata(model: onnx.ModelProto, meta: ArtifactMetadata) -> None:
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = meta.to_json()
    model.producer_name = "espmed"


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save as one file when it fits protobuf's 2 GB limit, else with a `.onnx.data` beside it."""
    if model.ByteSize() < 2_000_000_000:
        onnx.save_model(model, str(path))
        return [path]
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    return [path, path.with_name(data)]


def save_and_open(model: onnx.ModelProto, meta: ArtifactMetadata, path: Path) -> Segmenter:
    """Embed `meta`, save at `path` and open it as a device would (the gate's candidate)."""
    from espmed.runtimes import load

    embed_metadata(model, meta)
    save_onnx(model, path)
    return load(path, verify=False)


def node_module(node_name: str) -> str:
    """The module path part of a node name given by `name_nodes_by_module`."""
    return node_name.rsplit("/", 1)[0]

