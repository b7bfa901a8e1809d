"""`espmed export --target triton` without a server: the repositories for every backend, parsed with
tritonclient's model-config protobuf; refusals (fixed batch, tampered files, configs that do not
match their metadata); the remote runtime's errors when nothing serves the URL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb
from typer.testing import CliRunner

from espmed.errors import ArtifactError, BackendUnavailableError, ExportError
from espmed.export import export
from espmed.runtimes import load
from espmed.runtimes.engine_header import pack, read_engine
from espmed.runtimes.metadata import METADATA_KEY
from espmed.runtimes.triton_remote import parse_url
from espmed.runtimes.triton_repository import MANIFEST, check_config, metadata_of, verify_repository
from espmed.runtimes.triton_server import free_port

from .runtime_artifacts import build_artifacts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    return build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")


def _config(path: Path) -> pb.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _check_common(config: pb.ModelConfig, meta, *, max_batch: int, kind: str, instances: int = 1) -> None:
    assert config.max_batch_size == max_batch
    assert list(config.dynamic_batching.preferred_batch_size) == sorted({max(1, max_batch // 2), max_batch})
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(instances, kind)]
    assert metadata_of(config, "cfg").to_json() == meta.to_json()


def test_onnx_repositories_parse_and_match_the_metadata(artifacts, tmp_path):
    result = export(artifacts["onnx"], "triton", tmp_path / "repo", triton_max_batch=6, instances=2)
    root, meta = result.artifact, load(artifacts["onnx"]).metadata
    assert _tree(root) == [
        MANIFEST, "onnxruntime/tiny/1/model.onnx", "onnxruntime/tiny/config.pbtxt",
        "python/tiny/1/model.py", "python/tiny/1/tiny.onnx", "python/tiny/1/tiny.onnx.manifest.json",
        "python/tiny/config.pbtxt",
    ]
    native = _config(root / "onnxruntime/tiny/config.pbtxt")
    assert (native.name, native.platform, native.backend) == ("tiny", "onnxruntime_onnx", "")
    _check_common(native, meta, max_batch=6, kind="KIND_CPU", instances=2)
    s = meta.input_size
    assert [(t.name, list(t.dims)) for t in native.input] == [("images", [3, s, s])]
    assert [(t.name, list(t.dims)) for t in native.output] == [
        ("lowres_masks", [1, s // 4, s // 4]), ("patch_logits", [1, s // 32, s // 32])
    ]
    assert check_config(native, meta, "native") is False  # takes the tensor only
    python = _config(root / "python/tiny/config.pbtxt")
    assert (python.backend, python.platform) == ("python", "")
    _check_common(python, meta, max_batch=6, kind="KIND_CPU", instances=2)
    image = next(t for t in python.input if t.name == "image")
    assert (pb.DataType.Name(image.data_type), list(image.dims)) == ("TYPE_UINT8", [-1, -1, 3])
    assert image.allow_ragged_batch and image.optional
    assert check_config(python, meta, "python") is True
    assert python.parameters["espmed_artifact"].string_value == "tiny.onnx"
    # the served copies are the artifact, verified like any artifact
    assert (root / "onnxruntime/tiny/1/model.onnx").read_bytes() == artifacts["onnx"].read_bytes()
    assert load(root / "python/tiny/1/tiny.onnx").metadata.to_json() == meta.to_json()
    listed = verify_repository(root)
    assert set(listed["files"]) == set(_tree(root)) - {MANIFEST}
    assert listed["triton"]["model"] == "tiny" and listed["triton"]["repositories"]["onnxruntime"] == "onnxruntime_onnx"
    assert result.size_bytes == sum(f.stat().st_size for f in result.files)


def test_openvino_and_tensorrt_repositories_for_backends_not_served_here(artifacts, tmp_path):
    xml = export(artifacts["openvino"], "triton", tmp_path / "ov").artifact
    assert "openvino/tiny/1/model.xml" in _tree(xml) and "openvino/tiny/1/model.bin" in _tree(xml)
    assert (xml / "openvino/tiny/1/model.bin").read_bytes() == artifacts["openvino"].with_suffix(".bin").read_bytes()
    ov = _config(xml / "openvino/tiny/config.pbtxt")
    assert (ov.backend, ov.platform) == ("openvino", "")
    meta = load(artifacts["openvino"]).metadata
    _check_common(ov, meta, max_batch=8, kind="KIND_CPU")
    assert check_config(ov, meta, "openvino") is False

    trt_meta = load(artifacts["onnx"]).metadata  # a dynamic-batch engine's header
    trt_meta.target, trt_meta.backend, trt_meta.precision = "trt-fp16", "tensorrt", "fp16"
    trt_meta.extra = {"tensorrt_version": "10.9.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(pack(trt_meta, b"serialized-plan-bytes"))
    root = export(engine, "triton", tmp_path / "trt", triton_max_batch=4).artifact
    assert (root / "tensorrt/tiny/1/model.plan").read_bytes() == b"serialized-plan-bytes"  # header stripped
    plan = _config(root / "tensorrt/tiny/config.pbtxt")
    assert plan.platform == "tensorrt_plan"
    _check_common(plan, trt_meta, max_batch=4, kind="KIND_GPU")
    assert json.loads(plan.parameters[METADATA_KEY].string_value)["extra"]["gpu_name"] == "NVIDIA L4"
    python = _config(root / "python/tiny/config.pbtxt")
    _check_common(python, trt_meta, max_batch=4, kind="KIND_GPU")
    assert read_engine(root / "python/tiny/1/tiny.engine")[1] == b"serialized-plan-bytes"  # espmed's file, header kept


def test_fixed_batch_and_bad_options_are_refused(artifacts, tmp_path):
    with pytest.raises(ExportError, match=r"fixed batch of 2.*export it again with --dynamic"):
        export(artifacts["openvino_b2"], "triton", tmp_path / "b2")
    assert not (tmp_path / "b2").exists()
    with pytest.raises(ExportError, match="must be >= 1"):
        export(artifacts["onnx"], "triton", tmp_path / "x", triton_max_batch=0)
    with pytest.raises(ExportError, match="does not accept max_batch"):
        export(artifacts["onnx"], "triton", tmp_path / "x", max_batch=8)  # TensorRT's option, not Triton's
    with pytest.raises(ExportError, match="input size"):
        export(artifacts["onnx"], "triton", tmp_path / "x", imgsz=128)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an espmed Triton export"):
        export(artifacts["onnx"], "triton", tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_tampered_repository_and_mismatching_configs_are_refused(artifacts, tmp_path):
    root = export(artifacts["onnx"], "triton", tmp_path / "repo").artifact
    again = export(artifacts["onnx"], "triton", tmp_path / "repo").artifact  # replaces the previous export
    assert again == root and verify_repository(root)
    meta = load(artifacts["onnx"]).metadata
    config = _config(root / "python/tiny/config.pbtxt")
    wrong = pb.ModelConfig()
    wrong.CopyFrom(config)
    wrong.input[0].dims[1] = meta.input_size * 2
    with pytest.raises(ArtifactError, match=r"does not match its espmed metadata: images is TYPE_FP32"):
        check_config(wrong, meta, "cfg")
    wrong.CopyFrom(config)
    next(t for t in wrong.output if t.name == "mask").data_type = pb.TYPE_UINT8
    with pytest.raises(ArtifactError, match="image output mask is TYPE_UINT8"):
        check_config(wrong, meta, "cfg")
    wrong.CopyFrom(config)
    wrong.max_batch_size = 0
    with pytest.raises(ArtifactError, match="max_batch_size is 0"):
        check_config(wrong, meta, "cfg")
    del wrong.parameters[METADATA_KEY]
    with pytest.raises(ArtifactError, match="no espmed metadata"):
        metadata_of(wrong, "cfg")
    model = root / "onnxruntime/tiny/1/model.onnx"
    model.write_bytes(model.read_bytes() + b"x")
    with pytest.raises(ArtifactError, match=r"model.onnx: SHA-256 .* does not match"):
        verify_repository(root)


def test_the_cli_writes_repositories_from_an_artifact(artifacts, tmp_path):
    from espmed.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["export", "--target", "triton", "--from", str(artifacts["onnx"]), "--out", str(out)]
    result = runner.invoke(app, [*args, "--triton-max-batch", "4", "--instances", "2"])
    assert result.exit_code == 0, result.output
    assert "triton://127.0.0.1:8001/tiny" in result.output
    config = _config(out / "python/tiny/config.pbtxt")
    assert config.max_batch_size == 4 and config.instance_group[0].count == 2
    for bad, message in (
        (["export", "--target", "onnx", "--from", str(artifacts["onnx"])], "--from wraps an exported artifact"),
        (["export", "--target", "triton"], "give --checkpoint, or --from"),
    ):
        result = runner.invoke(app, bad)
        assert result.exit_code != 0 and message in str(result.exception or result.output)


def test_the_remote_runtime_refuses_folders_and_says_when_no_server_answers(artifacts, tmp_path):
    root = export(artifacts["onnx"], "triton", tmp_path / "repo").artifact
    with pytest.raises(ArtifactError, match="served by tritonserver"):
        load(root)
    assert parse_url("triton://[::1]:9/m/2") == ("[::1]:9", "m", "2")
    assert parse_url("triton://host/m") == ("host:8001", "m", "")
    for bad in ("triton://host:8001", "triton://host:x/m", "triton://host:1/a/b/c"):
        with pytest.raises(ArtifactError):
            parse_url(bad)
    url = f"triton://127.0.0.1:{free_port()}/tiny"
    with pytest.raises(BackendUnavailableError) as caught:
        load(url)
    assert str(caught.value).startswith(f"{url}: Triton server not reachable") and "\n" not in str(caught.value)
    shutil.rmtree(root)
