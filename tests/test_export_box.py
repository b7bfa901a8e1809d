"""`espmed export --prompt box`: SAM's deployment pair, an image encoder artifact and its prompt decoder
beside it, exported to ONNX and OpenVINO, loaded torch-free and segmenting boxes as the torch model does.

Everything runs on the tiny preset with the box path at 256 x 256, random weights, the bundled samples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from espmed.atomic import file_sha256
from espmed.errors import ArtifactError, ExportError, PromptError
from espmed.export import export
from espmed.model import ESPMedSAM, get_preset, save_checkpoint
from espmed.runtimes import BoxPrediction, load
from espmed.runtimes.boxes import to_input_frame
from espmed.runtimes.formats import PROMPTS, decoder_file, exportable, is_decoder_file
from espmed.runtimes.loader import find_artifact
from espmed.runtimes.manifest import manifest_path
from espmed.runtimes.metadata import METADATA_KEY, SHARED_TRUNK, ArtifactMetadata

from .runtime_artifacts import dice, fundus_crop
from .test_model import _randomise

UNTRAINED_MAX_DROP = 0.05
#: Boxes on `fundus_crop()` (451 x 300): all of it, a small one, one on the edge, then more to cross a chunk.
BOXES = np.array([[0, 0, 450, 299], [40, 30, 160, 120], [300, 150, 450, 299]], np.float64)


@pytest.fixture(scope="module")
def box_ckpt(tmp_path_factory) -> Path:
    cfg = get_preset(
        "esp-medsam-tiny", box_prompts=True, modalities=("fundus", "microscopy"), controller_map=(0, 1), num_queries=3
    )
    return save_checkpoint(_randomise(ESPMedSAM(cfg), 0), tmp_path_factory.mktemp("box-ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, box_ckpt):
    """One box export per (target, modality), made on first use."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("box-exports")

    def get(target: str, modality: str | None = None):
        if (target, modality) not in cache:
            out = root / f"{target}-{modality or 'shared'}"
            cache[target, modality] = export(
                box_ckpt, target, out, prompt="box", modality=modality, max_drop=UNTRAINED_MAX_DROP
            )
        return cache[target, modality]

    return get


def _decoder_metadata(path: Path) -> ArtifactMetadata:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ArtifactMetadata.from_json(props[METADATA_KEY])


def test_the_table_names_the_graph_kinds_and_the_decoder_file():
    assert [(p.name, p.graphs, p.tag) for p in PROMPTS] == [
        ("self", ("self-prompted",), ""), ("box", ("box-encoder", "box-decoder"), "box")]
    assert {f.name for f in exportable() if "box" not in f.prompts} == {"triton"}
    assert decoder_file("a/m_shared_box_openvino.xml") == "m_shared_box_openvino.decoder.xml"
    assert is_decoder_file("m.decoder.onnx") and not is_decoder_file("m.onnx") and not is_decoder_file("decoder.onnx")


