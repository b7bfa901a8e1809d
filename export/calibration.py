"""Real images for calibration and accuracy checks, preprocessed exactly as every runtime does.

Images come from `--calib DIR` or the sample images bundled with espmed. A folder with
`calibration/` and `held_out/` subfolders is split that way (what
`benchmarks/quantization/make_calibration.py` writes: distinct real images per modality, held-out
images never calibrated on). Any other folder is sorted by file name and split deterministically:
odd positions are held out for the accuracy gate, the rest calibrate (one image serves both); where
the folder's `samples.json` names the images' modalities, an export gates on the held-out images of
its own modality. The
calibration set is identified by sha256 over the sorted sha256 digests of its files. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from espmed.errors import ExportError, ImageReadError, first_line
from espmed.io import FRAME_SUFFIXES, read_frame
from espmed.runtimes.preprocess import RESIZE_MODES, Letterbox, preprocess

from .manifest import files_sha256


@dataclass
class CalibrationImage:
    path: Path
    image: np.ndarray  # the decoded file, as a device receives it (the accuracy gate's input)
    x: np.ndarray  # (3, S, S) float32 model input (calibration data)
    box: Letterbox


@dataclass
class CalibrationSet:
    source: str
    calibration: list[CalibrationImage]
    held_out: list[CalibrationImage]
    sha256: str  # over the calibration files

    def describe(self) -> dict:
        return {
            "sha256": self.sha256,
            "images": len(self.calibration),
            "held_out": [im.path.name for im in self.held_out],
            "source": self.source,
        }


def default_calibration_dir() -> Path:
    return Path(str(resources.files("espmed") / "assets" / "samples"))


def image_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ExportError(f"{directory}: calibration folder not found")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise ExportError(f"{directory}: no images ({', '.join(FRAME_SUFFIXES)}) to calibrate with")
    return files


def split_folders(directory: Path) -> tuple[Path, Path] | None:
    """(calibration/, held_out/) when `directory` is split that way, else None."""
    split = directory / "calibration", directory / "held_out"
    return split if all(d.is_dir() for d in split) else None


def split_files(directory: str | Path | None) -> tuple[list[Path], list[Path]]:
    """(calibration files, held-out files) of `directory` (default: bundled samples): its
    `calibration/` and `held_out/` subfolders, else odd positions held out (one file serves both)."""
    source = Path(directory) if directory is not None else default_calibration_dir()
    split = split_folders(source)
    if split is not None:
        return image_files(split[0]), image_files(split[1])
    files = image_files(source)
    return (files, files) if len(files) == 1 else (files[0::2], files[1::2])


def set_files(directory: str | Path | None) -> list[Path]:
    """Every file a calibration set from `directory` reads (calibration and held out)."""
    calib, held = split_files(directory)
    return sorted(set(calib) | set(held))


def _load(files: list[Path], input_size: int, mean, std, resize: str) -> list[CalibrationImage]:
    loaded = []
    for f in files:
        image = read_frame(f)
        x, box = preprocess(image, input_size, mean, std, resize)
        loaded.append(CalibrationImage(f, image, x, box))
    return loaded


def sample_index(folder: Path) -> list[dict] | None:
    """The entries of `folder`'s `samples.json` (`{"file", "modality", "mask"}`, as the bundled
    samples have), or None where it has none; the one reader of that index."""
    index = folder / "samples.json"
    if not index.is_file():
        return None
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "file" in e for e in entries):
            raise ValueError("expected a list of {file, modality, mask} entries")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ImageReadError(f"{index}: malformed sample index ({first_line(exc)})") from None
    return entries


def of_modality(folder: Path, files: list[Path], modality: str | None) -> list[Path]:
    """Those of `files` that `folder`'s sample index lists for `modality`; all of them where it
    lists none (or the folder has no index): the accuracy gate judges a modality's export on the
    images that show it, not on a brain MRI through the nuclei query."""
    entries = sample_index(folder) if modality is not None else None
    if not entries:
        return files
    names = {Path(e["file"]).name for e in entries if e.get("modality") == modality}
    return [f for f in files if f.name in names] or files


def load_calibration(
    directory: str | Path | None,
    input_size: int,
    mean,
    std,
    resize: str = RESIZE_MODES[0],
    *,
    modality: str | None = None,
) -> CalibrationSet:
    """Preprocessed calibration and held-out images from `directory` (default: bundled samples);
    with `modality`, the held-out images are those its sample index lists for it (`of_modality`)."""
    source = Path(directory) if directory is not None else default_calibration_dir()
    calib_files, held_files = split_files(source)
    held_files = of_modality(source, held_files, modality)
    calib, held = (_load(files, input_size, mean, std, resize) for files in (calib_files, held_files))
    label = "bundled samples" if directory is None else str(source)
    return CalibrationSet(label, calib, held, files_sha256(im.path for im in calib))
