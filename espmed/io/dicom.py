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

import uuid
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

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
    """DICOM by content: 'DICM' after the 128-byte preamble, or a bare data set (no preamble, as
    older writers and some exports leave it) opening with a group 0x0008 or 0x0002 element."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    element = int.from_bytes(head[2:4], "little" if head[:1] != b"\x00" else "big")
    return len(head) >= 8 and head[:2] in _BARE_GROUPS and element < 0x100


#: The first two bytes of a data set without preamble: group 0x0008 or 0x0002, little or big endian.
_BARE_GROUPS = (b"\x08\x00", b"\x00\x08", b"\x02\x00", b"\x00\x02")


def read_dataset(path: str | Path, header_only: bool = False):
    """The file's data set; one without a preamble is read too (force), then must name its SOP class."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from .dicom_codecs import register

    register()
    path = Path(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises assorted types, e.g. a bare-Exception BytesLengthException
        raise read_error(path, "corrupt DICOM file", exc) from None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
        if "SOPClassUID" in ds and str(ds.SOPClassUID).startswith("1.2.840.10008."):
            _infer_transfer_syntax(ds)
            return ds
    except Exception:  # noqa: BLE001 - whatever force-reading garbage raises, the answer is the same
        pass
    raise ImageReadError(f"{path}: not a DICOM file (no 'DICM' preamble, and no SOP Class UID without one)")


def _infer_transfer_syntax(ds) -> None:
    """A bare data set has no file meta: its (native) encoding, as read, is its transfer syntax."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit, little = ds.original_encoding
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def _class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else f"SOP class {uid}"


def is_image_storage(sop_class_uid: str) -> bool:
    """The image storage SOP classes (PS3.4 B.5 entries named '... Image Storage', Enhanced US
    Volume), less the non-medical DICOS and eddy-current ones."""
    from pydicom.uid import UID_dictionary

    uid = str(sop_class_uid)
    if uid in _EXTRA_IMAGE_CLASSES:
        return True
    return (
        uid.startswith(_STORAGE_ROOT)
        and not uid.startswith(_NON_MEDICAL)
        and "Image Storage" in UID_dictionary.get(uid, ("",))[0]
    )


_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
_NON_MEDICAL = ("1.2.840.10008.5.1.4.1.1.501.", "1.2.840.10008.5.1.4.1.1.601.")  # DICOS security, eddy current
_EXTRA_IMAGE_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.6.2"})  # Enhanced US Volume Storage


def check_image_instance(ds, path: Path) -> None:
    """Refuse what is not an image to segment, by SOP class, before any pixel is decoded.

    SEG, RT Dose/Plan/Structure Set, SR, presentation states, ... are refused naming the class;
    an image class without pixel data is refused as such. A data set without SOP Class UID (old
    ACR-NEMA style files) is judged by its pixel data alone.
    """
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if "SOPClassUID" not in ds:
        return
    uid = str(ds.SOPClassUID)
    name = _class_name(uid)
    if not is_image_storage(uid):
        what = "has no pixel data" if not has_pixels else "is not an image"
        raise ImageReadError(f"{path}: {name} {what} (not an image storage SOP class; espmed segments images)")
    if not has_pixels:
        raise ImageReadError(f"{path}: {name} has no pixel data")


def dicom_frames(ds, path: Path) -> list[np.ndarray]:
    """The instance's frames, display-scaled to uint8 (gray) or RGB uint8."""
    with header_checked(path):
        return _dicom_frames(ds, path)


def stored_pixels(ds, path: Path) -> np.ndarray:
    """The stored values as pydicom decodes them (frames first when several), size-checked from the header."""
    with header_checked(path):
        return _stored_pixels(ds, path)


@contextmanager
def header_checked(path: Path):
    """pydicom converts an element's value at first use, so a malformed one (an unknown VR, a value
    that does not parse) raises there, of assorted types: one read error naming the file instead."""
    try:
        yield
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - NotImplementedError, ValueError, KeyError, ... from pydicom
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
    with header_checked(path):
        check_image_instance(ds, path)
        frames = dicom_frames(ds, path)
        return MedicalImage(path, "dicom", frames, source=[ds], info=_describe(ds))


def read_dicom_series(paths: Sequence[str | Path], label: str | Path | None = None) -> MedicalImage:
    """Single-frame instances of one series, sorted along the slice normal."""
    datasets = [(Path(p), read_dataset(p)) for p in paths]
    with header_checked(Path(label or paths[0])):
        uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
        if len(uids) != 1:
            raise ImageReadError(f"{label or paths[0]}: files belong to {len(uids)} different series")
        datasets.sort(key=lambda item: slice_order_key(item[1]))
        frames = []
        for p, ds in datasets:
            with header_checked(p):
                check_image_instance(ds, p)
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


def slice_order_key(ds) -> tuple[float, int]:
    """Where a slice lies in its stack: its position along the slice normal (ImagePositionPatient
    projected on the normal of ImageOrientationPatient; z alone when the orientation is missing),
    then InstanceNumber; the one slice-order rule of the series and volume readers."""
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    number = int(ds.get("InstanceNumber", 0) or 0)
    if position is None or len(position) != 3:
        return 0.0, number
    if orientation is None or len(orientation) != 6:
        return float(position[2]), number
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return float(np.dot(normal, np.asarray(position, float))), number


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


def derived_uid(*parts: str) -> str:
    """A UID that is a function of `parts`, so that the same inputs always name the same derived
    instance and a resend is not a new one: 2.25.<a name-based (SHA-1) UUID of the parts>
    (PS3.5 B.2). pydicom's generate_uid ignores its entropy sources under the 2.25 root."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0).join(str(p) for p in parts)).int}"


#: The UUID namespace of espmed's derived UIDs (itself a name-based UUID of the project name).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "espmed:derived-uid")


#: What highdicom raises for a source it cannot derive a SEG from.
SEG_UNSUPPORTED = (ValueError, TypeError, AttributeError, KeyError)


def _segmentation(sources, masks, *, label, modality_name, series_uid, sop_uid, instance_number):
    """highdicom's Segmentation; fresh random UIDs where none are given."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

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
    with warnings.catch_warnings():  # highdicom's notes on the source's own attributes
        warnings.simplefilter("ignore", UserWarning)
        return hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=series_uid or hd.UID(),
            series_number=int(first.get("SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=sop_uid or hd.UID(),
            instance_number=instance_number,
            manufacturer="espmed",
            manufacturer_model_name="ESP-MedSAM",
            software_versions=__version__,
            device_serial_number="espmed",
            omit_empty_frames=False,
        )


def write_dicom_seg(
    path: str | Path,
    sources: Sequence,
    masks: Sequence[np.ndarray],
    label: str = "ESP-MedSAM mask",
    modality_name: str = "",
) -> Path:
    """A binary DICOM SEG of `masks` (one per source frame, in order) referencing the sources;
    ImageReadError when the source cannot have one (`dicom_results` falls back instead)."""
    try:
        seg = _segmentation(
            sources, masks, label=label, modality_name=modality_name, series_uid=None, sop_uid=None, instance_number=1
        )
    except SEG_UNSUPPORTED as exc:
        source = getattr(sources[0], "filename", None) or path
        why = first_line(exc, with_type=True)
        raise ImageReadError(f"{source}: cannot build a DICOM SEG for this source ({why})") from None
    return save_dicom(path, seg)


def save_dicom(path: str | Path, seg) -> Path:
    """Write a derived dataset (SEG or Secondary Capture, with preamble and file meta) atomically."""
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        seg.save_as(fh)
    return path


def dicom_results(
    sources: Sequence,
    frames: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    modality_name: str = "",
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
) -> tuple[list, str | None]:
    """(datasets, note): the SEG of `masks`, or where the source cannot have one (e.g. a
    multi-frame image without Frame of Reference) one Secondary Capture overlay per frame, with a
    one-line note saying so. frames: the display frames the masks were computed on."""
    from .writers import overlay_secondary_captures

    try:
        seg = _segmentation(
            sources, masks, label="ESP-MedSAM mask", modality_name=modality_name, series_uid=series_uid,
            sop_uid=sop_uid, instance_number=instance_number,
        )
        return [seg], None
    except SEG_UNSUPPORTED as exc:
        why = f"no DICOM SEG for this source ({first_line(exc, with_type=True)})"
    captures = overlay_secondary_captures(
        sources, frames, masks,
        series_uid=derived_uid(series_uid, "sc") if series_uid else None,
        sop_uid=sop_uid,
    )
    return captures, f"{why}; wrote {len(captures)} Secondary Capture overlay(s) instead"
