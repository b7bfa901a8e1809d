"""DICOM in (pydicom) and DICOM SEG out (highdicom).

Reading a grayscale instance: stored values -> Modality LUT (Rescale Slope/Intercept) -> VOI
window (the file's first Window Center/Width; else its VOI LUT; else a modality default: CT
soft-tissue window L40/W400, anything else the 0.5-99.5 percentile range) -> 0..255 ->
MONOCHROME1 inverted, so that bright always means high signal as a radiologist views it.
Colour instances (RGB, YBR -> RGB, PALETTE COLOR) are used as RGB. Every frame of a multi-frame
instance is a frame to segment. A series (`group_series`: the files sharing a SeriesInstanceUID)
is segmented volume by volume (`dicom_volumes`): its single-frame instances of one size, ordered
along the slice normal (else by InstanceNumber) and decoded a chunk at a time (`DicomSeries`), and
each multi-frame instance on its own. DICOM out is `espmed.io.dicom_seg`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import ImageReadError
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
    from pydicom.uid import EnhancedUSVolumeStorage, UID_dictionary

    uid = str(sop_class_uid)
    if uid == EnhancedUSVolumeStorage:  # an image class whose name does not say so
        return True
    return (
        uid.startswith(_STORAGE_ROOT)
        and not uid.startswith(_NON_MEDICAL)
        and "Image Storage" in UID_dictionary.get(uid, ("",))[0]
    )


_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
_NON_MEDICAL = ("1.2.840.10008.5.1.4.1.1.501.", "1.2.840.10008.5.1.4.1.1.601.")  # DICOS security, eddy current


#: The pixel data elements (integer, float, double float).
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def check_image_instance(ds, path: Path, *, has_pixels: bool | None = None) -> None:
    """Refuse what is not an image to segment, by SOP class, before any pixel is decoded.

    SEG, RT Dose/Plan/Structure Set, SR, presentation states, ... are refused naming the class;
    an image class without pixel data is refused as such. A data set without SOP Class UID (old
    ACR-NEMA style files) is judged by its pixel data alone. has_pixels: for a header read without
    its pixels, whether pixel data followed (else it is looked up in `ds`).
    """
    if has_pixels is None:
        has_pixels = any(k in ds for k in PIXEL_KEYWORDS)
    check_image_class(ds, path, has_pixels=has_pixels)
    if "SOPClassUID" in ds and not has_pixels:
        raise ImageReadError(f"{path}: {_class_name(str(ds.SOPClassUID))} has no pixel data")


def check_image_class(ds, path: Path, *, has_pixels: bool = True) -> None:
    """The SOP-class half of `check_image_instance`, which a header read without pixels can answer."""
    if "SOPClassUID" not in ds:
        return
    uid = str(ds.SOPClassUID)
    if not is_image_storage(uid):
        what = "has no pixel data" if not has_pixels else "is not an image"
        raise ImageReadError(
            f"{path}: {_class_name(uid)} {what} (not an image storage SOP class; espmed segments images)"
        )


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
    _check_pixel_header(ds, path)
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom: ValueError for short data, RuntimeError for no decoder, ...
        raise read_error(path, "cannot decode DICOM pixel data", exc) from None


def _check_pixel_header(ds, path: Path) -> None:
    """Pixel data present, and its declared size within the reader's limits."""
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise ImageReadError(f"{path}: DICOM file has no pixel data")
    _check_declared(ds, path)


def _check_declared(ds, path: Path) -> None:
    rows, cols = frame_size(ds)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    check_declared_size(path, (n_frames, rows, cols, samples), (rows, cols))


