"""Mask and overlay PNGs (Pillow), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..atomic import write_bytes
from ..errors import ImageReadError

OVERLAY_COLOR = (0, 255, 64)  # contour colour: green stands out on gray, fundus and H&E images
OVERLAY_FILL_ALPHA = 0.25  # tint inside the mask


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    """Binary mask as an 8-bit PNG: 0 background, 255 foreground."""
    write_bytes(path, png_bytes(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8)))
    return Path(path)


def mask_contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Foreground pixels within `thickness` pixels of the background (4-neighbour erosion)."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for _ in range(thickness):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask & ~inner


def overlay(image_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB uint8 image with the mask tinted and its contour drawn (thickness ~ image size / 256)."""
    mask = np.asarray(mask, dtype=bool)
    out = image_rgb.astype(np.float32)
    color = np.asarray(OVERLAY_COLOR, np.float32)
    out[mask] = (1 - OVERLAY_FILL_ALPHA) * out[mask] + OVERLAY_FILL_ALPHA * color
    thickness = max(1, round(max(mask.shape) / 256))
    out[mask_contour(mask, thickness)] = color
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_overlay_png(path: str | Path, image_rgb: np.ndarray, mask: np.ndarray) -> Path:
    write_bytes(path, png_bytes(overlay(image_rgb, mask)))
    return Path(path)


#: Copied from the source into each Secondary Capture overlay: Patient, General Study and the
#: character set (Type 2 attributes written empty when the source lacks them).
SC_COPIED = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def overlay_secondary_captures(
    sources, frames, masks, *, series_uid: str | None = None, sop_uid: str | None = None
) -> list:
    """One Secondary Capture (RGB) per frame: the frame with its mask drawn as `overlay` does,
    referencing its source instance and frame. For sources a SEG cannot describe.

    sources: the pydicom datasets, frames in order across them; frames / masks: (H, W[, 3]) each.
    series_uid / sop_uid: seeds for derived UIDs (fresh random ones when None).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from .. import __version__
    from ..runtimes.preprocess import to_rgb_uint8
    from .dicom import derived_uid

    series_uid = series_uid or generate_uid()
    owners = [(ds, i) for ds in sources for i in range(int(ds.get("NumberOfFrames", 1) or 1))]
    out = []
    for n, ((source, index), frame, mask) in enumerate(zip(owners, frames, masks, strict=True)):
        if "SOPClassUID" not in source or "SOPInstanceUID" not in source:
            raise ImageReadError(f"{source.get('filename') or 'source'}: no SOP Class/Instance UID to reference")
        rgb = overlay(to_rgb_uint8(frame), mask)
        ds = Dataset()
        for keyword in SC_COPIED:
            setattr(ds, keyword, source.get(keyword, ""))
        ds.SOPClassUID = SECONDARY_CAPTURE
        ds.SOPInstanceUID = derived_uid(sop_uid, str(n)) if sop_uid else generate_uid()
        ds.Modality = source.get("Modality", "") or "OT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(source.get("SeriesNumber", 0) or 0) + 2000
        ds.SeriesDescription = "ESP-MedSAM mask overlay"
        ds.ConversionType = "WSD"
        ds.Manufacturer = "espmed"
        ds.SoftwareVersions = __version__
        ds.InstanceNumber = n + 1
        ds.PatientOrientation = ""
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.BurnedInAnnotation = "YES"  # the mask is drawn into the pixels
        ds.DerivationDescription = "ESP-MedSAM segmentation drawn over the source frame"
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if int(source.get("NumberOfFrames", 1) or 1) > 1:
            ref.ReferencedFrameNumber = index + 1
        ds.SourceImageSequence = [ref]
        ds.Rows, ds.Columns = rgb.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.ascontiguousarray(rgb).tobytes()
        ds.preamble = b"\0" * 128
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out
