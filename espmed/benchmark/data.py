"""Benchmark images: a folder of 2-D images, optionally with ground-truth masks.

A folder may hold a `samples.json` index (a list of `{"file", "modality", "mask"}` entries, as the
bundled `espmed/assets/samples/` does); otherwise every image file in it is used, and a mask is
the file of the same name in its `masks/` subfolder. Torch-free: the benchmark worker reads the
same list.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from espmed.errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")


@dataclass(frozen=True)
class Sample:
    name: str
    image: str  # absolute path
    mask: str | None = None  # absolute path of a binary ground-truth mask, if any
    modality: str | None = None  # the modality the image shows, if known

    def to_dict(self) -> dict:
        return asdict(self)


def bundled_samples_dir() -> Path:
    """The real sample images that ship with espmed."""
    return Path(str(resources.files("espmed") / "assets" / "samples"))


def list_samples(folder: str | Path | None = None) -> list[Sample]:
    """The samples of `folder` (default: the bundled ones), in a stable order."""
    folder = Path(folder) if folder is not None else bundled_samples_dir()
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: no such data folder")
    index = folder / "samples.json"
    if index.is_file():
        try:
            entries = json.loads(index.read_text(encoding="utf-8"))
            samples = [
                Sample(
                    name=Path(e["file"]).stem,
                    image=str((folder / e["file"]).resolve()),
                    mask=str((folder / e["mask"]).resolve()) if e.get("mask") else None,
                    modality=e.get("modality"),
                )
                for e in entries
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageReadError(f"{index}: malformed sample index ({exc})") from None
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        samples = []
        for p in files:
            mask = folder / "masks" / p.name
            samples.append(Sample(p.stem, str(p.resolve()), str(mask.resolve()) if mask.is_file() else None))
    for s in samples:
        for path in (s.image, s.mask):
            if path is not None and not Path(path).is_file():
                raise ImageReadError(f"{path}: listed in {folder} but missing")
    if not samples:
        raise ImageReadError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return samples


def read_image(path: str | Path) -> np.ndarray:
    """A 2-D image as an array (gray, RGB or RGBA, any dtype) from an image file or `.npy`."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad input file
        raise ImageReadError(f"{path}: cannot read image ({exc})") from None


def read_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask as bool (H, W): any non-zero pixel is foreground."""
    a = read_image(path)
    if a.ndim == 3:
        a = a[..., 0]
    return a != 0
