"""Data: layouts, declared modalities, joint augmentation, deterministic resumable sampling, splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from espmed.data import EpochSampler, SegmentationDataset, TrainItem, letterbox_mask, load_samples, train_items
from espmed.data.dataset import build_augmentation, item_seed
from espmed.data.reference import mni152_slices, nuclei_samples
from espmed.data.sources import Sample
from espmed.errors import DatasetSpecError, ImageReadError, ModalityError
from espmed.model import get_preset
from espmed.runtimes.preprocess import preprocess

PRE = get_preset("esp-medsam-tiny").preprocessing


def _write_pair(img_dir, mask_dir, name, shape=(40, 56), seed=0):
    rng = np.random.default_rng(seed)
    img = (rng.random(shape) * 255).astype(np.uint8)
    mask = np.zeros(shape, np.uint8)
    mask[5:20, 10:30] = 255
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(img_dir / f"{name}.png")
    Image.fromarray(mask).save(mask_dir / f"{name}.png")
    return img, mask > 0


def test_release_layout(tmp_path):
    for i, n in enumerate(("a", "b", "c")):
        _write_pair(tmp_path / "image_kvasir", tmp_path / "mask_kvasir", n, seed=i)
    split = {"train": ["a.png", "b.png"], "valid": [], "test": ["c.png"]}
    (tmp_path / "kvasir_data_split.json").write_text(json.dumps(split))
    spec = {"kind": "release", "root": str(tmp_path), "name": "kvasir", "split": "train", "modality": "colonoscopy"}
    samples = load_samples(spec)
    assert [s.name for s in samples] == ["a", "b"]
    assert all(s.modality == "colonoscopy" and s.mask.dtype == bool for s in samples)
    with pytest.raises(ImageReadError, match="no 'holdout' split"):
        load_samples({**spec, "split": "holdout"})


def test_folder_and_csv_layouts_resolve_relative_paths(tmp_path):
    img, mask = _write_pair(tmp_path / "img", tmp_path / "msk", "x1")
    samples = load_samples({"kind": "folder", "images": "img", "masks": "msk", "modality": "xray"}, base=tmp_path)
    assert len(samples) == 1 and np.array_equal(samples[0].image, img) and np.array_equal(samples[0].mask, mask)
    (tmp_path / "pairs.csv").write_text("image,mask\nimg/x1.png,msk/x1.png\n")
    samples = load_samples({"kind": "csv", "path": "pairs.csv", "modality": "xray", "domain": "unseen"}, base=tmp_path)
    assert samples[0].domain == "unseen" and np.array_equal(samples[0].mask, mask)


def test_volume_layout_reads_nifti_slices(tmp_path):
    import nibabel as nib

    vol = np.arange(6 * 7 * 5, dtype=np.float32).reshape(6, 7, 5)
    lab = np.zeros((6, 7, 5), np.uint8)
    lab[1:4, 2:5, 1] = 1
    lab[2:3, 2:3, 3] = 1
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "seg.nii.gz"))
    samples = load_samples(
        {"kind": "volume", "image": "t1.nii.gz", "mask": "seg.nii.gz", "axis": 2, "modality": "mri"}, base=tmp_path
    )
    assert [s.name for s in samples] == ["t1_ax2_001", "t1_ax2_003"]
    assert np.array_equal(samples[0].image, np.rot90(vol[:, :, 1]))
    assert samples[0].mask.sum() == 9 and samples[1].mask.sum() == 1


def test_modality_is_required_and_bad_specs_are_clear(tmp_path):
    _write_pair(tmp_path / "img", tmp_path / "msk", "x1")
    with pytest.raises(DatasetSpecError, match="'modality' is required"):
        load_samples({"kind": "folder", "images": "img", "masks": "msk"}, base=tmp_path)
    with pytest.raises(DatasetSpecError, match="unknown keys"):
        load_samples({"kind": "folder", "images": "img", "masks": "msk", "modality": "x", "colour": 1}, base=tmp_path)
    with pytest.raises(DatasetSpecError, match="kind"):
        load_samples({"kind": "zip", "modality": "x"})
    (tmp_path / "img" / "x2.png").write_bytes(b"not a png")
    _, _ = _write_pair(tmp_path / "other", tmp_path / "msk", "x2")
    with pytest.raises(ImageReadError, match="x2.png: not a readable image"):
        load_samples({"kind": "folder", "images": "img", "masks": "msk", "modality": "x"}, base=tmp_path)


def test_augmentation_moves_image_and_mask_together():
    # The mask is exactly "image > 127", so after any joint geometric transform it must still be.
    rng = np.random.default_rng(1)
    blobs = np.zeros((96, 128), np.uint8)
    for _ in range(6):
        r, c = rng.integers(10, 80), rng.integers(10, 110)
        blobs[r - 8 : r + 8, c - 12 : c + 12] = 255
    sample = Sample("blobs", blobs, blobs > 127, "microscopy")
    ds = SegmentationDataset([TrainItem(sample, True, (48, 96))], ["microscopy"], 64, (0, 0, 0), (1, 1, 1))
    agreements = []
    for seed in range(12):
        item = ds[(0, seed)]
        img = item["image"][0].numpy()
        mask = item["mask"][0].numpy() > 0.5
        # intensity augmentation scales by <= 1.2 and shifts by <= 20: threshold between 0 and 255 * 0.8 - 20
        bright = img > 100
        agreements.append((bright == mask).mean())
    assert min(agreements) > 0.97
    a, b = ds[(0, 5)], ds[(0, 5)]
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert not np.array_equal(ds[(0, 6)]["image"].numpy(), a["image"].numpy())


def test_unaugmented_item_is_the_shared_preprocessing():
    s = mni152_slices("test")[3]
    ds = SegmentationDataset([TrainItem(s, augment=False)], ["brain-mri"], 128, PRE.mean, PRE.std)
    item = ds[(0, 0)]
    x, box = preprocess(s.image, 128, PRE.mean, PRE.std)
    assert np.array_equal(item["image"].numpy(), x)
    assert np.array_equal(item["mask"][0].numpy(), letterbox_mask(s.mask, box))
    assert item["mask"][0, box.resized_hw[0]:].sum() == 0  # padding is background


def test_block_exact_resize_makes_each_block_mean_the_quarter_size_image():
    """`longest-side-block-exact`: for a small, an odd-shaped and a large image, the input is 4x the
    quarter-size resize's shape and each 4 x 4 block's mean is that resize's pixel (what a box
    patch embed reads); padding stays zero; the dataset applies it; unknown modes are refused."""
    rng = np.random.default_rng(0)
    mode = "longest-side-block-exact"
    for shape in ((30, 50), (300, 500), (700, 530)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        x, box = preprocess(image, 256, (0, 0, 0), (1, 1, 1), mode)
        quarter, qbox = preprocess(image, 64, (0, 0, 0), (1, 1, 1))
        (qh, qw), (rh, rw) = qbox.resized_hw, box.resized_hw
        assert (rh, rw) == (4 * qh, 4 * qw) and box.original_hw == shape
        assert not x[:, rh:].any() and not x[:, :, rw:].any()
        blocks = x[:, :rh, :rw].reshape(3, qh, 4, qw, 4).mean(axis=(2, 4))
        np.testing.assert_allclose(blocks, quarter[:, :qh, :qw], atol=1e-3)
    with pytest.raises(ValueError, match="resize must be one of longest-side, longest-side-block-exact"):
        preprocess(image, 256, PRE.mean, PRE.std, "stretch")
    s = nuclei_samples("valid")[0]
    ds = SegmentationDataset([TrainItem(s, augment=False)], ["microscopy"], 512, PRE.mean, PRE.std, mode)
    x, box = preprocess(s.image, 512, PRE.mean, PRE.std, mode)
    assert np.array_equal(ds[(0, 0)]["image"].numpy(), x)
    assert np.array_equal(ds[(0, 0)]["mask"][0].numpy(), letterbox_mask(s.mask, box))


def test_block_exact_resize_keeps_a_small_image_smooth():
    """A 4x upsampled small image is bilinear's interpolation of a sharpened image, not 4 x 4
    replicated blocks: its steps between neighbouring pixels stay near bilinear's (a decoder
    trained on replicated blocks segmented held-out nuclei worse)."""
    from espmed.data.reference import NUCLEI_DIR
    from espmed.io import read_image

    image = read_image(NUCLEI_DIR / "dsb2018_img2d.png").frames[0][100:160, 40:85]  # real, 60 x 45
    x, box = preprocess(image, 256, (0, 0, 0), (1, 1, 1), "longest-side-block-exact")
    bilinear = preprocess(image, 256, (0, 0, 0), (1, 1, 1))[0]
    quarter, qbox = preprocess(image, 64, (0, 0, 0), (1, 1, 1))
    (qh, qw), (rh, rw) = qbox.resized_hw, box.resized_hw
    replicated = quarter[:, :qh, :qw].repeat(4, axis=1).repeat(4, axis=2)

    def largest_step(a):
        return np.abs(np.diff(a[0, :rh, :rw], axis=1)).max()

    assert largest_step(x) < 1.5 * largest_step(bilinear) and largest_step(x) < 0.5 * largest_step(replicated)


def test_dataset_rejects_modalities_the_model_lacks():
    s = nuclei_samples("valid")[0]
    with pytest.raises(ModalityError, match="not one of the model's"):
        SegmentationDataset([TrainItem(s)], ["brain-mri"], 64, PRE.mean, PRE.std)


def test_sampler_one_process_with_accumulation_equals_two_ranks():
    single = list(EpochSampler(20, micro=2, accum=2, world=1, rank=0, seed=3))
    r0 = list(EpochSampler(20, micro=2, accum=1, world=2, rank=0, seed=3))
    r1 = list(EpochSampler(20, micro=2, accum=1, world=2, rank=1, seed=3))
    # per optimizer step: single's micro-batch 0 == rank 0's batch, micro-batch 1 == rank 1's
    for step in range(5):
        assert single[4 * step : 4 * step + 2] == r0[2 * step : 2 * step + 2]
        assert single[4 * step + 2 : 4 * step + 4] == r1[2 * step : 2 * step + 2]
    assert sorted(i for i, _ in single) == list(range(20))


def test_sampler_resumes_mid_epoch_and_reshuffles_per_epoch():
    s = EpochSampler(30, micro=4, accum=1, seed=7)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=3)
    assert list(s) == full[12:] and len(s) == len(full) - 12
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in full]
    assert full[0][1] == item_seed(7, 2, 0)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        EpochSampler(3, micro=2, accum=2)


def test_reference_splits_are_disjoint():
    z = {split: {int(s.name.rsplit("_", 1)[1]) for s in mni152_slices(split)} for split in ("train", "valid", "test")}
    assert not (z["train"] & z["valid"]) and not (z["train"] & z["test"]) and not (z["valid"] & z["test"])
    gap = min(abs(a - b) for a in z["train"] for b in z["valid"] | z["test"])
    assert gap >= 2
    assert all(s.domain == "unseen" and "_ax1_" in s.name for s in mni152_slices("unseen"))
    train = nuclei_samples("train")[0]
    assert train.image.shape == (512, 256)
    tiles = {split: [s.name for s in nuclei_samples(split)] for split in ("valid", "test")}
    assert all("_c256" in n or "_c384" in n for n in tiles["valid"] + tiles["test"])  # right half only
    assert all("_r0_" in n or "_r128_" in n for n in tiles["valid"])
    assert all("_r256_" in n or "_r384_" in n for n in tiles["test"])


def test_train_items_repeat_and_crop():
    items = train_items(
        {"kind": "dsb2018-nuclei", "split": "train", "modality": "microscopy", "repeat": 3, "crop": [64, 128]}
    )
    assert len(items) == 3 and items[0].crop == (64, 128) and items[0].augment
    with pytest.raises(DatasetSpecError, match="crop"):
        train_items({"kind": "dsb2018-nuclei", "split": "train", "modality": "microscopy", "crop": [8]})


def test_affine_false_augments_without_interpolating_a_pixel():
    spec = {"kind": "dsb2018-nuclei", "split": "train", "modality": "microscopy", "crop": [64, 64]}
    item = train_items({**spec, "affine": False})[0]
    assert item.augment and not item.affine and train_items(spec)[0].affine
    with pytest.raises(DatasetSpecError, match="true or false"):
        train_items({**spec, "affine": "no"})
    image = item.sample.image if item.sample.image.ndim == 2 else item.sample.image[..., 0]
    values = set(np.unique(image).tolist())
    for seed in range(8):  # crop, flips and 90-degree turns only move pixels; intensity off here
        t = build_augmentation(item.crop, affine=False)
        t.transforms = tuple(x for x in t.transforms if "Intensity" not in type(x).__name__)
        t.set_random_state(seed=seed)
        rgb = np.repeat(image[None].astype(np.float32), 3, axis=0)
        out = t({"image": rgb, "mask": item.sample.mask[None].astype(np.float32)})
        assert set(np.unique(np.asarray(out["image"])).tolist()) <= values
    assert not any("Affine" in type(x).__name__ for x in build_augmentation(None, affine=False).transforms)


def test_volume_layout_reads_a_dicom_series_in_slice_order(tmp_path):
    import nibabel as nib
    import pydicom
    from pydicom.data import get_testdata_file

    series = tmp_path / "series"
    series.mkdir()
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    frames = []
    for z in (2, 0, 1):  # written out of order: the reader sorts by ImagePositionPatient
        ds = base.copy()
        pixels = (base.pixel_array.astype(np.int32) + 100 * z).astype(base.pixel_array.dtype)
        ds.PixelData = pixels.tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.save_as(series / f"slice{z}.dcm")
        frames.append((z, pixels))
    (series / "notes.txt").write_text("not DICOM")
    shape = base.pixel_array.T.shape + (3,)
    label = np.zeros(shape, np.uint8)
    label[10:20, 5:30, 1] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "seg.nii.gz"))
    samples = load_samples(
        {"kind": "volume", "image": "series", "mask": "seg.nii.gz", "modality": "mri"}, base=tmp_path
    )
    assert [s.name for s in samples] == ["series_ax2_001"]
    expected = dict(frames)[1]
    assert np.array_equal(samples[0].image, np.rot90(expected.T)) and samples[0].mask.sum() == 250
