"""Real data installed from package registries (see `benchmarks/real_model/fetch_data.sh`), read
from where the installer put it: nothing is downloaded here.

- pyradiomics: the 3.0.1 sdist's `data/<volume>_image.nrrd` + `<volume>_label.nrrd` (CT chest:
  lung1, lung2; MR brain: brain1, brain2; MR breast: breast1), tumour/lesion masks, read as axial
  slices with foreground. A volume is the unit of a split: a config names the volumes it trains on
  and those it holds out, never slices of one volume in two splits.
- stardist-nuclei: the stardist wheel's `data/images/img2d.tif` + `mask2d.tif` (DSB-2018, 512x512,
  instance labels as a foreground mask). train = the left half (crop it with augmentation);
  test = the two 256x256 quadrants of the right half, whole (each has nuclei).
- unlabelled: one real image without a mask, for distillation (stage 1) only, from scikit-image's
  `skimage.data`, pydicom's test files (pydicom + pydicom-data), or the stardist wheel's data.
- dicom-overlay: a DICOM image whose finding is outlined in an overlay plane (how a viewer marks a
  lesion), e.g. pydicom's `examples_overlay.dcm` (MR abdomen, a liver lesion outlined).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, ImageReadError
from ..io import read_image, read_mask, read_pixels
from .sources import Sample, volume_layout

PYRADIOMICS_VOLUMES = ("lung1", "lung2", "brain1", "brain2", "breast1")
NUCLEI_SPLITS = ("train", "test")
#: `unlabelled` sources: `<scheme>:<name>`.
UNLABELLED_SCHEMES = ("skimage", "pydicom", "stardist")


def pyradiomics_volume(root: str | Path, volume: str, modality: str, domain: str = "seen") -> list[Sample]:
    """Every axial slice with foreground of one pyradiomics sample volume and its label."""
    if volume not in PYRADIOMICS_VOLUMES:
        raise ImageReadError(f"unknown pyradiomics volume {volume!r}; choose from {', '.join(PYRADIOMICS_VOLUMES)}")
    root = Path(root)
    image, label = root / f"{volume}_image.nrrd", root / f"{volume}_label.nrrd"
    if not image.is_file() or not label.is_file():
        raise ImageReadError(
            f"{root}: no {image.name} / {label.name} (run benchmarks/real_model/fetch_data.sh to install them)"
        )
    return volume_layout(image, label, modality, axis=2, domain=domain)


def stardist_file(name: str) -> Path:
    """A file of the installed stardist wheel's `data/images/`, found without importing stardist."""
    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            "the stardist data needs the stardist wheel: pip install --no-deps stardist==0.9.1"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / name
    if not path.is_file():
        raise BackendUnavailableError(f"stardist is installed without {path}")
    return path


def stardist_nuclei(split: str, modality: str, domain: str = "seen") -> list[Sample]:
    """stardist's DSB-2018 nuclei image: the left half (train) or the right half's quadrants (test)."""
    if split not in NUCLEI_SPLITS:
        raise ImageReadError(f"unknown stardist-nuclei split {split!r}; choose from {', '.join(NUCLEI_SPLITS)}")
    image, mask = read_pixels(stardist_file("img2d.tif")), read_mask(stardist_file("mask2d.tif"))
    if split == "train":
        return [Sample("stardist_nuclei_left", image[:, :256].copy(), mask[:, :256].copy(), modality, domain)]
    return [
        Sample(f"stardist_nuclei_r{r}_c256", image[r : r + 256, 256:].copy(), mask[r : r + 256, 256:].copy(),
               modality, domain)
        for r in (0, 256)
    ]


def unlabelled_image(source: str) -> np.ndarray:
    """The 2-D image (first frame) `source` names: `skimage:<function>`, `pydicom:<test file>`,
    `stardist:<file>`."""
    scheme, _, name = source.partition(":")
    if scheme not in UNLABELLED_SCHEMES or not name:
        raise ImageReadError(
            f"unlabelled source {source!r}: expected <scheme>:<name> with scheme {', '.join(UNLABELLED_SCHEMES)}"
        )
    if scheme == "skimage":
        from skimage import data

        if name.startswith("_") or not callable(getattr(data, name, None)):
            raise ImageReadError(f"skimage.data has no image {name!r}")
        return np.asarray(getattr(data, name)())
    if scheme == "pydicom":
        return read_image(pydicom_test_file(name)).frames[0]
    return read_image(stardist_file(name)).frames[0]


def pydicom_test_file(name: str) -> Path:
    """A DICOM test file shipped with pydicom or pydicom-data (no download)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise ImageReadError(f"pydicom test file {name!r} not found (pip install pydicom-data)")
    return Path(path)


def dicom_overlay(path: Path, modality: str, domain: str = "seen", group: int = 0x6000) -> list[Sample]:
    """One DICOM image (read as `espmed predict` reads it) and the mask its overlay plane `group`
    outlines: the largest region of the plane with holes filled, so a drawn contour becomes its region
    and the labels or markers a viewer draws beside it (text, orientation boxes) are dropped."""
    from scipy.ndimage import binary_fill_holes, label

    from ..io.dicom import header_checked

    read = read_image(path)
    if read.kind != "dicom":
        raise ImageReadError(f"{path}: not a DICOM file (an overlay plane is a DICOM element)")
    image, ds = read.frames[0], read.source[0]
    with header_checked(path):
        if (group, 0x3000) not in ds:
            raise ImageReadError(f"{path}: no overlay plane {group:04X} (its outline is the mask)")
        plane = np.asarray(ds.overlay_array(group), dtype=bool)
        row, col = (int(v) - 1 for v in ds[group, 0x0050].value) if (group, 0x0050) in ds else (0, 0)
    mask = np.zeros(image.shape[:2], dtype=bool)
    if row < 0 or col < 0 or row + plane.shape[0] > mask.shape[0] or col + plane.shape[1] > mask.shape[1]:
        raise ImageReadError(f"{path}: overlay plane {group:04X} {plane.shape} at ({row + 1}, {col + 1}) lies "
                             f"outside the {mask.shape} image")
    mask[row : row + plane.shape[0], col : col + plane.shape[1]] = plane
    regions, count = label(binary_fill_holes(mask), structure=np.ones((3, 3)))
    if not count:
        raise ImageReadError(f"{path}: overlay plane {group:04X} is empty")
    mask = regions == 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))
    return [Sample(f"{path.stem}_{group:04x}", image, mask, modality, domain)]


def unlabelled(source: str, modality: str) -> list[Sample]:
    """One unlabelled image as a Sample with an empty mask: for distillation, never for segmentation."""
    image = unlabelled_image(source)
    name = source.replace(":", "_").replace(".", "_")
    return [Sample(name, image, np.zeros(image.shape[:2], dtype=bool), modality)]
