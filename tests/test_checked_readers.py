"""Every path that opens an image file refuses the hostile corpus' bombs, NaNs and truncated files.

The bench's `--data` images and masks, the exporter's `--calib` images and the training layouts
(folder, CSV, volume) all decode through `espmed.io`'s checked readers; a representative handful
of `tests/bad_inputs.py` entries goes through each path and must come back as one
`ImageReadError` line naming the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from espmed.errors import ImageReadError

from .bad_inputs import IMAGE_INPUTS, SAMPLE_PNG, BadInput

BY_NAME = {entry.name: entry for entry in IMAGE_INPUTS}
#: 2-D files every reader lists (bench, calibration and training folders).
RASTERS = [
    "truncated PNG",
    "truncated TIFF",
    "PNG bomb 100000 x 100000",
    "TIFF bomb 200000 x 200000",
    "float TIFF with NaN",
    "text file named .png",
]
#: DICOM files training reads as 2-D images (the bench and calibration folders list rasters only).
DICOMS = ["truncated DICOM (inside pixel data)", "DICOM bomb 65535 x 65535 x 1000 frames"]
VOLUMES = ["NIfTI bomb 30000 x 30000 x 2000", "float NIfTI with NaN", "truncated NIfTI (.nii.gz)"]


def build(name: str, folder: Path) -> Path:
    """The corpus entry's file, written into `folder` (image builders need no model context)."""
    entry: BadInput = BY_NAME[name]
    assert entry.kind == "image" and entry.expect == "refused"
    folder.mkdir(parents=True, exist_ok=True)
    return entry.build(folder, None).path


def refused(call, path: Path) -> str:
    with pytest.raises(ImageReadError) as info:
        call()
    message = str(info.value)
    assert path.name in message and "\n" not in message.strip()
    return message


def test_the_bench_calibration_and_training_use_the_one_reader():
    import espmed.io as io
    from espmed.benchmark import metrics, weights
    from espmed.data import reference, sources
    from espmed.export import calibration

    assert weights.read_frame is io.read_frame and metrics.read_mask is io.read_mask
    assert calibration.read_frame is io.read_frame
    assert sources.read_pixels is io.read_pixels and sources.read_mask is io.read_mask
    assert sources.read_volume is io.read_volume and reference.read_mask is io.read_mask


@pytest.mark.parametrize("name", RASTERS)
def test_bench_data_refuses(name, tmp_path):
    from espmed.benchmark.data import list_samples
    from espmed.io import read_frame, read_mask

    bad = build(name, tmp_path / "images")
    (sample,) = list_samples(tmp_path / "images")
    refused(lambda: read_frame(sample.image), bad)

    data = tmp_path / "with_masks"
    (data / "masks").mkdir(parents=True)
    shutil.copy(SAMPLE_PNG, data / bad.name)
    mask = Path(shutil.move(bad, data / "masks" / bad.name))
    (sample,) = list_samples(data)
    refused(lambda: read_mask(sample.mask), mask)


@pytest.mark.parametrize("name", RASTERS)
def test_export_calibration_refuses(name, tmp_path):
    from espmed.export.calibration import load_calibration

    shutil.copy(SAMPLE_PNG, tmp_path / "a_good.png")
    path = build(name, tmp_path)
    refused(lambda: load_calibration(tmp_path, 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), path)


def _good_pair(images: Path, masks: Path, stem: str) -> None:
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLE_PNG, images / f"{stem}.png")
    h, w = np.asarray(Image.open(SAMPLE_PNG)).shape[:2]
    Image.fromarray(np.full((h, w), 255, np.uint8)).save(masks / f"{stem}.png")


@pytest.mark.parametrize("name", RASTERS + DICOMS)
def test_training_folder_and_csv_refuse(name, tmp_path):
    from espmed.data import load_samples

    folder = {"kind": "folder", "images": "img", "masks": "msk", "modality": "ct"}
    _good_pair(tmp_path / "img", tmp_path / "msk", "a_good")
    bad_image = build(name, tmp_path / "img")
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(tmp_path / "msk" / f"{bad_image.stem}.png")
    refused(lambda: load_samples(folder, base=tmp_path), bad_image)

    _good_pair(tmp_path / "img2", tmp_path / "msk2", "b_good")
    bad_mask = build(name, tmp_path / "msk2")
    shutil.copy(SAMPLE_PNG, tmp_path / "img2" / f"{bad_mask.stem}.png")
    refused(lambda: load_samples({**folder, "images": "img2", "masks": "msk2"}, base=tmp_path), bad_mask)

    rows = ["image,mask", "img2/b_good.png,msk2/b_good.png", f"img/{bad_image.name},msk2/b_good.png"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    refused(lambda: load_samples({"kind": "csv", "path": "pairs.csv", "modality": "ct"}, base=tmp_path), bad_image)


@pytest.mark.parametrize("name", VOLUMES)
def test_training_volume_refuses(name, tmp_path):
    import nibabel as nib

    from espmed.data import load_samples

    nib.save(nib.Nifti1Image(np.ones((32, 32, 4), np.uint8), np.eye(4)), str(tmp_path / "seg.nii.gz"))
    bad = build(name, tmp_path)
    spec = {"kind": "volume", "image": bad.name, "mask": "seg.nii.gz", "modality": "mri"}
    refused(lambda: load_samples(spec, base=tmp_path), bad)
    refused(lambda: load_samples({**spec, "image": "seg.nii.gz", "mask": bad.name}, base=tmp_path), bad)


@pytest.mark.parametrize(
    ("name", "named"), [(DICOMS[0], "truncated.dcm: cannot decode"), (DICOMS[1], "series: declared frame size")]
)
def test_training_dicom_series_folder_refuses(name, named, tmp_path):
    import nibabel as nib

    from espmed.data import load_samples

    build(name, tmp_path / "series")
    nib.save(nib.Nifti1Image(np.ones((128, 128, 1), np.uint8), np.eye(4)), str(tmp_path / "seg.nii.gz"))
    spec = {"kind": "volume", "image": "series", "mask": "seg.nii.gz", "modality": "ct"}
    with pytest.raises(ImageReadError, match=named):
        load_samples(spec, base=tmp_path)


def test_training_nrrd_volume_slices(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    from espmed.data import load_samples

    vol = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5)
    lab = np.zeros((6, 7, 5), np.uint8)
    lab[1:4, 2:5, 1] = 1
    lab[2:3, 2:3, 3] = 2
    nrrd.write(str(tmp_path / "brain1_image.nrrd"), vol, {"encoding": "gzip"})
    nrrd.write(str(tmp_path / "brain1_label.nrrd"), lab, {"encoding": "gzip"})
    spec = {"kind": "volume", "image": "brain1_image.nrrd", "mask": "brain1_label.nrrd", "modality": "brain-mri"}
    samples = load_samples(spec, base=tmp_path)
    assert [s.name for s in samples] == ["brain1_image_ax2_001", "brain1_image_ax2_003"]
    assert np.array_equal(samples[0].image, np.rot90(vol[:, :, 1])) and samples[0].image.dtype == np.int16
    assert samples[0].mask.sum() == 9 and samples[1].mask.sum() == 1
