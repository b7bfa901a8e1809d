"""DICOM in (pydicom) and DICOM SEG out (highdicom).

Reading a grayscale instance: stored values -> Modality LUT (Rescale Slope/Intercept) -> VOI
window (the file's first Window Center/Width; else its VOI LUT; else a modality default: CT
soft-tissue window L40/W400, anything else the 0.5-99.5 percentile range) -> 0..255 ->
MONOCHROME1 inverted, so that bright always means high signal as a radiologist views it.
Colour instances (RGB, YBR -> RGB, PALETTE COLOR) are used as RGB. Every frame of a multi-frame
instance is a frame to segment. A series is the single-frame instances sharing a
SeriesInstanceUID, ordered along the slice normal (else by InstanceNumber).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .. import __version__
from ..atomic import atomic_open
from ..errors import ImageReadError, first_line
from .common import MedicalImage, check_declared_size, check_finite, read_error, scale_to_uint8

DICOM_SUFFIXES = (".dcm", ".dicom")
#: Window (center, width) used when a file carries none, by Modality.
DEFAULT_WINDOWS = {"CT": (40.0, 400.0)}
DEFAULT_PERCENTILES = (0.5, 99.5)


def is_dicom_file(path: str | Path) -> bool:
    """DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_dataset(path: str | Path, header_only: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError as exc:
        raise read_error(path, "not a DICOM file", exc) from None
    except Exception as exc:  # pydicom raises assorted types, e.g. a bare-Exception BytesLengthException
        raise read_error(path, "corrupt DICOM file", exc) from None


def dicom_frames(ds, path: Path) -> list[np.ndarray]:
    """The instance's frames, display-scaled to uint8 (gray) or RGB uint8."""
    return _header_checked(_dicom_frames, ds, path)


def stored_pixels(ds, path: Path) -> np.ndarray:
    """The stored values as pydicom decodes them (frames first when several), size-checked from the header."""
    return _header_checked(_stored_pixels, ds, path)


def _header_checked(read, ds, path: Path):
    try:
        return read(ds, path)
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom converts element values lazily: a malformed one raises on access
        raise read_error(path, "malformed DICOM header", exc) from None


def _stored_pixels(ds, path: Path) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    check_declared_size(path, (n_frames, rows, cols, samples), (rows, cols))
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom: ValueError for short data, RuntimeError for no decoder, ...
        raise read_error(path, "cannot decode DICOM pixel data", exc) from None


def _dicom_frames(ds, path: Path) -> list[np.ndarray]:
    pixels = _stored_pixels(ds, path)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = pixels if (n_frames > 1 and pixels.ndim >= 3 and pixels.shape[0] == n_frames) else pixels[None]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return [np.ascontiguousarray(_color_to_uint8(apply_color_lut(f, ds))) for f in frames]
    if samples == 3:
        return [np.ascontiguousarray(_color_to_uint8(f)) for f in frames]
    return [display_gray(f, ds, path) for f in frames]


def display_gray(stored: np.ndarray, ds, path: Path) -> np.ndarray:
    """One grayscale frame: modality LUT -> VOI window -> uint8, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    check_finite(path, values)
    center, width = _window(ds)
    if center is not None:
        out = _linear_window(values, center, width)
    elif "VOILUTSequence" in ds:
        voi = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        out = scale_to_uint8(voi, float(voi.min()), float(voi.max()))
    elif str(ds.get("Modality", "")).upper() in DEFAULT_WINDOWS:
        out = _linear_window(values, *DEFAULT_WINDOWS[str(ds.Modality).upper()])
    else:
        low, high = np.percentile(values, DEFAULT_PERCENTILES)
        out = scale_to_uint8(values, float(low), float(high))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out
    return out


def _window(ds) -> tuple[float | None, float]:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None, 0.0
    center, width = ds.WindowCenter, ds.WindowWidth
    center = float(center[0] if _is_multi(center) else center)
    width = float(width[0] if _is_multi(width) else width)
    return (center, width) if width >= 1 else (None, 0.0)


def _is_multi(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 'LINEAR' window to 0..255."""
    if width <= 1:
        return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _color_to_uint8(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return rgb
    return scale_to_uint8(rgb, float(rgb.min()), float(rgb.max()))


def read_dicom(path: str | Path) -> MedicalImage:
    """One DICOM file; each of its frames is segmented."""
    path = Path(path)
    ds = read_dataset(path)
    frames = dicom_frames(ds, path)
    return MedicalImage(path, "dicom", frames, source=[ds], info=_describe(ds))


def read_dicom_series(paths: Sequence[str | Path], label: str | Path | None = None) -> MedicalImage:
    """Single-frame instances of one series, sorted along the slice normal."""
    datasets = [(Path(p), read_dataset(p)) for p in paths]
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(uids) != 1:
        raise ImageReadError(f"{label or paths[0]}: files belong to {len(uids)} different series")
    datasets.sort(key=lambda item: _slice_key(item[1]))
    frames = []
    for p, ds in datasets:
        got = dicom_frames(ds, p)
        if len(got) != 1:
            raise ImageReadError(f"{p}: multi-frame instance inside a series of single-frame instances")
        frames.extend(got)
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ImageReadError(f"{label or paths[0]}: instances of the series differ in size {sorted(shapes)}")
    path = Path(label) if label is not None else Path(paths[0]).parent
    info = _describe(datasets[0][1]) | {"instances": len(datasets)}
    return MedicalImage(path, "dicom", frames, source=[ds for _, ds in datasets], info=info)


def _slice_key(ds) -> tuple[float, int]:
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    number = int(ds.get("InstanceNumber", 0) or 0)
    if position is not None and orientation is not None and len(orientation) == 6:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return float(np.dot(normal, np.asarray(position, float))), number
    return 0.0, number


def group_series(paths: Iterable[Path]) -> tuple[dict[str, list[Path]], list[Path]]:
    """({SeriesInstanceUID: single-frame instance paths}, other DICOM files to read one by one)."""
    series: dict[str, list[Path]] = {}
    singles: list[Path] = []
    for p in paths:
        try:
            ds = read_dataset(p, header_only=True)
        except ImageReadError:
            singles.append(p)  # reported when read on its own
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid and int(ds.get("NumberOfFrames", 1) or 1) == 1 and "Rows" in ds:
            series.setdefault(uid, []).append(p)
        else:
            singles.append(p)
    return series, singles


def _describe(ds) -> dict:
    return {
        "modality": str(ds.get("Modality", "")),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
    }


def write_dicom_seg(
    path: str | Path,
    sources: Sequence,
    masks: Sequence[np.ndarray],
    label: str = "ESP-MedSAM mask",
    modality_name: str = "",
) -> Path:
    """A binary DICOM SEG of `masks` (one per source frame, in order), referencing the sources."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    path = Path(path)
    pixel_array = np.stack([np.asarray(m, dtype=bool) for m in masks]).astype(np.uint8)
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) == 1:
        pixel_array = pixel_array[0]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="ESP-MedSAM (espmed)",
        version=__version__,
        family=codes.cid7162.ArtificialIntelligence,
        parameters={"modality": modality_name} if modality_name else None,
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    first = sources[0]
    try:
        with warnings.catch_warnings():  # highdicom's notes on the source's own attributes
            warnings.simplefilter("ignore", UserWarning)
            seg = hd.seg.Segmentation(
                source_images=list(sources),
                pixel_array=pixel_array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[description],
                series_instance_uid=hd.UID(),
                series_number=int(first.get("SeriesNumber", 0) or 0) + 1000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="espmed",
                manufacturer_model_name="ESP-MedSAM",
                software_versions=__version__,
                device_serial_number="espmed",
                omit_empty_frames=False,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        source = getattr(first, "filename", None) or path
        why = first_line(exc, with_type=True)
        raise ImageReadError(f"{source}: cannot build a DICOM SEG for this source ({why}); use --format png") from None
    with atomic_open(path, "wb") as fh:
        seg.save_as(fh)
    return path
