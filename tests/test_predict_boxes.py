"""Box prompts in `espmed predict`: `--box` / `--boxes FILE.json` parsing and matching, the label image
rules, MedSAM-on-Laptop `.npz` in and out, and SEGs that name what their segments are. The rules are
tested without a model; a handful of runs use the shipped checkpoint (one 1024² embedding each)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from espmed.errors import ImageReadError, PromptError, UsageError
from espmed.io import read_image, write_label_png
from espmed.io.npz import read_npz, write_npz_segs
from espmed.pipeline import (
    PredictOptions,
    check_prompts,
    collect_jobs,
    parse_box,
    prompt_boxes,
    run_job,
)
from espmed.runtimes.boxes import check_boxes, label_image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "espmed" / "assets" / "samples"
CHECKPOINT = REPO / "espmed" / "assets" / "models" / "esp-medsam-real.safetensors"
TISSUE = "85756007"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"png")  # collect_jobs goes by suffix; nothing here is decoded
    return path


# -- rules, no model --------------------------------------------------------------------------------------
def test_box_option_is_repeatable_takes_floats_and_refuses_inverted_boxes(tmp_path):
    image = touch(tmp_path / "a.png")
    jobs, _, _ = collect_jobs([image])
    boxes = prompt_boxes([image], jobs, ["1,2,30.5,40", " 5 , 6 ,7,8.25"], None)
    assert np.array_equal(boxes[image], [[1, 2, 30.5, 40], [5, 6, 7, 8.25]])
    assert parse_box("0,0,0,0") == [0, 0, 0, 0]  # a one-pixel box: x1, y1 inclusive
    with pytest.raises(PromptError, match=r"box 1 \(5, 0, 1, 4\) has x1 < x0"):
        parse_box("5,0,1,4")
    for bad in ("1,2,3", "1,2,3,4,5", "a,b,c,d", ""):
        with pytest.raises(PromptError, match="expected x0,y0,x1,y1"):
            parse_box(bad)
    with pytest.raises(PromptError, match="non-finite"):
        parse_box("nan,0,1,1")


def test_box_option_takes_one_image_file_and_never_goes_with_boxes_file_or_npz(tmp_path):
    a, b = touch(tmp_path / "in" / "a.png"), touch(tmp_path / "in" / "b.png")
    jobs, _, _ = collect_jobs([a, b])
    with pytest.raises(UsageError, match="--box takes one image file"):
        prompt_boxes([a, b], jobs, ["1,2,3,4"], None)
    folder_jobs, _, _ = collect_jobs([tmp_path / "in"])
    with pytest.raises(UsageError, match="--box takes one image file"):
        prompt_boxes([tmp_path / "in"], folder_jobs, ["1,2,3,4"], None)
    with pytest.raises(UsageError, match="cannot be used together"):
        prompt_boxes([a], jobs[:1], ["1,2,3,4"], tmp_path / "boxes.json")
    npz = touch(tmp_path / "c.npz")
    npz_jobs, _, _ = collect_jobs([npz])
    with pytest.raises(UsageError, match="carries its own boxes"):
        prompt_boxes([npz], npz_jobs, ["1,2,3,4"], None)
    assert prompt_boxes([a], jobs[:1], [], None) == {}


def test_boxes_file_keys_match_the_path_as_given_or_the_file_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = touch(Path("in/a.png")), touch(Path("in/sub/b.png"))
    jobs, _, _ = collect_jobs([Path("in")])

    def boxes_for(data) -> dict:
        Path("boxes.json").write_text(json.dumps(data))
        return prompt_boxes([Path("in")], jobs, [], Path("boxes.json"))

    got = boxes_for({"./in/a.png": [[1, 2, 3, 4]], "b.png": [[0, 0, 9.5, 9], [2, 2, 4, 4]]})
    assert np.array_equal(got[a], [[1, 2, 3, 4]]) and got[b].shape == (2, 4)
    with pytest.raises(PromptError, match=r"no input for key\(s\) 'c.png'"):
        boxes_for({"a.png": [[1, 2, 3, 4]], "b.png": [[1, 2, 3, 4]], "c.png": [[1, 2, 3, 4]]})
    with pytest.raises(PromptError, match=r"no boxes for input\(s\) in/sub/b.png"):
        boxes_for({"a.png": [[1, 2, 3, 4]]})
    with pytest.raises(PromptError, match="under two keys"):
        boxes_for({"a.png": [[1, 2, 3, 4]], "in/a.png": [[1, 2, 3, 4]], "b.png": [[1, 2, 3, 4]]})
    with pytest.raises(PromptError, match=r"in/a.png: box 1 \(3, 2, 1, 4\) has x1 < x0"):
        boxes_for({"in/a.png": [[3, 2, 1, 4]], "b.png": [[1, 2, 3, 4]]})
    for bad in ({"a.png": [1, 2, 3, 4], "b.png": [[1, 2, 3, 4]]}, {"a.png": [["1", 2, 3, 4]]}, [], {}):
        with pytest.raises(PromptError, match="expected"):
            boxes_for(bad)
    Path("boxes.json").write_text("{not json")
    with pytest.raises(PromptError, match="not valid JSON"):
        prompt_boxes([Path("in")], jobs, [], Path("boxes.json"))

    touch(Path("in/other/a.png"))
    jobs, _, _ = collect_jobs([Path("in")])
    with pytest.raises(PromptError, match="key 'a.png' names 2 inputs; key them by path"):
        boxes_for({"a.png": [[1, 2, 3, 4]], "b.png": [[1, 2, 3, 4]]})


def test_boxes_are_clipped_and_the_label_image_resolves_overlaps_by_iou_then_index(tmp_path):
    clipped = check_boxes([[-5, -1.5, 300, 20.5]], (100, 200))
    assert clipped.tolist() == [[0, 0, 199, 20.5]]  # x to the columns, y to the rows

    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2], masks[1, 1:3], masks[2, 1:] = True, True, True
    labels = label_image(masks, np.array([0.5, 0.9, 0.9], np.float32))
    assert labels.dtype == np.uint8
    assert labels[:, 0].tolist() == [1, 2, 2, 3]  # box 2 over 1 (higher IoU); 2 over 3 (tie: lower index)

    many = np.zeros((256, 2, 256), bool)
    many[np.arange(256), 0, np.arange(256)] = True
    labels = label_image(many, np.ones(256, np.float32))
    assert labels.dtype == np.uint16 and labels[0].tolist() == list(range(1, 257))
    assert label_image(many[:255], np.ones(255)).dtype == np.uint8
    write_label_png(tmp_path / "labels.png", labels)  # a 16-bit PNG, read back as written
    assert np.array_equal(np.asarray(Image.open(tmp_path / "labels.png")), labels)


def test_models_that_cannot_honour_the_prompts_are_refused_before_anything_runs(tmp_path):
    a, npz = touch(tmp_path / "a.png"), touch(tmp_path / "b.npz")
    jobs, _, _ = collect_jobs([a, npz])
    self_only = SimpleNamespace(supports_boxes=False, self_prompted=True, source=Path("m.onnx"))
    with pytest.raises(PromptError, match=r"m.onnx: this model has no box-prompted path, and .*b.npz has boxes"):
        check_prompts(self_only, jobs, {})
    check_prompts(self_only, jobs[:1], {})
    box_only = SimpleNamespace(supports_boxes=True, self_prompted=False, source=Path("enc.onnx"))
    with pytest.raises(PromptError, match=r"enc.onnx: a box-prompted model segments boxes only; give .*a.png boxes"):
        check_prompts(box_only, jobs, {})
    check_prompts(box_only, jobs, {a: np.array([[1.0, 2, 3, 4]])})


def test_npz_reader_refuses_3d_and_broken_files_and_segs_round_trip(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "case.npz", imgs=imgs, boxes=np.array([[1, 2, 30, 20]]))
    image = read_image(tmp_path / "case.npz")
    assert image.kind == "npz" and np.array_equal(image.frames[0], imgs)
    assert image.info["boxes"].tolist() == [[1, 2, 30, 20]]

    labels = np.zeros((40, 50), np.uint8)
    labels[3:9, 4:7] = 2
    write_npz_segs(tmp_path / "out.npz", labels)
    with np.load(tmp_path / "out.npz") as out:
        assert list(out.keys()) == ["segs"] and out["segs"].dtype == np.uint16
        assert np.array_equal(out["segs"], labels)

    np.savez_compressed(tmp_path / "ct3d.npz", imgs=np.zeros((4, 40, 50), np.uint8), boxes=np.ones((1, 6)))
    with pytest.raises(ImageReadError, match="ct3d.npz: a 3-D MedSAM-on-Laptop file"):
        read_npz(tmp_path / "ct3d.npz")
    np.savez(tmp_path / "noimgs.npz", segs=labels)
    with pytest.raises(ImageReadError, match="no 'imgs' array"):
        read_npz(tmp_path / "noimgs.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ImageReadError, match="bad.npz: corrupt or truncated .npz file"):
        read_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "objects.npz", imgs=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ImageReadError, match="not numeric"):
        read_npz(tmp_path / "objects.npz")


def _codes(item, attribute: str) -> tuple[str, str]:
    code = getattr(item, attribute)[0]
    return code.CodeValue, code.CodeMeaning


def test_seg_segments_name_what_they_are():
    from espmed.io.dicom_seg import Algorithm, dicom_results

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mask = np.zeros(source.pixel_array.shape, bool)
    mask[10:20, 10:30] = True
    algorithm = Algorithm("esp-medsam (espmed)", "0.1.0+c5381eac9b0c", {"modality": "microscopy"})
    expected = {"microscopy": ("84640000", "91723000"), "ct-lesion": ("108369006", "49755003"),
                "mr-lesion": ("52988006", "49755003"), "brain": ("123037004", "91723000")}
    for modality, (kind, category) in expected.items():
        (seg,), note = dicom_results([source], [source.pixel_array], [mask], modality_name=modality,
                                     algorithm=algorithm)
        segment = seg.SegmentSequence[0]
        assert note is None and len(seg.SegmentSequence) == 1
        assert _codes(segment, "SegmentedPropertyTypeCodeSequence")[0] == kind
        assert _codes(segment, "SegmentedPropertyCategoryCodeSequence")[0] == category
    assert _codes(seg.SegmentSequence[0], "SegmentedPropertyTypeCodeSequence")[1] == "Body structure"
    (seg,), _ = dicom_results([source], [source.pixel_array], [mask], modality_name="microscopy")
    assert _codes(seg.SegmentSequence[0], "SegmentedPropertyTypeCodeSequence") == ("84640000", "Cell nucleus")
    (seg,), _ = dicom_results([source], [source.pixel_array], [mask], modality_name="ct-lesion", algorithm=algorithm)
    identification = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (identification.AlgorithmName, identification.AlgorithmVersion) == (algorithm.name, algorithm.version)
    assert _codes(seg.SegmentSequence[0], "AnatomicRegionSequence") == ("39607008", "Lung")


# -- the shipped checkpoint ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    from espmed.runtimes import load

    return load(str(CHECKPOINT), threads=1)


def test_npz_in_npz_out_with_the_files_boxes(model, tmp_path):
    imgs = np.asarray(Image.open(SAMPLES / "nuclei_dsb2018_a.png").convert("RGB"))
    boxes = np.array([[10, 10, 60, 60], [100, 100, 140, 150], [40, 30, 80, 70]])
    (tmp_path / "imgs").mkdir()
    np.savez_compressed(tmp_path / "imgs" / "2DBox_nuclei.npz", imgs=imgs, boxes=boxes)
    jobs, _, _ = collect_jobs([tmp_path / "imgs"])
    out = tmp_path / "segs"
    outcome = run_job(jobs[0], model, PredictOptions(out), set())
    assert outcome.error is None and outcome.boxes == 3
    assert [p.name for p in outcome.outputs] == ["2DBox_nuclei.npz"]  # segs only, the same file name
    with np.load(out / "2DBox_nuclei.npz") as segs:
        labels = segs["segs"]
    assert labels.dtype == np.uint16 and labels.shape == imgs.shape[:2]
    expected = model.predict(imgs, boxes=boxes).label_image()
    assert np.array_equal(labels, expected) and set(np.unique(labels)) == {0, 1, 2, 3}

    same = run_job(jobs[0], model, PredictOptions(tmp_path / "imgs"), set())
    assert "would overwrite it" in same.error


def test_dicom_seg_has_one_segment_per_box_with_the_box_in_its_description(model, tmp_path):
    ct = Path(shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm"))
    jobs, _, _ = collect_jobs([ct])
    boxes = np.array([[20, 30, 60, 70.5], [50, 50, 90, 100], [0, 0, 500, 500]], np.float64)
    outcome = run_job(jobs[0], model, PredictOptions(tmp_path / "out", model_hash="m", boxes={ct: boxes}), set())
    assert outcome.error is None and outcome.boxes == 3
    seg = pydicom.dcmread(tmp_path / "out" / "ct_seg.dcm")
    segments = seg.SegmentSequence
    assert [s.SegmentLabel for s in segments] == ["box 1", "box 2", "box 3"]
    assert [s.SegmentDescription for s in segments] == [
        "box x0,y0,x1,y1 = 20,30,60,70.5", "box x0,y0,x1,y1 = 50,50,90,100", "box x0,y0,x1,y1 = 0,0,127,127"]
    assert all(_codes(s, "SegmentedPropertyTypeCodeSequence")[0] not in (TISSUE, "") for s in segments)
    assert all(_codes(s, "SegmentedPropertyCategoryCodeSequence")[0] != TISSUE for s in segments)
    algorithm = segments[0].SegmentationAlgorithmIdentificationSequence[0]
    sha = model.metadata.source_checkpoint_sha256
    assert algorithm.AlgorithmName == "esp-medsam (espmed)" and algorithm.AlgorithmVersion.endswith(sha[:12])
    table = json.loads((tmp_path / "out" / "ct_boxes.json").read_text())
    assert [b["label"] for b in table["boxes"]] == [1, 2, 3] and table["boxes"][2]["box"] == [0, 0, 127, 127]
    frames = seg.pixel_array  # one frame per segment of the one source frame, each mask whole
    assert frames.shape == (3, 128, 128)
    assert [int(f.sum()) for f in frames] == [b["pixels"] for b in table["boxes"]]

    many = run_job(jobs[0], model, PredictOptions(tmp_path / "png", fmt="png", boxes={ct: boxes}), set())
    assert [p.name for p in many.outputs] == ["ct_mask.png", "ct_boxes.json"]


def test_self_prompted_seg_uses_the_modalitys_code(model, tmp_path):
    ct = Path(shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm"))
    jobs, _, _ = collect_jobs([ct])
    outcome = run_job(jobs[0], model, PredictOptions(tmp_path, model_hash="m"), set())
    assert outcome.error is None and outcome.boxes == 0
    segment = pydicom.dcmread(tmp_path / "ct_seg.dcm").SegmentSequence[0]
    assert model.modality == "microscopy"
    assert _codes(segment, "SegmentedPropertyTypeCodeSequence") == ("84640000", "Cell nucleus")
    parameters = segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert "modality=microscopy" in parameters and "prompt=self" in parameters


def espmed(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from espmed.cli import run; run()", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_predict_box_cli_writes_a_label_image_and_the_box_table(tmp_path):
    shutil.copy(SAMPLES / "nuclei_dsb2018_a.png", tmp_path / "a.png")
    proc = espmed("predict", "a.png", "--model", CHECKPOINT, "--box", "10,10,60,60", "--box", "100,100,140,150.5",
                  "--box", "-20,200,300,400", "--out", "out", "--threads", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "boxes" in proc.stdout.splitlines()[2] and "1 segmented, 0 failed" in proc.stdout
    labels = np.asarray(Image.open(tmp_path / "out" / "a_mask.png"))
    assert labels.dtype == np.uint8 and labels.shape == (256, 256) and set(np.unique(labels)) <= {0, 1, 2, 3}
    table = json.loads((tmp_path / "out" / "a_boxes.json").read_text())
    assert table["input"] == "a.png"
    assert [b["box"] for b in table["boxes"]] == [[10, 10, 60, 60], [100, 100, 140, 150.5], [0, 200, 255, 255]]
    assert all(0 <= b["iou"] <= 1.5 and b["pixels"] > 0 for b in table["boxes"])
    assert [b["pixels"] >= np.count_nonzero(labels == b["label"]) for b in table["boxes"]] == [True] * 3

    proc = espmed("predict", "a.png", "--model", CHECKPOINT, "--box", "60,10,10,60", "--out", "bad", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "has x1 < x0" in proc.stderr and not (tmp_path / "bad").exists()
