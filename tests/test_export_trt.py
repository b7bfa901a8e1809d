"""TensorRT export parts that run without TensorRT: ONNX preflight, FP32 precision plan, engine
header read/write and mismatch refusal. Building an engine needs TensorRT 10 + an NVIDIA GPU,
neither of which can be installed on the CPU machines this suite runs on; that test skips."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from espmed.errors import ArtifactError, ExportError
from espmed.export.graph import ExportGraph
from espmed.export.onnx_export import export_onnx, save_onnx
from espmed.export.tensorrt_export import FP32_PINNED_OPS, plan_matcher, precision_plan, preflight
from espmed.model import ESPMedSAM, get_preset
from espmed.runtimes import engine_header as eh
from espmed.runtimes.metadata import INPUT_NAME, ArtifactMetadata


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> tuple[onnx.ModelProto, Path]:
    torch.manual_seed(0)
    graph = ExportGraph(ESPMedSAM(get_preset("esp-medsam-tiny")).eval(), "fundus")
    path = tmp_path_factory.mktemp("trt") / "tiny.onnx"
    model = export_onnx(graph, path, batch=0, dynamic=True, opset=18, simplify="onnxsim")
    save_onnx(model, path)
    return model, path


def _meta(**extra) -> ArtifactMetadata:
    return ArtifactMetadata(
        target="trt-fp16", backend="tensorrt", precision="fp16", modality="fundus", modality_index=3,
        modalities=["dermoscopy", "xray", "ultrasound", "fundus", "microscopy", "colonoscopy"], input_size=256,
        batch=1, preprocessing={"mean": [1.0, 2.0, 3.0], "std": [1.0, 2.0, 3.0]}, preset="esp-medsam-tiny",
        espmed_version="0.1.0", source_checkpoint_sha256="ab" * 32, extra=dict(extra),
    )


BUILT = eh.EngineBuildInfo("10.9.0.34", "NVIDIA GeForce RTX 4090", "8.9")


# -- preflight -----------------------------------------------------------------------------------
def test_preflight_accepts_the_exported_graph(tiny_onnx):
    model, _ = tiny_onnx
    preflight(model, dynamic=True)


def test_preflight_refuses_a_dynamic_batch_it_was_not_told_about(tiny_onnx):
    model, _ = tiny_onnx
    with pytest.raises(ExportError, match="images has a dynamic dimension 0"):
        preflight(model, dynamic=False)


def _toy(op: str, dims, domain: str = "") -> onnx.ModelProto:
    node = helper.make_node(op, ["images"], ["lowres_masks"], name=f"toy/{op}_0", domain=domain)
    graph = helper.make_graph(
        [node], "toy",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("lowres_masks", TensorProto.FLOAT, dims)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_preflight_refuses_unsupported_ops_and_dynamic_spatial_dims():
    with pytest.raises(ExportError, match="does not support: Unique"):
        preflight(_toy("Unique", [1, 3, 32, 32]), dynamic=False)
    with pytest.raises(ExportError, match="does not support: MyOp"):
        preflight(_toy("MyOp", [1, 3, 32, 32], domain="custom"), dynamic=False)
    with pytest.raises(ExportError, match="dimension 2 \\(height\\); only the batch may be dynamic"):
        preflight(_toy("Relu", [1, 3, "height", 32]), dynamic=True)
    preflight(_toy("Relu", ["batch", 3, 32, 32]), dynamic=True)


# -- precision plan ------------------------------------------------------------------------------
def test_precision_plan_pins_every_norm_softmax_and_reduction(tiny_onnx):
    model, _ = tiny_onnx
    plan = precision_plan(model)
    by_name = {n.name: n for n in model.graph.node}
    expected = [n.name for n in model.graph.node if n.op_type in FP32_PINNED_OPS]
    assert plan == expected
    kinds = {by_name[n].op_type for n in plan}
    assert {"LayerNormalization", "Softmax"} <= kinds
    ops = [n.op_type for n in model.graph.node]
    # LayerNorm stays one op (opset >= 17): no decomposed mean/variance anywhere in the graph
    assert ops.count("LayerNormalization") >= 20 and not {"ReduceMean", "Pow", "Sqrt"} & set(ops)
    assert "trunk.layers.1.blocks.0.attn/Softmax" in " ".join(plan)
    assert "decoder.transformer.norm_final_attn/LayerNormalization" in " ".join(plan)
    assert not any(by_name[n].op_type in ("Conv", "MatMul", "Gemm") for n in plan)


def test_plan_matcher_matches_parser_layer_names_exactly():
    match = plan_matcher(["trunk.layers.0.blocks.0.attn/Softmax_12", "neck.1/LayerNormalization_3"])
    assert match("trunk.layers.0.blocks.0.attn/Softmax_12")
    assert match("trunk.layers.0.blocks.0.attn/Softmax_12_output_0")
    assert match("neck.1/LayerNormalization_3 [copy]")
    assert not match("trunk.layers.0.blocks.0.attn/Softmax_123")
    assert not match("trunk.layers.0.blocks.0.attn/MatMul_11")
    assert not plan_matcher([])("anything")


# -- engine header ---------------------------------------------------------------------------------
def test_engine_file_round_trip(tmp_path):
    meta = _meta(**BUILT.to_extra())
    path = eh.write_engine(tmp_path / "m.engine", meta, b"\x00serialized-engine\xff" * 10)
    got, engine = eh.read_engine(path)
    assert got.to_json() == meta.to_json() and engine == b"\x00serialized-engine\xff" * 10
    assert eh.EngineBuildInfo.from_metadata(got) == BUILT
    raw = path.read_bytes()
    assert raw.startswith(b"ESPMEDTRT\x00")
    assert json.loads(raw[18 : 18 + int.from_bytes(raw[10:18], "little")]) == json.loads(meta.to_json())


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00" * 64, "missing header magic"),
        (b"ESPMEDTRT\x00\x05", "truncated engine header"),
        (b"ESPMEDTRT\x00" + (10**9).to_bytes(8, "little") + b"{}", "header length"),
    ],
)
def test_corrupt_engine_files_are_refused(tmp_path, data, message):
    path = tmp_path / "bad.engine"
    path.write_bytes(data)
    with pytest.raises(ArtifactError, match=message):
        eh.read_engine(path)


def test_header_without_engine_or_build_info_is_refused(tmp_path):
    path = tmp_path / "m.engine"
    path.write_bytes(eh.pack(_meta(**BUILT.to_extra()), b"x")[:-1])
    with pytest.raises(ArtifactError, match="header but no engine"):
        eh.read_engine(path)
    with pytest.raises(ArtifactError, match="lacks tensorrt_version, gpu_name, compute_capability"):
        eh.write_engine(tmp_path / "n.engine", _meta(), b"plan")
    assert not (tmp_path / "n.engine").exists()


def test_mismatched_engine_is_refused_with_a_clear_message():
    meta = _meta(**BUILT.to_extra())
    eh.check_compatible(meta, BUILT)
    with pytest.raises(ArtifactError, match=r"TensorRT 10.9.0.34 \(this machine has 10.13.0\)"):
        eh.check_compatible(meta, eh.EngineBuildInfo("10.13.0", BUILT.gpu_name, "8.9"))
    with pytest.raises(
        ArtifactError,
        match=(
            r"compute capability 8.9 \(this GPU is 9.0\)"
            r".*rebuild it on this machine with `espmed export --target trt-fp16`"
        ),
    ):
        eh.check_compatible(meta, eh.EngineBuildInfo(BUILT.tensorrt_version, "NVIDIA H100", "9.0"))


# -- needs TensorRT ------------------------------------------------------------------------------
def engine_runner(engine_bytes: bytes):
    """Run a serialized engine on GPU 0: images (B, 3, S, S) -> (lowres_masks, patch_logits)."""
    import numpy as np
    import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
    import pycuda.driver as cuda
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise ExportError("TensorRT could not deserialize the engine it just built")
    context = engine.create_execution_context()
    stream = cuda.Stream()

    def run(x: np.ndarray):
        x = np.ascontiguousarray(x, np.float32)
        context.set_input_shape(INPUT_NAME, x.shape)
        buffers = {INPUT_NAME: cuda.mem_alloc(x.nbytes)}
        cuda.memcpy_htod_async(buffers[INPUT_NAME], x, stream)
        outputs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                host = np.empty(tuple(context.get_tensor_shape(name)), np.float32)
                outputs[name] = host
                buffers[name] = cuda.mem_alloc(host.nbytes)
            context.set_tensor_address(name, int(buffers[name]))
        if not context.execute_async_v3(stream.handle):
            raise ExportError("TensorRT engine execution failed")
        for name, host in outputs.items():
            cuda.memcpy_dtoh_async(host, buffers[name], stream)
        stream.synchronize()
        return outputs["lowres_masks"], outputs["patch_logits"]

    return run


def test_build_fp16_engine_and_run_it(tiny_onnx):
    pytest.importorskip("tensorrt", reason="TensorRT 10 is not installable here (no NVIDIA index, no GPU)")
    pytest.importorskip("pycuda", reason="pycuda is not installable here (no CUDA)")
    import numpy as np
    import onnxruntime as ort

    from espmed.export.tensorrt_export import batch_profiles, build_engine

    model, path = tiny_onnx
    engine, info, plan = build_engine(path, "fp16", profiles=batch_profiles(256, 0, 4))
    assert plan == precision_plan(model) and info.compute_capability
    x = np.random.default_rng(0).standard_normal((2, 3, 256, 256)).astype(np.float32)
    low, patch = engine_runner(engine)(x)
    ref_low, ref_patch = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    assert np.abs(low - ref_low).max() < 5e-2 and np.abs(patch - ref_patch).max() < 5e-2
