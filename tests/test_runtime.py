"""espmed.runtimes: the same masks from torch, ONNX Runtime and OpenVINO; batching; threads;
manifests; precision; clear errors; and no torch import on the runtime path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from espmed.errors import ArtifactError, BackendUnavailableError, ModalityError
from espmed.machine import cpu_info
from espmed.runtimes import Prediction, load
from espmed.runtimes.manifest import manifest_path
from espmed.runtimes.metadata import METADATA_KEY, ArtifactMetadata

from .runtime_artifacts import build_artifacts, dice, fundus_crop, write_manifest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "espmed" / "assets" / "samples"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    return build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")


@pytest.fixture(scope="module")
def segmenters(artifacts):
    return {
        "torch": load(artifacts["checkpoint"], modality="brain"),
        "onnxruntime": load(artifacts["onnx"], threads=1),
        "openvino": load(artifacts["openvino"], threads=1),
    }


def _samples(n: int) -> list[np.ndarray]:
    from PIL import Image

    names = ["nuclei_dsb2018_a.png", "brain_mni152_axial_z90.png", "ct_small.png", "fundus_microaneurysms.png"]
    return [np.asarray(Image.open(SAMPLES / name)) for name in names[:n]]


def test_backends_give_identical_masks_on_a_non_square_image(segmenters):
    image = fundus_crop()
    assert image.shape == (300, 451, 3)
    results = {name: seg.predict(image, return_logits=True) for name, seg in segmenters.items()}
    reference = results["torch"]
    assert reference.mask.dtype == np.bool_ and reference.mask.shape == (300, 451)
    assert reference.probability.shape == (300, 451) and reference.probability.dtype == np.float32
    assert 0 < reference.mask.sum() < reference.mask.size  # a real mask, not all or nothing
    for name, result in results.items():
        assert isinstance(result, Prediction)
        assert result.mask.shape == (300, 451), name
        assert dice(result.mask, reference.mask) == 1.0, name
        assert np.abs(result.logits - reference.logits).max() < 1e-3, name
        assert result.patch_map.shape == reference.patch_map.shape
        assert set(result.timings) == {"preprocess", "infer", "postprocess"}


def test_predict_batch_uses_the_batch_and_matches_single_predictions(segmenters, artifacts):
    images = _samples(3)
    fixed = load(artifacts["openvino_b2"])
    assert fixed.metadata.batch == 2 and fixed.chunk_size == 2
    singles = [segmenters["torch"].predict(image) for image in images]
    for seg in (segmenters["onnxruntime"], segmenters["openvino"], fixed):
        batched = seg.predict_batch(images)
        assert len(batched) == 3
        for image, pred, single in zip(images, batched, singles, strict=True):
            assert pred.mask.shape == image.shape[:2]
            assert dice(pred.mask, single.mask) == 1.0
            assert np.abs(pred.probability - single.probability).max() < 1e-4


def test_raw_run_accepts_any_batch_and_checks_the_shape(segmenters, artifacts):
    x = np.random.default_rng(0).standard_normal((3, 3, 256, 256)).astype(np.float32)
    lowres, patches = segmenters["onnxruntime"].run(x)
    assert lowres.shape == (3, 1, 64, 64) and patches.shape == (3, 1, 8, 8)
    fixed_lowres, _ = load(artifacts["openvino_b2"]).run(x)  # chunked by 2, last chunk padded
    assert np.abs(fixed_lowres - lowres).max() < 1e-3
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 256\)"):
        segmenters["onnxruntime"].run(x[:, :, :128])


@pytest.mark.parametrize("backend,calls", [("onnxruntime", 50), ("openvino", 12), ("torch", 3)])
def test_one_runtime_object_is_safe_from_many_threads(segmenters, backend, calls):
    seg = segmenters[backend]
    images = [im[:160, :200] for im in _samples(4)]
    expected = [seg.predict(im).mask for im in images]
    mismatches: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(calls):
                k = (t + i) % len(images)
                if not np.array_equal(seg.predict(images[k]).mask, expected[k]):
                    mismatches.append((t, i))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert not mismatches, f"{len(mismatches)} of {8 * calls} masks differ from the single-thread result"


def test_openvino_precision_is_explicit_and_cache_dir_is_used(artifacts, tmp_path):
    f32 = load(artifacts["openvino"])
    assert f32.precision == "f32"
    assert f32.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    bf16 = load(artifacts["openvino"], precision="bf16", cache_dir=tmp_path / "cache")
    runs = "bf16" if cpu_info()["bf16"] else "f32"  # a CPU without native BF16 runs the request in f32
    assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == runs == bf16.precision
    assert any((tmp_path / "cache").iterdir()), "compiled-model cache was not written"
    with pytest.raises(ArtifactError, match="precision"):
        load(artifacts["openvino"], precision="int4")
    with pytest.raises(ArtifactError, match="only OpenVINO"):
        load(artifacts["onnx"], precision="fp16")


def test_threads_are_applied(artifacts):
    seg = load(artifacts["onnx"], threads=1)
    assert seg.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        load(artifacts["onnx"], device="CUDA")


def _copy(paths: list[Path], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, dest / p.name)) for p in paths]


def test_manifest_is_verified(artifacts, tmp_path):
    onnx_path, = _copy([artifacts["onnx"]], tmp_path)
    meta = load(onnx_path).metadata
    write_manifest(onnx_path, meta, [onnx_path])
    assert load(onnx_path).metadata == meta

    data = json.loads(manifest_path(onnx_path).read_text())
    data["files"][onnx_path.name] = "0" * 64
    manifest_path(onnx_path).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"does not match tiny.onnx.manifest.json .* tiny.onnx was modified"):
        load(onnx_path)
    load(onnx_path, verify=False)  # explicitly skipped

    other = ArtifactMetadata.from_json(meta.to_json())
    other.modality = "nuclei"
    write_manifest(onnx_path, other, [onnx_path])
    with pytest.raises(ArtifactError, match="manifest metadata differs"):
        load(onnx_path)

    xml, _ = _copy([artifacts["openvino"], artifacts["openvino"].with_suffix(".bin")], tmp_path / "ov")
    write_manifest(xml, load(xml).metadata, [xml, xml.with_suffix(".bin")])
    weights = bytearray(xml.with_suffix(".bin").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    xml.with_suffix(".bin").write_bytes(bytes(weights))
    with pytest.raises(ArtifactError, match="tiny.bin: SHA-256"):
        load(xml)


def test_bad_artifacts_are_refused_with_one_line(artifacts, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(ArtifactError, match="no such artifact"):
        load(tmp_path / "missing.onnx")
    (tmp_path / "model.tflite").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="unknown artifact type"):
        load(tmp_path / "model.tflite")
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ArtifactError, match="cannot load"):
        load(tmp_path / "garbage.onnx")
    node = helper.make_node("Identity", ["images"], ["lowres_masks"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("lowres_masks", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "plain.onnx"))
    with pytest.raises(ArtifactError, match="no espmed metadata"):
        load(tmp_path / "plain.onnx")
    model = onnx.load(str(artifacts["onnx"]))
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = ArtifactMetadata.from_json(prop.value)
    meta.input_size = 320
    prop.value = meta.to_json()
    onnx.save(model, str(tmp_path / "says_320.onnx"))
    with pytest.raises(ArtifactError, match=r"graph input shape \[None, 3, 256, 256\] does not match"):
        load(tmp_path / "says_320.onnx")
    meta.input_size = 256
    for resize in ("stretch", "longest-side-block-exact"):
        meta.preprocessing["resize"] = resize
        prop.value = meta.to_json()
        onnx.save(model, str(tmp_path / f"{resize}.onnx"))
    with pytest.raises(ArtifactError, match="unsupported preprocessing \\(resize 'stretch'"):
        load(tmp_path / "stretch.onnx")
    small = np.random.default_rng(0).integers(0, 256, (30, 50), dtype=np.uint8)
    x, box = load(tmp_path / "longest-side-block-exact.onnx").preprocess(small)
    assert box.resized_hw == (152, 256)  # 4x the quarter-size resize (38 x 64), not 154 x 256
    xml, = _copy([artifacts["openvino"]], tmp_path / "nobin")
    with pytest.raises(ArtifactError, match="tiny.bin is missing"):
        load(xml)
    with pytest.raises(ModalityError, match="exported for modality 'brain'"):
        load(artifacts["onnx"], modality="nuclei")
    assert load(artifacts["checkpoint"]).modality == "brain"  # the default: its first controller
    with pytest.raises(ArtifactError, match="input size of an exported artifact is fixed"):
        load(artifacts["onnx"], image_size=512)
    both = tmp_path / "both"
    _copy([artifacts["onnx"], artifacts["checkpoint"]], both)
    with pytest.raises(ArtifactError, match="exactly one artifact"):
        load(both)


def test_folder_with_one_artifact_loads_it(artifacts, tmp_path):
    _copy([artifacts["onnx"]], tmp_path / "model")
    assert load(tmp_path / "model").backend == "onnxruntime"


def _engine_metadata(artifacts) -> ArtifactMetadata:
    meta = load(artifacts["onnx"]).metadata
    meta.target, meta.backend = "trt-fp16", "tensorrt"
    meta.extra = {"tensorrt_version": "10.13.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    return meta


def test_tensorrt_engine_header_is_checked_before_tensorrt_is_needed(artifacts, tmp_path):
    from espmed.runtimes.engine_header import pack

    engine = tmp_path / "model.engine"
    engine.write_bytes(pack(_engine_metadata(artifacts), b"serialized-engine-bytes"))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="tensorrt and pycuda"):
            load(engine)
    engine.write_bytes(engine.read_bytes()[:40])  # truncated inside the header
    with pytest.raises(ArtifactError, match="header length"):
        load(engine)
    engine.write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="not an espmed TensorRT engine"):
        load(engine)


def test_tensorrt_engine_runs_on_a_gpu(artifacts):
    pytest.importorskip(
        "tensorrt", reason="TensorRT needs an NVIDIA GPU and NVIDIA's package index (not on this machine)"
    )
    pytest.importorskip("pycuda", reason="pycuda needs CUDA (not on this machine)")
    engine = artifacts["onnx"].with_suffix(".engine")
    if not engine.is_file():
        pytest.skip("no engine built for this GPU (build one with `espmed export --target trt-fp16`)")
    seg = load(engine)
    reference = load(artifacts["checkpoint"], modality="brain").predict(fundus_crop())
    assert dice(seg.predict(fundus_crop()).mask, reference.mask) > 0.99


TORCH_BLOCKER = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""


def test_runtime_and_io_import_and_run_without_torch(artifacts, tmp_path):
    from espmed.runtimes.engine_header import pack

    engine = tmp_path / "model.engine"
    engine.write_bytes(pack(_engine_metadata(artifacts), b"serialized-engine-bytes"))
    script = TORCH_BLOCKER + textwrap.dedent(
        f"""
        import numpy as np
        import espmed.runtimes
        from espmed.runtimes import load
        from espmed.io import read_image
        from espmed.errors import BackendUnavailableError
        from pydicom.data import get_testdata_file
        image = read_image(get_testdata_file("CT_small.dcm")).frames[0]
        for artifact in ({str(artifacts["onnx"])!r}, {str(artifacts["openvino"])!r}):
            mask = load(artifact).predict(image).mask
            assert mask.shape == (128, 128), mask.shape
        try:
            load({str(engine)!r})
        except BackendUnavailableError:
            pass
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch import was not blocked")
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch got imported"
        print("torch-free ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch-free ok" in proc.stdout
    plain = subprocess.run(
        [sys.executable, "-c", TORCH_BLOCKER + "import espmed.runtimes, espmed.io; print('ok')"],
        capture_output=True, text=True, timeout=60,
    )
    assert plain.returncode == 0 and plain.stdout.strip() == "ok", plain.stderr[-2000:]


def test_onnx_metadata_is_read_from_the_artifact(artifacts):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(artifacts["onnx"])).metadata_props}
    seg = load(artifacts["onnx"])
    assert seg.metadata == ArtifactMetadata.from_json(props[METADATA_KEY])
    assert seg.input_size == 256 and seg.modality == "brain" and seg.metadata.dynamic_batch
