"""Datasets declared in a config: one table per source, with its modality stated explicitly.

    {kind = "folder", images = "data/img", masks = "data/mask", modality = "microscopy"}
    {kind = "release", root = "data", name = "kvasir", split = "train", modality = "colonoscopy"}
    {kind = "csv", path = "pairs.csv", modality = "xray"}
    {kind = "volume", image = "t1.nii.gz", mask = "brain.nii.gz", axis = 2, modality = "brain-mri"}
    {kind = "mni152", split = "train", modality = "brain-mri"}        # reference data (nilearn)
    {kind = "dsb2018-nuclei", split = "test", modality = "microscopy"} # reference data (committed)
    {kind = "pyradiomics", root = "data/pyradiomics", volume = "lung1", modality = "ct-lesion"}
    {kind = "stardist-nuclei", split = "test", modality = "microscopy"} # installed stardist wheel
    {kind = "unlabelled", source = "skimage:retina", modality = "fundus"} # distillation only
    {kind = "dicom-overlay", path = "scan.dcm", modality = "mr-lesion"}   # mask = filled overlay 6000

Common keys: `domain` ("seen"/"unseen", for evaluation summaries), `repeat` (items per sample per
epoch, to balance datasets), `crop` ([min, max] random square crop side), `augment` (bool),
`affine` (bool: the rotation/scale affine of the augmentation; false keeps pixels exact).
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import DatasetSpecError
from . import real, reference, sources
from .dataset import TrainItem
from .sources import Sample

KINDS = (
    "folder", "release", "csv", "volume", "mni152", "dsb2018-nuclei", "pyradiomics", "stardist-nuclei", "unlabelled",
    "dicom-overlay",
)
_COMMON = {"kind", "modality", "domain", "repeat", "crop", "augment", "affine"}
_KEYS = {
    "folder": {"images", "masks"},
    "release": {"root", "name", "split"},
    "csv": {"path"},
    "volume": {"image", "mask", "axis", "slices", "min_foreground"},
    "mni152": {"split"},
    "dsb2018-nuclei": {"split"},
    "pyradiomics": {"root", "volume"},
    "stardist-nuclei": {"split"},
    "unlabelled": {"source"},
    "dicom-overlay": {"path", "group"},
}


def load_samples(spec: Mapping[str, Any], base: Path = Path(".")) -> list[Sample]:
    """The samples a dataset table describes."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise DatasetSpecError(f"dataset kind {kind!r} unknown; choose from {', '.join(KINDS)}")
    unknown = set(spec) - _COMMON - _KEYS[kind]
    if unknown:
        raise DatasetSpecError(f"{kind} dataset: unknown keys {sorted(unknown)}")
    modality = spec.get("modality")
    if not isinstance(modality, str) or not modality:
        raise DatasetSpecError(f"{kind} dataset: 'modality' is required (it is never guessed from file names)")
    domain = spec.get("domain", "seen")
    if domain not in ("seen", "unseen"):
        raise DatasetSpecError(f"{kind} dataset: domain must be 'seen' or 'unseen', got {domain!r}")

    def need(key: str) -> Any:
        if key not in spec:
            raise DatasetSpecError(f"{kind} dataset: missing key {key!r}")
        return spec[key]

    def path(key: str) -> Path:
        p = Path(need(key)).expanduser()
        return p if p.is_absolute() else base / p

    if kind == "folder":
        samples = sources.folder_layout(path("images"), path("masks"), modality, domain)
    elif kind == "release":
        samples = sources.release_layout(path("root"), need("name"), need("split"), modality, domain)
    elif kind == "csv":
        samples = sources.csv_layout(path("path"), modality, domain)
    elif kind == "volume":
        samples = sources.volume_layout(
            path("image"), path("mask"), modality, int(spec.get("axis", 2)), spec.get("slices"),
            int(spec.get("min_foreground", 1)), domain,
        )
    elif kind == "mni152":
        samples = reference.mni152_slices(need("split"), modality)
    elif kind == "pyradiomics":
        samples = real.pyradiomics_volume(path("root"), need("volume"), modality, domain)
    elif kind == "stardist-nuclei":
        samples = real.stardist_nuclei(need("split"), modality, domain)
    elif kind == "unlabelled":
        samples = real.unlabelled(need("source"), modality)
    elif kind == "dicom-overlay":
        group = spec.get("group", 0x6000)
        if not isinstance(group, int) or not (0x6000 <= group <= 0x601E and group % 2 == 0):
            raise DatasetSpecError(f"dicom-overlay dataset: group must be an overlay group (even, 0x6000-0x601E), "
                                   f"got {group!r}")
        where = str(need("path"))
        test_file = where.removeprefix("pydicom:")
        file = real.pydicom_test_file(test_file) if test_file != where else path("path")
        samples = real.dicom_overlay(file, modality, domain, group)
    else:
        samples = reference.nuclei_samples(need("split"), modality)
    if spec.get("domain") and kind in ("mni152", "dsb2018-nuclei"):
        samples = [Sample(s.name, s.image, s.mask, s.modality, domain) for s in samples]
    if not samples:
        raise DatasetSpecError(f"{kind} dataset ({modality}): no samples")
    return samples


def train_items(spec: Mapping[str, Any], base: Path = Path(".")) -> list[TrainItem]:
    """Training items of a dataset table: each sample `repeat` times, with its crop/augment settings."""
    if spec.get("kind") == "unlabelled":
        raise DatasetSpecError("an unlabelled dataset has no masks: use it for distillation, not segmentation training")
    repeat = int(spec.get("repeat", 1))
    if repeat < 1:
        raise DatasetSpecError(f"{spec.get('kind')} dataset: repeat must be >= 1")
    crop = spec.get("crop")
    if crop is not None:
        if len(crop) != 2 or not 16 <= int(crop[0]) <= int(crop[1]):
            raise DatasetSpecError(f"{spec.get('kind')} dataset: crop must be [min, max] sides, min >= 16")
        crop = (int(crop[0]), int(crop[1]))
    augment, affine = (spec.get(key, True) for key in ("augment", "affine"))
    if not isinstance(augment, bool) or not isinstance(affine, bool):
        raise DatasetSpecError(f"{spec.get('kind')} dataset: augment and affine must be true or false")
    return [TrainItem(s, augment, crop, affine) for s in load_samples(spec, base) for _ in range(repeat)]
