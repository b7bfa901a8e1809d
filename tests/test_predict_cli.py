"""`espmed predict` end to end, as a user runs it (a subprocess through the console entry point)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .runtime_artifacts import build_artifacts
from .test_io import make_ct_series

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "espmed" / "assets" / "samples"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    return build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")


def espmed(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from espmed.cli import run; run()", *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )


def test_predict_pngs_dicom_series_and_nifti_with_a_bad_file(artifacts, tmp_path):
    import highdicom as hd
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for name in ("nuclei_dsb2018_a.png", "fundus_retina.png"):
        shutil.copy(SAMPLES / name, pngs / name)
    (pngs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    ct = Path(shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "CT_small.dcm"))
    series = make_ct_series(tmp_path / "ct_series")
    mni = tmp_path / "mni152.nii.gz"
    nib.save(load_mni152_template(resolution=2), str(mni))
    out = tmp_path / "out"

    proc = espmed(
        "predict", pngs, ct, tmp_path / "ct_series", mni,
        "--model", artifacts["onnx"], "--out", out, "--overlay",
    )
    assert proc.returncode == 1, proc.stderr  # one bad file
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "broken.png" in proc.stdout and "5 segmented, 1 failed" in proc.stdout

    for name in ("nuclei_dsb2018_a", "fundus_retina"):
        source = np.asarray(Image.open(pngs / f"{name}.png"))
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        assert mask.shape == source.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(out / f"{name}_overlay.png")).shape == source.shape[:2] + (3,)

    seg = hd.seg.segread(out / "CT_small_seg.dcm")
    refs = [r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence]
    assert refs == [pydicom.dcmread(ct).SOPInstanceUID]
    series_seg = hd.seg.segread(out / "ct_series_seg.dcm")
    refs = {
        r.ReferencedSOPInstanceUID
        for s in series_seg.ReferencedSeriesSequence
        for r in s.ReferencedInstanceSequence
    }
    assert refs == {pydicom.dcmread(p).SOPInstanceUID for p in series}

    source = nib.load(str(mni))
    mask = nib.load(str(out / "mni152_mask.nii.gz"))
    assert mask.shape == source.shape
    assert np.array_equal(mask.affine, source.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_predict_checkpoint_runs_its_default_modality_or_the_one_named_png_per_frame(artifacts, tmp_path):
    multi = get_testdata_file("SC_rgb_rle_2frame.dcm")  # 2 frames
    proc = espmed("predict", multi, "--model", artifacts["checkpoint"], "--format", "png", "--out", tmp_path / "d",
                  "--threads", "1")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "modality brain" in proc.stderr  # the first of its controllers in query order

    proc = espmed("predict", multi, "--model", artifacts["checkpoint"], "--modality", "nuclei",
                  "--format", "png", "--out", tmp_path, "--threads", "1")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert len(list(tmp_path.glob("SC_rgb_rle_2frame_*_mask.png"))) == 2
    assert "1 segmented, 0 failed" in proc.stdout


def test_predict_errors_are_one_line_and_non_zero(artifacts, tmp_path):
    proc = espmed("predict", SAMPLES / "ct_small.png", "--model", tmp_path / "missing.onnx", "--out", tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'missing.onnx'}: no such artifact file"

    proc = espmed(
        "predict", SAMPLES / "ct_small.png", "--model", artifacts["onnx"], "--out", tmp_path, "--format", "nifti"
    )
    assert proc.returncode == 1
    assert "--format nifti needs a NIfTI input" in proc.stdout
    assert not list(tmp_path.glob("*.nii*"))

    proc = espmed("predict", tmp_path / "nothing-here", "--model", artifacts["onnx"], "--out", tmp_path / "o")
    assert proc.returncode == 1 and "no such file or folder" in proc.stdout


def test_predict_runs_without_torch(artifacts, tmp_path):
    """A device installs no torch: the CLI (all its commands registered) must still predict."""
    from .test_runtime import TORCH_BLOCKER

    script = TORCH_BLOCKER + "from espmed.cli import run; run()"
    proc = subprocess.run(
        [sys.executable, "-c", script,
         "predict", str(SAMPLES / "ct_small.png"), "--model", str(artifacts["onnx"]), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ct_small_mask.png").is_file()
