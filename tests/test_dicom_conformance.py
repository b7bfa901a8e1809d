"""DICOM-in conformance for `predict` and `serve`: every standard transfer syntax decodes (pydicom's
own sample files, checked against their uncompressed twins or known pixel values), non-image SOP
classes are refused naming the class, data sets without a preamble are read and found by content,
and a segmented image always yields an output (a Secondary Capture overlay where no SEG fits)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from espmed.errors import ImageReadError
from espmed.io import read_image
from espmed.io.dicom import check_image_instance, is_dicom_file, is_image_storage, read_dataset, stored_pixels

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage  # noqa: E402

#: The colour bars of pydicom's SC_rgb family, sampled at column 50 of rows 5, 15, ..., 95.
COLOUR_BARS = [(255, 0, 0), (255, 128, 128), (0, 255, 0), (128, 255, 128), (0, 0, 255), (128, 128, 255),
               (0, 0, 0), (64, 64, 64), (192, 192, 192), (255, 255, 255)]


def stored(name: str) -> np.ndarray:
    path = Path(get_testdata_file(name))
    return stored_pixels(read_dataset(path), path)


def _bars(name: str, tolerance: int) -> None:
    pixels = stored(name).astype(int)
    got = [tuple(pixels[row, 50]) for row in range(5, 100, 10)]
    assert np.abs(np.asarray(got) - np.asarray(COLOUR_BARS)).max() <= tolerance, got


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_implicit.dcm", "Implicit VR Little Endian"),
        ("MR_small_bigendian.dcm", "Explicit VR Big Endian"),
        ("MR_small_RLE.dcm", "RLE Lossless"),
        ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless Image Compression"),
        ("MR_small_jp2klossless.dcm", "JPEG 2000 Image Compression (Lossless Only)"),
    ],
)
def test_lossless_syntaxes_decode_to_the_uncompressed_twin(name, syntax):
    assert read_dataset(get_testdata_file(name)).file_meta.TransferSyntaxUID.name == syntax
    assert np.array_equal(stored(name), stored("MR_small.dcm"))


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [
        ("SC_rgb_jpeg_gdcm.dcm", 0),  # JPEG Lossless, process 14 SV1
        ("SC_rgb_dcmtk_+eb+cr.dcm", 3),  # JPEG Baseline
        ("SC_rgb_gdcm_KY.dcm", 3),  # JPEG 2000 (lossy)
        ("SC_rgb_jls_lossy_line.dcm", 3),  # JPEG-LS near-lossless
    ],
)
def test_colour_syntaxes_decode_the_colour_bars(name, tolerance):
    _bars(name, tolerance)


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-lossy.dcm"])
def test_jpeg_extended_12_bit_decodes(name):
    """The 12-bit JPEG Extended case pydicom's own GDCM plugin refuses (espmed's GDCM plugin);
    JPEG-lossy.dcm is the variant with an invalid scan-stop value. Values: pydicom's reference."""
    pixels = stored(name)
    assert pixels.shape == (1024, 256) and pixels[420, 140] == 244 and pixels[230, 120] == 95


def test_deflated_little_endian_decodes():
    pixels = stored("image_dfl.dcm")
    assert pixels[10].min() == 41 and pixels[10].max() == 255
    assert tuple(pixels[300, 255:263]) == (138, 65, 65, 65, 65, 35, 35, 35)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("liver_1frame.dcm", "Segmentation Storage is not an image"),
        ("rtdose.dcm", "RT Dose Storage is not an image"),
        ("rtstruct.dcm", "RT Structure Set Storage has no pixel data"),
        ("rtplan.dcm", "RT Plan Storage has no pixel data"),
        ("ExplVR_BigEndNoMeta.dcm", "RT Ion Plan Storage has no pixel data"),  # no preamble either
        ("reportsi.dcm", "Basic Text SR Storage has no pixel data"),
        ("test-SR.dcm", "Comprehensive SR Storage has no pixel data"),
        ("waveform_ecg.dcm", "12-lead ECG Waveform Storage has no pixel data"),
    ],
)
def test_non_image_sop_classes_are_refused_naming_the_class(name, message):
    path = get_testdata_file(name)
    with pytest.raises(ImageReadError, match=message):
        read_image(path)
    assert not is_image_storage(read_dataset(path).SOPClassUID)