def decoded_bytes(ds) -> int:
    """The pixel data's size once decoded, from the header (what a compressed instance costs)."""
    rows, cols = frame_size(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    return rows * cols * frames * samples * max(1, (bits + 7) // 8)


def check_decodable(ds, path: Path, *, source=None) -> None:
    """An instance's pixels checked as `dicom_frames` would need them, one frame at a time: declared
    size within limits (from `ds`, which may be the header alone), every frame decodable and
    finite. source: where pydicom reads the pixels from (a file: memory holds one decoded frame,
    not the instance); else `ds`. What a receiver checks before it keeps an instance."""
    from pydicom.pixels import iter_pixels

    with header_checked(path):
        _check_declared(ds, path)
        try:
            for frame in iter_pixels(ds if source is None else source):
                check_finite(path, frame)
        except ImageReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - as in _stored_pixels
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
    center = float(center[0] if is_multi_value(center) else center)
    width = float(width[0] if is_multi_value(width) else width)
    return (center, width) if width >= 1 else (None, 0.0)


def is_multi_value(value) -> bool:
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


class DicomSeries:
    """Single-frame instances of one series and one size, sorted along the slice normal, decoded
    a few at a time (`frames(start, stop)`), so that memory follows the chunk, not the series.

    Headers are read (and checked: one series, image SOP classes, one Rows x Columns) up front;
    `source` holds them without pixel data, which is all a SEG needs to reference its sources.
    """

    def __init__(self, paths: Sequence[str | Path], label: str | Path | None = None) -> None:
        self.label = Path(label) if label is not None else Path(paths[0]).parent
        headers = [(Path(p), read_dataset(p, header_only=True)) for p in paths]
        with header_checked(self.label):
            uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
            if len(uids) != 1:
                raise ImageReadError(f"{self.label}: files belong to {len(uids)} different series")
            for p, ds in headers:
                with header_checked(p):
                    check_image_class(ds, p)
                    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
                        raise ImageReadError(f"{p}: multi-frame instance inside a series of single-frame instances")
            sizes = {frame_size(ds) for _, ds in headers}
            if len(sizes) != 1:
                raise ImageReadError(f"{self.label}: instances of the series differ in size {sorted(sizes)}")
            headers.sort(key=lambda item: slice_order_key(item[1]))
        self.paths = [p for p, _ in headers]
        self.source = [ds for _, ds in headers]
        self.info = _describe(self.source[0]) | {"instances": len(headers)}

    def __len__(self) -> int:
        return len(self.paths)

    def frames(self, start: int = 0, stop: int | None = None) -> list[np.ndarray]:
        """The display frames of instances [start, stop), as `read_dicom` makes them."""
        out = []
        for path, header in zip(self.paths[start:stop], self.source[start:stop], strict=True):
            ds = read_dataset(path)
            with header_checked(path):
                check_image_instance(ds, path)
                if frame_size(ds) != frame_size(header):
                    raise ImageReadError(f"{path}: changed while being read")
                out.extend(dicom_frames(ds, path))
        return out

    def read(self) -> MedicalImage:
        """The whole series in memory, as one image."""
        return MedicalImage(self.label, "dicom", self.frames(), source=self.source, info=self.info)


def read_dicom_series(paths: Sequence[str | Path], label: str | Path | None = None) -> MedicalImage:
    """Single-frame instances of one series and one size, sorted along the slice normal, in memory."""
    return DicomSeries(paths, label).read()


def frame_size(ds) -> tuple[int, int]:
    """(Rows, Columns) as the header declares them ((0, 0) when absent)."""
    return int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)


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


def group_series(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """{SeriesInstanceUID: its files}, in the order of their first file; a file whose header cannot
    be read, or that names no series, is a series of its own keyed by its path (reading it reports
    the problem)."""
    series: dict[str, list[Path]] = {}
    for p in paths:
        try:
            uid = str(read_dataset(p, header_only=True).get("SeriesInstanceUID", "") or "")
        except ImageReadError:
            uid = ""
        series.setdefault(uid or f"file:{p}", []).append(p)
    return series


def dicom_volumes(paths: Iterable[Path]) -> list[list[Path]]:
    """The one rule that splits a series' files into volumes to segment: single-frame instances of
    one Rows x Columns are one volume (`DicomSeries` sorts it); every multi-frame instance, and every
    file whose header cannot be read, is a volume of its own. In the order of their first file."""
    groups: dict[tuple, list[Path]] = {}
    for path in paths:
        try:
            ds = read_dataset(path, header_only=True)
            with header_checked(path):
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                size = frame_size(ds)
        except ImageReadError:
            frames, size = 0, (0, 0)
        key = ("single", *size) if frames == 1 and size != (0, 0) else ("alone", path)
        groups.setdefault(key, []).append(path)
    return list(groups.values())


def _describe(ds) -> dict:
    return {
        "modality": str(ds.get("Modality", "")),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
    }
