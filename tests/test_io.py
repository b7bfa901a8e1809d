"""espmed.io: real rasters, DICOM (pydicom's bundled files) and NIfTI (nilearn's MNI152) in;
mask/overlay PNG, NIfTI and DICOM SEG out; stored values (training), `.npy` and NRRD; and the
refusals with one clear error."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from espmed.errors import ImageReadError
from espmed.io import (
    MAX_FRAME_PIXELS,
    read_dicom_series,
    read_frame,
    read_image,
    read_mask,
    read_pixels,
    read_volume,
    write_dicom_seg,
    write_mask_png,
    write_nifti_mask,
    write_overlay_png,
)
from espmed.io.dicom import group_series, read_dataset
from espmed.io.writers import OVERLAY_COLOR, mask_contour

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import MultiFrameGrayscaleWordSecondaryCaptureImageStorage, SegmentationStorage  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "espmed" / "assets" / "samples"


# -- rasters ---------------------------------------------------------------------------------------
def test_png_jpeg_bmp_tiff_8_and_16_bit(tmp_path):
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65535, (40, 60), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    got = read_image(tmp_path / "g16.png")
    assert got.kind == "raster" and got.frames[0].dtype == np.uint16
    assert np.array_equal(got.frames[0], gray16)

    rgba = rng.integers(0, 255, (30, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png").frames[0], rgba)

    rgb = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    assert np.array_equal(read_image(tmp_path / "rgb.bmp").frames[0], rgb)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
    assert read_image(tmp_path / "rgb.jpg").frames[0].shape == (30, 50, 3)

    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "palette.png")
    assert read_image(tmp_path / "palette.png").frames[0].shape == (30, 50, 3)

    import tifffile

    tifffile.imwrite(tmp_path / "g16.tif", gray16)
    assert np.array_equal(read_image(tmp_path / "g16.tif").frames[0], gray16)
    stack = rng.integers(0, 4000, (5, 32, 48), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tiff", stack)
    frames = read_image(tmp_path / "stack.tiff").frames
    assert len(frames) == 5 and np.array_equal(frames[3], stack[3])
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "rgb.tif").frames[0], rgb)


def test_bundled_samples_read(tmp_path):
    for png in sorted(SAMPLES.glob("*.png")):
        image = read_image(png)
        assert image.frames[0].ndim in (2, 3) and image.name == png.stem


def _png_with_declared_size(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_refuses_bombs_corrupt_empty_and_non_finite_images(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_declared_size(60000, 60000))
    with pytest.raises(ImageReadError, match="bomb.png"):
        read_image(bomb)
    side = int(MAX_FRAME_PIXELS**0.5) + 16
    (tmp_path / "big.png").write_bytes(_png_with_declared_size(side, side))
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(tmp_path / "big.png")

    good = tmp_path / "good.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_image(truncated)

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file"):
        read_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageReadError, match="not a readable image"):
        read_image(tmp_path / "text.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")

    import tifffile

    nan = np.ones((16, 16), np.float32)
    nan[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    with pytest.raises(ImageReadError, match="NaN or Inf"):
        read_image(tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((1, 16), np.uint8))
    with pytest.raises(ImageReadError, match="one.tif: image too small"):
        read_image(tmp_path / "one.tif")
    tifffile.imwrite(tmp_path / "zero.tif", np.zeros((0, 16), np.uint8))
    with pytest.raises(ImageReadError, match="zero.tif"):
        read_image(tmp_path / "zero.tif")


# -- DICOM -----------------------------------------------------------------------------------------
def _hu_window(ds, center: float, width: float) -> np.ndarray:
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.clip(np.rint(((hu - (center - 0.5)) / (width - 1) + 0.5) * 255), 0, 255).astype(np.uint8)


def test_dicom_ct_rescale_and_default_window():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds  # so the CT default (L40 / W400) applies
    image = read_image(path)
    assert image.kind == "dicom" and len(image.frames) == 1
    assert np.array_equal(image.frames[0], _hu_window(ds, 40, 400))


def test_dicom_window_from_file_and_monochrome1_inversion(tmp_path):
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    mr = read_image(path).frames[0]
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    stored = ds.pixel_array.astype(np.float64)
    expected = np.clip(np.rint(((stored - (center - 0.5)) / (width - 1) + 0.5) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(mr, expected)

    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    assert np.array_equal(read_image(tmp_path / "mono1.dcm").frames[0], 255 - mr)

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.RescaleSlope, ct.RescaleIntercept = 2, -2048
    ct.save_as(tmp_path / "slope.dcm")
    assert np.array_equal(read_image(tmp_path / "slope.dcm").frames[0], _hu_window(ct, 40, 400))


def test_dicom_multiframe_and_colour(tmp_path):
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    pixels = mr.pixel_array
    mr.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    mr.NumberOfFrames = 3
    mr.PixelData = np.concatenate([pixels, pixels[::-1], pixels.T]).tobytes()
    mr.save_as(tmp_path / "multi.dcm")
    multi = read_image(tmp_path / "multi.dcm")
    assert len(multi.frames) == 3 and multi.frames[0].shape == (64, 64)
    assert np.array_equal(multi.frames[1], multi.frames[0][::-1])
    rgb = read_image(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert len(rgb.frames) == 2 and rgb.frames[0].shape == (100, 100, 3) and rgb.frames[0].dtype == np.uint8
    assert not np.array_equal(rgb.frames[0], rgb.frames[1])


def test_dicom_refusals(tmp_path):
    with pytest.raises(ImageReadError, match="MR_truncated.dcm: cannot decode DICOM pixel data"):
        read_image(get_testdata_file("MR_truncated.dcm"))
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(ImageReadError, match="fake.dcm: not a DICOM file"):
        read_image(tmp_path / "fake.dcm")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 60000  # declared far beyond the pixel data: refused before decoding
    ds.save_as(tmp_path / "bomb.dcm")
    with pytest.raises(ImageReadError, match="bomb.dcm: declared frame size"):
        read_image(tmp_path / "bomb.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(tmp_path / "nopixels.dcm")


def make_ct_series(folder: Path, n: int = 3) -> list[Path]:
    """n copies of pydicom's CT_small as one series (new instance UIDs, slices 5 mm apart),
    written in reverse slice order so that sorting is exercised."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid()
    paths = []
    for i in range(n):
        ds = base.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        x, y, z = (float(v) for v in base.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        ds.PixelData = np.ascontiguousarray(np.roll(base.pixel_array, 7 * i, axis=1)).tobytes()
        path = folder / f"slice_{n - i:02d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_dicom_series_is_grouped_and_sorted(tmp_path):
    paths = make_ct_series(tmp_path / "series")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "series" / "other.dcm")
    series = group_series(sorted((tmp_path / "series").iterdir()))
    assert sorted(map(len, series.values())) == [1, 3]  # the MR instance and the CT series
    ct_paths = next(p for p in series.values() if len(p) == 3)
    image = read_dicom_series(ct_paths)
    assert [int(ds.InstanceNumber) for ds in image.source] == [1, 2, 3]
    assert [str(ds.SOPInstanceUID) for ds in image.source] == [str(read_dataset(p).SOPInstanceUID) for p in paths]
    assert len(image.frames) == 3 and not np.array_equal(image.frames[0], image.frames[1])


