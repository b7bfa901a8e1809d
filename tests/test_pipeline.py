"""The one segmentation pipeline (`espmed.pipeline`) under predict and serve: one DICOM volume rule,
frames streamed in chunks, and the same outputs from both commands for the same instances."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from espmed.io.dicom import DicomSeries, dicom_volumes
from espmed.pipeline import model_hash, segment_frames, segment_series

from .serve_node import Node, send, series, wait_for


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from .runtime_artifacts import build_artifacts

    return build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")["onnx"]


def two_size_series(folder: Path) -> list:
    """One series of CT_small slices: three at 128 x 128 and two at 64 x 64 (every other pixel,
    twice the spacing), as a scout or a reformat inside one series gives; saved to `folder`."""
    instances = series(5)
    for ds in instances[3:]:
        small = copy.deepcopy(ds)
        pixels = ds.pixel_array[::2, ::2]
        small.Rows, small.Columns = pixels.shape
        small.PixelSpacing = [2 * float(v) for v in ds.PixelSpacing]
        small.PixelData = np.ascontiguousarray(pixels).tobytes()
        instances[instances.index(ds)] = small
    folder.mkdir(parents=True)
    for i, ds in enumerate(instances):
        ds.save_as(folder / f"im{i}.dcm", enforce_file_format=True)
    return instances


def test_volumes_follow_one_rule_and_stream_in_chunks(model, tmp_path):
    from espmed.runtimes import load

    two_size_series(tmp_path / "s")
    paths = sorted((tmp_path / "s").iterdir())
    volumes = dicom_volumes(paths)
    assert [len(v) for v in volumes] == [3, 2] and volumes[0] == paths[:3]

    volume = DicomSeries(volumes[0])
    assert all("PixelData" not in ds for ds in volume.source)  # headers only: nothing decoded yet
    seg = load(str(model), threads=1)
    calls: list[int] = []
    batch = seg.predict_batch
    seg.predict_batch = lambda frames: calls.append(len(frames)) or batch(frames)
    masks, _ = segment_frames(seg, volume, chunk=2)
    assert calls == [2, 1] and len(masks) == 3 and masks[0].shape == (128, 128)
    whole = [p.mask for p in batch(volume.read().frames)]
    assert all(np.array_equal(a, b) for a, b in zip(masks, whole, strict=True))  # chunking changes nothing

    result = segment_series(seg, paths, model_hash=model_hash(model))
    assert result.result == "ok" and result.frames == 5 and len(result.outputs) == 2


def test_a_series_with_two_slice_sizes_gives_the_same_segs_in_predict_and_serve(model, tmp_path):
    instances = two_size_series(tmp_path / "series")
    out = tmp_path / "predicted"
    proc = subprocess.run(
        [sys.executable, "-c", "from espmed.cli import run; run()", "predict", str(tmp_path / "series"),
         "--model", str(model), "--out", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "1 segmented, 0 failed" in proc.stdout
    predicted = {p.name: pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))}
    assert sorted(predicted) == ["series_v1_seg.dcm", "series_v2_seg.dcm"]

    node = Node(model, tmp_path / "spool", "--series-timeout", "1").start()
    try:
        assert send(instances, node.port) == [0] * 5
        results = tmp_path / "spool" / "results" / str(instances[0].SeriesInstanceUID)
        served = wait_for(lambda: len(list(results.glob("*.dcm"))) == 2 and list(results.glob("*.dcm")), 120,
                          "two SEGs kept by the node")
    finally:
        node.stop()
    served = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, served)}

    for name, ds in predicted.items():
        other = served[str(ds.SOPInstanceUID)]  # the same derived UIDs
        for keyword in ("SeriesInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"):
            assert ds.get(keyword) == other.get(keyword), (name, keyword)
        refs = [[str(r.ReferencedSOPInstanceUID) for r in s.ReferencedInstanceSequence]
                for s in ds.ReferencedSeriesSequence]
        assert refs == [[str(r.ReferencedSOPInstanceUID) for r in s.ReferencedInstanceSequence]
                        for s in other.ReferencedSeriesSequence]
        assert ds.PixelData == other.PixelData, name  # the same masks
    sizes = sorted((int(ds.Rows), int(ds.NumberOfFrames)) for ds in predicted.values())
    assert sizes == [(64, 2), (128, 3)]