def test_image_class_without_pixels_and_unreadable_files(tmp_path):
    ds = read_dataset(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    with pytest.raises(ImageReadError, match="CT Image Storage has no pixel data"):
        check_image_instance(ds, tmp_path / "ct.dcm")
    with pytest.raises(ImageReadError, match="no_meta.dcm: not a DICOM file"):
        read_image(get_testdata_file("no_meta.dcm"))
    assert is_image_storage("1.2.840.10008.5.1.4.1.1.2") and is_image_storage("1.2.840.10008.5.1.4.1.1.6.2")
    assert not is_image_storage("1.2.840.10008.5.1.4.1.1.501.1")  # DICOS CT (security screening)


def bare_dataset(source: str, dest: Path) -> Path:
    """`source` written as a bare data set: no preamble, no file meta (as old writers leave it)."""
    ds = pydicom.dcmread(get_testdata_file(source))
    del ds.file_meta
    ds.preamble = None
    ds.save_as(dest, implicit_vr=True, little_endian=True)
    assert dest.read_bytes()[128:132] != b"DICM"
    return dest


def test_files_without_preamble_are_read_and_found_by_content(tmp_path):
    path = bare_dataset("MR_small.dcm", tmp_path / "IM0001")  # no suffix, as PACS exports name them
    assert is_dicom_file(path)
    assert np.array_equal(read_image(path).frames[0], read_image(get_testdata_file("MR_small.dcm")).frames[0])
    assert not is_dicom_file(Path(get_testdata_file("no_meta.dcm")))


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    from .runtime_artifacts import build_artifacts

    return build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")["onnx"]


def test_predict_on_pydicom_files_segments_images_and_refuses_the_rest(onnx_model, tmp_path):
    """The issue's user run: compressed images segment, a SEG-less source gets Secondary Capture
    overlays with one warning line, non-images are refused naming their class."""
    import highdicom as hd

    inputs = tmp_path / "in"
    inputs.mkdir()
    images = ["JPEG-lossy.dcm", "examples_ybr_color.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jp2klossless.dcm"]
    refused = ["liver_1frame.dcm", "rtdose.dcm", "rtstruct.dcm", "ExplVR_BigEndNoMeta.dcm", "no_meta.dcm"]
    for name in images + refused:
        shutil.copy(get_testdata_file(name), inputs / name)
    bare_dataset("CT_small.dcm", inputs / "CT0001")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", "from espmed.cli import run; run()", "predict", str(inputs), "--model", str(onnx_model),
         "--out", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in text, text[-3000:]
    assert f"{len(images) + 1} segmented, {len(refused)} failed" in text, text[-3000:]
    for message in ("Segmentation Storage is not an image", "RT Dose Storage is not an image",
                    "RT Structure Set Storage has no pixel data", "RT Ion Plan Storage has no pixel data",
                    "no_meta.dcm: not a DICOM file"):
        assert message in " ".join(text.split()), message
    warnings = [line for line in text.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "examples_ybr_color" in warnings[0] and "Secondary Capture" in warnings[0]
    captures = sorted(out.glob("examples_ybr_color_*_overlay_sc.dcm"))
    source = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm"))
    assert len(captures) == int(source.NumberOfFrames) == 30
    first = pydicom.dcmread(captures[0])
    assert first.SOPClassUID == SecondaryCaptureImageStorage and first.pixel_array.shape == (240, 320, 3)
    assert first.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    for name in ("JPEG-lossy", "SC_rgb_jpeg_gdcm", "MR_small_jp2klossless", "CT0001"):
        seg = pydicom.dcmread(out / f"{name}_seg.dcm")  # highdicom's reader wants a slice thickness SCs lack
        source = pydicom.dcmread(inputs / (name if name == "CT0001" else f"{name}.dcm"), force=True)
        assert seg.SOPClassUID == SegmentationStorage
        refs = [r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence]
        assert refs == [source.SOPInstanceUID]
    assert hd.seg.segread(out / "CT0001_seg.dcm").SeriesInstanceUID != source.SeriesInstanceUID