def test_series_and_volume_readers_share_one_slice_order(tmp_path):
    """A sagittal series (z constant; normal -x) whose file names and InstanceNumbers both run against
    its positions: the series reader and the volume-folder reader both stack it along the normal."""
    paths = make_ct_series(tmp_path / "sagittal")
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        ds.ImagePositionPatient = [-5.0 * i, 0.0, 10.0]
        ds.InstanceNumber = 3 - i
        ds.save_as(path)
    series = read_dicom_series(sorted(paths))
    assert [int(ds.InstanceNumber) for ds in series.source] == [3, 2, 1]  # -x = 0, 5, 10
    volume = read_volume(tmp_path / "sagittal")
    expected = [pydicom.dcmread(p).pixel_array.T for p in paths]
    np.testing.assert_array_equal(volume, np.stack(expected, axis=-1))


def test_dicom_seg_reads_back_and_references_the_sources(tmp_path):
    import highdicom as hd

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mask = np.zeros((128, 128), bool)
    mask[30:70, 40:90] = True
    with pytest.deprecated_call(match="write_dicom_seg is deprecated"):  # public API kept for users
        out = write_dicom_seg(tmp_path / "ct_seg.dcm", [source], [mask], modality_name="ct")
    seg = hd.seg.segread(out)
    assert seg.SOPClassUID == SegmentationStorage
    referenced = [
        ref.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence
        for ref in item.ReferencedInstanceSequence
    ]
    assert referenced == [source.SOPInstanceUID]
    assert str(seg.StudyInstanceUID) == str(source.StudyInstanceUID)
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=[str(source.SOPInstanceUID)], segment_numbers=[1])
    assert np.array_equal(got[0, :, :, 0].astype(bool), mask)

    series = read_dicom_series(make_ct_series(tmp_path / "series"))
    masks = [mask, ~mask, np.zeros_like(mask)]
    with pytest.deprecated_call():
        seg3 = hd.seg.segread(write_dicom_seg(tmp_path / "series_seg.dcm", series.source, masks))
    uids = {str(ds.SOPInstanceUID) for ds in series.source}
    assert {
        ref.ReferencedSOPInstanceUID
        for item in seg3.ReferencedSeriesSequence
        for ref in item.ReferencedInstanceSequence
    } == uids
    for ds, expected in zip(series.source, masks, strict=True):
        got = seg3.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID)], segment_numbers=[1]
        )[0, :, :, 0]
        assert np.array_equal(got.astype(bool), expected)


