"""The exported Python-backend repository served by a real Triton server (pytriton's `tritonserver`,
started by these tests on free loopback ports and stopped by them): remote masks equal local ones,
concurrent clients are batched, a killed server gives one clear error and is recovered from, and a
model whose config does not match its metadata is refused."""

from __future__ import annotations

import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2 as pb
from typer.testing import CliRunner

from espmed.errors import ArtifactError, BackendUnavailableError, ModalityError
from espmed.export import export
from espmed.io import read_frame
from espmed.metrics import dice
from espmed.runtimes import load
from espmed.runtimes.triton_server import LocalTritonServer, missing

from .runtime_artifacts import build_artifacts, fundus_crop

pytestmark = pytest.mark.skipif(missing() is not None, reason=f"no Triton server here: {missing()}")

SAMPLES = Path(__file__).resolve().parents[1] / "espmed" / "assets" / "samples"
CLIENTS, REQUESTS = 8, 25


def _images() -> list[np.ndarray]:
    """Real images of different sizes and kinds: RGB crop, gray, a 16-bit-like rescale, a small one."""
    crop = fundus_crop()
    gray = read_frame(SAMPLES / "brain_mni152_axial_z90.png")
    nuclei = read_frame(SAMPLES / "nuclei_dsb2018_b.png")
    return [crop, gray, (gray.astype(np.uint16) * 200), nuclei[:90, :70], crop[::2, ::3]]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    return build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")


@pytest.fixture(scope="module")
def repository(artifacts, tmp_path_factory) -> Path:
    """The exported python/ repository, plus two copies of its model whose configs do not match."""
    root = export(artifacts["onnx"], "triton", tmp_path_factory.mktemp("triton") / "export").artifact
    served = root.parent / "served"
    shutil.copytree(root / "python", served)
    for name, edit in (("bad_io", _wrong_mask_type), ("bad_meta", _wrong_metadata)):
        shutil.copytree(served / "tiny", served / name)
        path = served / name / "config.pbtxt"
        config = text_format.Parse(path.read_text(), pb.ModelConfig())
        config.name = name
        edit(config)
        path.write_text(text_format.MessageToString(config))
    return served


def _wrong_mask_type(config) -> None:
    next(t for t in config.output if t.name == "mask").data_type = pb.TYPE_UINT8


def _wrong_metadata(config) -> None:
    value = config.parameters["espmed"]
    value.string_value = value.string_value.replace('"modality": "brain"', '"modality": "nuclei"')


@pytest.fixture(scope="module")
def server(repository):
    with LocalTritonServer(repository) as running:
        yield running


@pytest.fixture(scope="module")
def local(artifacts):
    return load(artifacts["onnx"])


def _metrics(server: LocalTritonServer, model: str) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found = re.findall(rf'^(nv_inference_\w+)\{{model="{model}",version="1"\}} (\S+)$', text, re.M)
    return {name: float(value) for name, value in found}


def test_remote_masks_equal_local_masks(server, local):
    remote = load(f"{server.url}/tiny", modality="brain")
    assert remote.metadata.to_json() == local.metadata.to_json() and remote.takes_images
    images = _images()
    for image, pred in zip(images, remote.predict_batch(images, return_logits=True), strict=True):
        ref = local.predict(image, return_logits=True)
        assert pred.mask.shape == image.shape[:2]
        assert dice(pred.mask, ref.mask) >= 0.999
        np.testing.assert_allclose(pred.logits, ref.logits, atol=1e-4)
        np.testing.assert_allclose(pred.patch_map, ref.patch_map, atol=1e-5)
        assert pred.timings["infer"] > 0
    one = remote.predict(images[0])  # a batch of one: the same arithmetic as the local runtime
    assert np.array_equal(one.mask, local.predict(images[0]).mask)
    x = np.stack([local.preprocess(im)[0] for im in images[:3]])
    for got, want in zip(remote.run(x), local.run(x), strict=True):  # the tensor input
        np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ModalityError, match=rf"^{re.escape(server.url)}/tiny: .*'brain', not 'nuclei'"):
        load(f"{server.url}/tiny", modality="nuclei")