def test_the_pair_is_two_files_with_metadata_and_one_manifest(exports, box_ckpt):
    r = exports("onnx")
    encoder, decoder = r.artifact, r.artifact.with_name("tiny_shared_box_onnx.decoder.onnx")
    assert encoder.name == "tiny_shared_box_onnx.onnx" and r.files == [encoder, decoder]
    files = json.loads(manifest_path(encoder).read_text())["files"]
    assert files == {encoder.name: file_sha256(encoder), decoder.name: file_sha256(decoder)}
    assert not manifest_path(decoder).exists()  # one manifest, named after the encoder

    m = load(encoder).metadata
    assert m.to_json() == r.metadata.to_json()
    assert (m.graph, m.decoder, m.input_name, m.output_names) == ("box-encoder", decoder.name, "images", ["embedding"])
    assert (m.modality, m.modality_index, m.precision) == (SHARED_TRUNK, -1, "fp32")
    d = _decoder_metadata(decoder)
    assert (d.graph, d.decoder, d.input_name) == ("box-decoder", None, "embedding")
    assert d.output_names == ["lowres_masks", "iou"]
    assert (d.precision, d.batch, d.source_checkpoint_sha256) == ("fp32", 0, file_sha256(box_ckpt))

    graphs = {f: onnx.load(str(f)).graph for f in r.files}
    assert [i.name for i in graphs[encoder].input] == ["images"]
    assert [o.name for o in graphs[encoder].output] == ["embedding"]
    dims = [[d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in graphs[decoder].input]
    assert dims == [[1, 64, 16, 16], ["boxes", 4]]  # one embedding, N boxes dynamic

    accuracy = m.accuracy  # the gate: five boxes per held-out image, each mask through the runtime's decode
    assert accuracy["box_fractions"][0] == [0, 0, 1, 1] and "four quadrants" in accuracy["boxes"]
    assert accuracy["images"][0].endswith(" box 1") and accuracy["images"][4].endswith(" box 5")
    assert min(accuracy["dice"]) == 1.0 and accuracy["max_abs_logit"] < 1e-4 and accuracy["max_abs_iou"] < 1e-4


@pytest.mark.parametrize("target, modality", [("onnx", None), ("openvino", "fundus")])
def test_embed_once_then_decode_matches_the_torch_box_path(exports, box_ckpt, target, modality):
    r = exports(target, modality)
    seg = load(r.artifact, threads=1)
    reference = load(box_ckpt, modality=modality)  # the torch reference: that controller, or the shared trunk
    assert seg.supports_boxes and not seg.self_prompted and seg.modality == (modality or SHARED_TRUNK)
    image = fundus_crop()
    embedding = seg.embed(image)
    assert embedding.embedding.shape == (1, 64, 16, 16) and set(embedding.timings) == {"preprocess", "encoder"}
    ref_embedding = reference.embed(image)
    assert np.abs(embedding.embedding - ref_embedding.embedding).max() < 1e-4
    for n in (1, 3):
        pred = seg.decode(embedding, BOXES[:n], return_logits=True)
        ref = reference.decode(ref_embedding, BOXES[:n], return_logits=True)
        assert isinstance(pred, BoxPrediction) and pred.masks.shape == (n, 300, 451) and pred.iou.shape == (n,)
        assert 0 < pred.masks[0].sum() < pred.masks[0].size  # a real mask
        assert all(dice(a, b) == 1.0 for a, b in zip(pred.masks, ref.masks, strict=True))
        assert np.abs(pred.logits - ref.logits).max() < 1e-3 and np.abs(pred.iou - ref.iou).max() < 1e-4
    again = seg.predict(image, boxes=BOXES)  # embed + decode in one call
    assert np.array_equal(again.masks, seg.decode(embedding, BOXES).masks)


@pytest.mark.parametrize("target, modality", [("onnx", None), ("openvino", "fundus")])
def test_the_decoder_takes_any_number_of_boxes(exports, target, modality):
    seg = load(exports(target, modality).artifact)
    embedding = seg.embed(fundus_crop())
    frame = to_input_frame(np.tile(BOXES, (6, 1))[:16], embedding.letterbox)
    for n in (1, 2, 16):  # one graph call each
        lowres, iou = seg._decode(embedding.embedding, frame[:n])
        assert lowres.shape == (n, 1, 64, 64) and iou.shape == (n, 1)
        np.testing.assert_allclose(lowres, np.concatenate([seg._decode(embedding.embedding, frame[i : i + 1])[0]
                                                           for i in range(n)]), atol=1e-4)
    assert seg._decode(embedding.embedding, np.repeat(frame[:1], 1100, axis=0))[0].shape == (1100, 1, 64, 64)
    many = seg.decode(embedding, np.tile(BOXES, (6, 1)))  # 18 boxes: two decoder calls
    assert many.masks.shape == (18, 300, 451) and np.array_equal(many.masks[15:], many.masks[:3])


def test_a_box_artifact_segments_boxes_only(exports):
    seg = load(exports("onnx").artifact)
    with pytest.raises(PromptError, match="segments boxes only: give boxes") as exc:
        seg.predict(fundus_crop())
    assert "\n" not in str(exc.value)


def test_a_folder_holding_the_pair_loads_the_encoder(exports, tmp_path):
    r = exports("openvino", "fundus")
    assert find_artifact(r.artifact.parent) == r.artifact  # the decoder beside it is not a second artifact
    assert load(r.artifact.parent).source == r.artifact
    with pytest.raises(ArtifactError, match="a prompt decoder runs beside its box encoder; load the encoder"):
        load(r.artifact.with_name(r.metadata.decoder), verify=False)


def test_a_tampered_missing_or_foreign_decoder_is_refused(exports, tmp_path):
    r = exports("onnx")
    folder = tmp_path / "pair"
    shutil.copytree(r.artifact.parent, folder)
    encoder, decoder = folder / r.artifact.name, folder / r.metadata.decoder
    original = decoder.read_bytes()
    decoder.write_bytes(original[:-8] + bytes(8))
    with pytest.raises(ArtifactError, match=f"{decoder.name}: SHA-256 .* does not match") as exc:
        load(encoder)
    assert "\n" not in str(exc.value)

    decoder.unlink()
    with pytest.raises(ArtifactError, match="listed in .* but missing"):
        load(encoder)
    with pytest.raises(ArtifactError, match=f"its prompt decoder {decoder.name} is missing beside it"):
        load(encoder, verify=False)

    shutil.copy(exports("onnx-int8").artifact.with_name(exports("onnx-int8").metadata.decoder), decoder)
    with pytest.raises(ArtifactError, match=r"not the prompt decoder of this box encoder \(target differs\)"):
        load(encoder, verify=False)


def test_int8_quantizes_the_encoder_and_keeps_the_decoder_float(exports, box_ckpt):
    r = exports("onnx-int8")
    m = r.metadata
    assert (m.precision, m.graph) == ("int8", "box-encoder") and m.calibration["images"]
    assert any(n.startswith("box_patch_embed") for n in m.float_layers)  # its first conv, as the self graph's
    assert min(m.accuracy["dice"]) >= 1 - UNTRAINED_MAX_DROP and m.accuracy["gate"]["chosen"]
    encoder_ops = {n.op_type for n in onnx.load(str(r.artifact)).graph.node}
    decoder = r.artifact.with_name(m.decoder)
    assert "QuantizeLinear" in encoder_ops
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(str(decoder)).graph.node}
    assert _decoder_metadata(decoder).precision == "fp32"
    image = fundus_crop()
    pred = load(r.artifact).predict(image, boxes=BOXES)
    ref = load(box_ckpt).predict(image, boxes=BOXES)
    assert min(dice(a, b) for a, b in zip(pred.masks, ref.masks, strict=True)) >= 0.9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "triton"}, "target triton exports --prompt self only, not box"),
        ({"target": "onnx", "prompt": "points"}, "unknown prompt 'points'; choose from self, box"),
        ({"target": "onnx", "batch": 2}, "a box encoder embeds one image per call"),
        ({"target": "openvino-int8", "accuracy_control": True}, "accuracy_control validates self-prompted masks only"),
        ({"target": "onnx", "out": "m.decoder.onnx"}, r"\*\.decoder\.onnx names a prompt decoder"),
        ({"target": "onnx", "modality": "xray"}, "unknown modality 'xray'"),
    ],
)
def test_bad_box_requests_are_refused_with_one_line(box_ckpt, tmp_path, kwargs, message):
    kwargs = {"prompt": "box", **kwargs}
    out = kwargs.pop("out", None)
    with pytest.raises(ExportError, match=message) as exc:
        export(box_ckpt, out=tmp_path / out if out else tmp_path, **kwargs)
    assert "\n" not in str(exc.value) and not list(tmp_path.iterdir())


def test_triton_does_not_wrap_a_box_encoder(exports, tmp_path):
    with pytest.raises(ExportError, match="a box-encoder artifact; Triton serves self-prompted ones only"):
        export(exports("onnx").artifact, "triton", tmp_path / "triton")
    assert not (tmp_path / "triton").exists()


def test_a_checkpoint_without_the_box_path_is_refused(tmp_path):
    cfg = get_preset("esp-medsam-tiny", modalities=("fundus",), controller_map=(0,), num_queries=3)
    ckpt = save_checkpoint(ESPMedSAM(cfg), tmp_path / "plain.safetensors")
    with pytest.raises(ExportError, match="no box-prompted path; export it with --prompt self"):
        export(ckpt, "onnx", tmp_path / "out", prompt="box")
    assert not (tmp_path / "out").exists()