# -- NIfTI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mni_path(tmp_path_factory) -> Path:
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    import nibabel as nib

    path = tmp_path_factory.mktemp("nifti") / "mni152.nii.gz"
    nib.save(nilearn_datasets.load_mni152_template(resolution=2), str(path))
    return path


def test_nifti_volume_slices_and_mask_keeps_affine_and_header(mni_path, tmp_path):
    import nibabel as nib

    source = nib.load(str(mni_path))
    image = read_image(mni_path)
    assert image.kind == "nifti" and image.name == "mni152"
    assert len(image.frames) == source.shape[2] and image.frames[0].shape == source.shape[:2]
    sagittal = read_image(mni_path, axis=0)
    assert len(sagittal.frames) == source.shape[0] and sagittal.frames[0].shape == source.shape[1:]

    masks = [frame > 128 for frame in image.frames]
    out = write_nifti_mask(tmp_path / "mask.nii.gz", image, masks)
    written = nib.load(str(out))
    assert written.shape == source.shape
    assert np.array_equal(written.affine, source.affine)
    assert np.array_equal(written.header.get_zooms(), source.header.get_zooms())
    assert written.header.get_data_dtype() == np.uint8
    data = np.asarray(written.dataobj)
    assert np.array_equal(data[:, :, 40], masks[40].astype(np.uint8))


def test_nifti_refusals(tmp_path):
    import nibabel as nib

    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), affine), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(ImageReadError, match="4d.nii.gz: expected a 2-D or 3-D volume"):
        read_image(tmp_path / "4d.nii.gz")
    vol = np.ones((8, 8, 4), np.float32)
    vol[1, 2, 3] = np.inf
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "inf.nii"))
    with pytest.raises(ImageReadError, match="NaN or Inf"):
        read_image(tmp_path / "inf.nii")
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b" + b"junk" * 20)
    with pytest.raises(ImageReadError, match="junk.nii.gz"):
        read_image(tmp_path / "junk.nii.gz")
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 100))
    header.set_data_dtype(np.float32)
    (tmp_path / "bomb.nii").write_bytes(bytes(header.binaryblock) + bytes(4 + 4096))
    with pytest.raises(ImageReadError, match="bomb.nii: declared frame size"):
        read_image(tmp_path / "bomb.nii")
    good = tmp_path / "good.nii"
    nib.save(nib.Nifti1Image(np.ones((32, 32, 16), np.float32), affine), str(good))
    (tmp_path / "short.nii").write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ImageReadError, match="short.nii"):
        read_image(tmp_path / "short.nii")