def test_concurrent_clients_are_all_answered_and_batched(server, local):
    images = _images()
    expected = [local.predict(im).mask for im in images]
    remote = load(f"{server.url}/tiny")  # one Segmenter shared by the threads
    before = _metrics(server, "tiny")
    scores, errors = [], []

    def client(k: int) -> None:
        try:
            for i in range(REQUESTS):
                j = (k + i) % len(images)
                scores.append(dice(remote.predict(images[j]).mask, expected[j]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(scores) == CLIENTS * REQUESTS
    assert min(scores) >= 0.999
    # The server counts a request just after it answers it: read the counters until they settle.
    deadline = time.monotonic() + 10
    while True:
        after = _metrics(server, "tiny")
        requests = after["nv_inference_count"] - before["nv_inference_count"]
        if requests >= CLIENTS * REQUESTS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert requests == CLIENTS * REQUESTS
    assert executions < requests  # batches of more than one request were formed


def test_a_killed_server_gives_one_clear_error_and_clients_recover(repository, local):
    image = _images()[0]
    expected = local.predict(image).mask
    with LocalTritonServer(repository) as server:
        remote = load(f"{server.url}/tiny")
        down, back = threading.Event(), threading.Event()
        failures: list[list[Exception]] = [[] for _ in range(4)]
        recovered: list[float] = []

        def client(k: int) -> None:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    mask = remote.predict(image).mask
                except BackendUnavailableError as exc:
                    failures[k].append(exc)
                    back.wait(timeout=120)  # a client that sees the error waits for the server, then retries
                    continue
                if failures[k]:
                    recovered.append(dice(mask, expected))
                    return
                if down.is_set():
                    time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        server.kill()
        down.set()
        deadline = time.monotonic() + 60
        while not all(failures) and time.monotonic() < deadline:
            time.sleep(0.1)
        server.start()
        back.set()
        for t in threads:
            t.join(timeout=200)
    assert [len(f) for f in failures] == [1, 1, 1, 1]
    for (exc,) in failures:
        assert str(exc).startswith(f"{server.url}/tiny: Triton server not reachable") and "\n" not in str(exc)
    assert len(recovered) == 4 and min(recovered) >= 0.999


def test_a_model_whose_config_does_not_match_its_metadata_is_refused(server):
    states = {m["name"]: m["state"] for m in server.models()}
    assert states == {"tiny": "READY", "bad_io": "READY", "bad_meta": "UNAVAILABLE"}
    with pytest.raises(ArtifactError, match="does not match its espmed metadata: image output mask is TYPE_UINT8"):
        load(f"{server.url}/bad_io")  # the server loads it; the client refuses it
    with pytest.raises(ArtifactError, match="not ready on the server .*metadata differs from the espmed metadata"):
        load(f"{server.url}/bad_meta")  # model.py refused to load it: the config says nuclei, the artifact brain
    with pytest.raises(ArtifactError, match=r"has no model 'nope' \(it has: bad_io, bad_meta, tiny\)"):
        load(f"{server.url}/nope")


def test_bench_measures_the_triton_row_through_a_local_server(artifacts, tmp_path):
    from espmed.benchmark import exports, harness
    from espmed.benchmark.options import BenchOptions

    opts = BenchOptions(
        checkpoint=artifacts["checkpoint"], modality="brain", targets="triton", runs=3, warmup=1, out=tmp_path
    )
    rows = {r["name"]: r for r in harness.run_benchmark(opts, log=lambda text: None).rows}
    triton = rows["triton"]
    assert triton["status"] == "ok", triton.get("reason")
    assert triton["runtime"]["backend"] == "triton" and triton["runtime"]["target"] == "onnx"
    assert triton["vs_fp32"]["dice_min"] >= 0.999 and triton["latency_ms"]["p50"] > 0
    assert exports._still_valid(Path(triton["artifact"]))  # the cached repositories are reused next time


def test_predict_cli_through_triton(server, local, tmp_path):
    from espmed.cli import app

    Image.fromarray(fundus_crop()).save(tmp_path / "crop.png")
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "crop.png"), "--model", f"{server.url}/tiny", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(out / "crop_mask.png")) > 0
    assert np.array_equal(mask, local.predict(fundus_crop()).mask)
