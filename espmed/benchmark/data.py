"""Benchmark images: a folder of 2-D images, optionally with ground-truth masks.

A folder may hold a `samples.json` index (a list of `{"file", "modality", "mask"}` entries, as the
bundled `espmed/assets/samples/` does); otherwise every image file in it is used, and a mask is
the file of the same name (or stem, `.png`) in its `masks/` subfolder. A calibration folder (with
`calibration/` and `held_out/`, `benchmarks/quantization/make_calibration.py`) is measured on its
held-out images. Torch-free: the benchmark worker reads the
same list. Images are read with `espmed.io.read_frame` (as `espmed predict` sees them), masks with
`espmed.io.read_mask`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from espmed.errors import ImageReadError
from espmed.export.calibration import sample_index, split_folders
from espmed.io import FRAME_SUFFIXES


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
    split = split_folders(folder)
    if split is not None:
        folder = split[1]  # a calibration folder: measure on what INT8 is not calibrated on
    entries = sample_index(folder)
    if entries is not None:
        try:
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
            raise ImageReadError(f"{folder / 'samples.json'}: malformed sample index ({exc})") from None
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
        samples = []
        for p in files:
            mask = folder / "masks" / p.name
            mask = mask if mask.is_file() else folder / "masks" / f"{p.stem}.png"
            samples.append(Sample(p.stem, str(p.resolve()), str(mask.resolve()) if mask.is_file() else None))
    for s in samples:
        for path in (s.image, s.mask):
            if path is not None and not Path(path).is_file():
                raise ImageReadError(f"{path}: listed in {folder} but missing")
    if not samples:
        raise ImageReadError(f"{folder}: no images ({', '.join(FRAME_SUFFIXES)}) found")
    return samples