# -- PNG writers -----------------------------------------------------------------------------------
def test_mask_and_overlay_png(tmp_path):
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:50] = True
    out = write_mask_png(tmp_path / "m.png", mask)
    assert np.array_equal(np.asarray(Image.open(out)) == 255, mask)

    image = np.full((40, 60, 3), 100, np.uint8)
    over = np.asarray(Image.open(write_overlay_png(tmp_path / "o.png", image, mask)))
    contour = mask_contour(mask)
    assert contour.sum() == 2 * (20 + 30) - 4  # the rectangle's one-pixel border
    assert (over[contour] == OVERLAY_COLOR).all()
    assert (over[~mask] == 100).all()  # background untouched
    assert not (over[10 + 5, 20 + 5] == 100).all()  # interior tinted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "o.png"]  # no temp files left


# -- stored values (training data and masks): read_pixels, read_mask, read_volume, .npy, NRRD -------
def test_read_pixels_keeps_stored_values_where_read_image_converts(tmp_path):
    labels = np.zeros((20, 30), np.uint8)
    labels[5:10, 5:20] = 2
    im = Image.fromarray(labels, "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 200, 0] + [0] * 759)  # label 2 is green: red channel 0
    im.save(tmp_path / "labels.png")
    assert np.array_equal(read_pixels(tmp_path / "labels.png"), labels)  # palette indices, as stored
    assert read_image(tmp_path / "labels.png").frames[0].shape == (20, 30, 3)  # expanded for the model
    assert np.array_equal(read_mask(tmp_path / "labels.png"), labels > 0)
    assert read_frame(tmp_path / "labels.png").shape == (20, 30, 3)
    stack = np.arange(2 * 20 * 30, dtype=np.uint16).reshape(2, 20, 30)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    assert np.array_equal(read_pixels(tmp_path / "stack.tif"), stack)
    with pytest.raises(ImageReadError, match="stack.tif: holds 2 frames"):
        read_frame(tmp_path / "stack.tif")
    signed = np.array([[-3, 0, 4], [5, -1, 0]], np.int16)
    np.save(tmp_path / "signed.npy", signed[None])
    assert np.array_equal(read_pixels(tmp_path / "signed.npy"), signed)  # a leading length-1 axis dropped
    assert np.array_equal(read_mask(tmp_path / "signed.npy"), signed > 0)  # positive is foreground
    (tmp_path / "photo.gif").write_bytes((SAMPLES / "ct_small.png").read_bytes())
    with pytest.raises(ImageReadError, match="photo.gif: unsupported image file type"):
        read_pixels(tmp_path / "photo.gif")


def _npy_declaring(path: Path, shape: tuple[int, ...], descr: str = "|u1") -> Path:
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": shape})
        fh.write(bytes(64))
    return path


def test_npy_refusals_from_the_header_and_data(tmp_path):
    with pytest.raises(ImageReadError, match="bomb.npy: declared frame size 100000 x 100000 exceeds"):
        read_pixels(_npy_declaring(tmp_path / "bomb.npy", (100_000, 100_000)))
    with pytest.raises(ImageReadError, match="text.npy: not a numeric image"):
        read_pixels(_npy_declaring(tmp_path / "text.npy", (4, 4), "<U8"))
    with pytest.raises(ImageReadError, match="cube.npy: expected a 2-D image"):
        read_frame(_npy_declaring(tmp_path / "cube.npy", (4, 4, 4, 4)))
    np.save(tmp_path / "good.npy", np.ones((32, 32), np.float32))
    (tmp_path / "short.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:300])
    with pytest.raises(ImageReadError, match="short.npy: corrupt or truncated .npy file"):
        read_pixels(tmp_path / "short.npy")
    np.savez(tmp_path / "arrays.npz", a=np.ones((4, 4)))
    shutil.copy(tmp_path / "arrays.npz", tmp_path / "zipped.npy")
    with pytest.raises(ImageReadError, match="zipped.npy: corrupt or truncated .npy file"):
        read_pixels(tmp_path / "zipped.npy")
    nan = np.ones((8, 8), np.float32)
    nan[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(ImageReadError, match="nan.npy: image contains NaN or Inf"):
        read_frame(tmp_path / "nan.npy")


def test_nrrd_volume_reads_as_stored(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    vol = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5) - 50
    for encoding in ("raw", "gzip", "bzip2"):
        nrrd.write(str(tmp_path / f"{encoding}.nrrd"), vol, {"encoding": encoding})
        got = read_volume(tmp_path / f"{encoding}.nrrd")
        assert got.dtype == vol.dtype and np.array_equal(got, vol)  # (x, y, z), as nibabel gives NIfTI


def _nrrd_declaring(path: Path, sizes: str, data: bytes, encoding: str = "raw", extra: str = "") -> Path:
    head = f"NRRD0004\ntype: uint8\ndimension: {len(sizes.split())}\nsizes: {sizes}\nencoding: {encoding}\n{extra}\n"
    path.write_bytes(head.encode() + data)
    return path


def test_nrrd_refusals(tmp_path):
    import gzip

    nrrd = pytest.importorskip("nrrd")
    with pytest.raises(ImageReadError, match="bomb.nrrd: declared frame size 30000 x 30000 exceeds"):
        read_volume(_nrrd_declaring(tmp_path / "bomb.nrrd", "30000 30000 2000", bytes(64)))
    gz_bomb = _nrrd_declaring(tmp_path / "gz_bomb.nrrd", "4 4 4", gzip.compress(bytes(50_000_000)), "gzip")
    with pytest.raises(ImageReadError, match="gz_bomb.nrrd: NRRD data block is longer than its declared 64 bytes"):
        read_volume(gz_bomb)  # decompressed no further than the declared size allows
    detached = _nrrd_declaring(tmp_path / "detached.nrrd", "4 4 4", b"", extra="data file: /etc/hostname\n")
    with pytest.raises(ImageReadError, match="detached.nrrd: detached NRRD data"):
        read_volume(detached)
    with pytest.raises(ImageReadError, match="flat.nrrd: expected a 3-D volume"):
        read_volume(_nrrd_declaring(tmp_path / "flat.nrrd", "8 8", bytes(64)))
    vol = np.ones((8, 8, 4), np.float32)
    vol[1, 2, 3] = np.nan
    nrrd.write(str(tmp_path / "nan.nrrd"), vol)
    with pytest.raises(ImageReadError, match="nan.nrrd: image contains NaN or Inf"):
        read_volume(tmp_path / "nan.nrrd")
    nrrd.write(str(tmp_path / "good.nrrd"), np.ones((32, 32, 16), np.float32), {"encoding": "gzip"})
    (tmp_path / "short.nrrd").write_bytes((tmp_path / "good.nrrd").read_bytes()[:200])
    with pytest.raises(ImageReadError, match="short.nrrd: corrupt or unreadable NRRD file"):
        read_volume(tmp_path / "short.nrrd")
    (tmp_path / "junk.nrrd").write_bytes(b"not an NRRD header\n\n" + bytes(64))
    with pytest.raises(ImageReadError, match="junk.nrrd: corrupt or unreadable NRRD file"):
        read_volume(tmp_path / "junk.nrrd")
