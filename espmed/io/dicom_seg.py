"""DICOM out: the SEG of a segmented volume (highdicom), or Secondary Capture overlays where the
source cannot have a SEG, with UIDs derived from the model and the sources.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..atomic import atomic_open
from ..errors import ImageReadError, first_line
from .common import to_rgb_uint8
from .dicom import is_multi_value
from .writers import overlay


def derived_uid(*parts: str) -> str:
    """A UID that is a function of `parts`, so that the same inputs always name the same derived
    instance and a resend is not a new one: 2.25.<a name-based (SHA-1) UUID of the parts>
    (PS3.5 B.2). pydicom's generate_uid ignores its entropy sources under the 2.25 root."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0).join(str(p) for p in parts)).int}"


#: The UUID namespace of espmed's derived UIDs (itself a name-based UUID of the project name).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "espmed:derived-uid")


#: What highdicom raises for a source it cannot derive a SEG from.
SEG_UNSUPPORTED = (ValueError, TypeError, AttributeError, KeyError)


@dataclass(frozen=True)
class Algorithm:
    """What made a SEG's segments (its Algorithm Identification): the model, not only espmed."""

    name: str = "ESP-MedSAM (espmed)"
    version: str = __version__
    parameters: dict[str, str] = field(default_factory=dict)


#: SNOMED CT (value, meaning) pairs of the segmented property codes used below.
_ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")  # CID 7150 category
_ABNORMAL_STRUCTURE = ("49755003", "Morphologically Abnormal Structure")  # CID 7150 category
#: What each shipped modality's query segments (the model card): category, type, anatomic region or None.
#: "Cell nucleus" is SNOMED's synonym of 84640000 (preferred term "Nucleus"), unambiguous in a viewer.
_MODALITY_SEGMENTS = {
    "microscopy": (_ANATOMICAL_STRUCTURE, ("84640000", "Cell nucleus"), None),
    "ct-lesion": (_ABNORMAL_STRUCTURE, ("108369006", "Neoplasm"), ("39607008", "Lung")),
    "mr-lesion": (_ABNORMAL_STRUCTURE, ("52988006", "Lesion"), None),
}
#: A box prompt's mask, or a modality the table does not know: the type is SNOMED's "Body structure",
#: the parent of both normal anatomy (91723000) and morphologically abnormal structures (49755003),
#: so it is true of whatever a box encloses (an organ, a lesion, a nucleus); CID 7150 has no category
#: above both, and "Anatomical Structure" is the one a generic body structure falls under.
_GENERIC_SEGMENT = (_ANATOMICAL_STRUCTURE, ("123037004", "Body structure"), None)


def segment_codes(modality: str | None) -> tuple:
    """(category, type, anatomic regions) of a mask: the modality's own codes, else the generic ones."""
    from highdicom.sr import CodedConcept

    category, kind, region = _MODALITY_SEGMENTS.get(modality or "", _GENERIC_SEGMENT)
    regions = [CodedConcept(region[0], "SCT", region[1])] if region else []
    return CodedConcept(category[0], "SCT", category[1]), CodedConcept(kind[0], "SCT", kind[1]), regions


def box_text(box: Sequence[float]) -> str:
    """A box as its segment's description says it (at most 64 characters, an LO)."""
    return "box x0,y0,x1,y1 = " + ",".join(f"{float(v):g}" for v in box)


def _descriptions(label: str, modality_name: str, algorithm: Algorithm, boxes) -> list:
    """One segment for the self-prompted mask (the modality's codes), or one per box (generic codes,
    the box in the segment's description)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version, family=codes.cid7162.ArtificialIntelligence,
        parameters=algorithm.parameters or None,
    )
    segments = [(None, label, *segment_codes(modality_name))] if boxes is None else [
        (box, f"box {k}", *segment_codes(None)) for k, box in enumerate(boxes, 1)
    ]
    out = []
    for number, (box, name, category, kind, regions) in enumerate(segments, 1):
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=kind, anatomic_regions=regions or None,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if box is not None
            else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        if box is not None:
            description.SegmentDescription = box_text(box)
        out.append(description)
    return out


def _segmentation(
    sources, masks, *, label, modality_name, series_uid, sop_uid, instance_number, algorithm=None, boxes=None
):
    """highdicom's Segmentation; fresh random UIDs where none are given. Without boxes, `masks` has one
    mask per source frame; with boxes (N x 4), the N masks of the one frame, segment k = box k."""
    import highdicom as hd

    if boxes is None:
        pixel_array = np.stack([np.asarray(m, dtype=bool) for m in masks]).astype(np.uint8)
        if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) == 1:
            pixel_array = pixel_array[0]
    else:
        pixel_array = np.moveaxis(np.asarray(masks, dtype=bool), 0, -1)[None].astype(np.uint8)  # (1, H, W, N)
    first = sources[0]
    with warnings.catch_warnings():  # highdicom's notes on the source's own attributes
        warnings.simplefilter("ignore", UserWarning)
        return hd.seg.Segmentation(
            source_images=_valid_copies(sources),
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(label, modality_name, algorithm or Algorithm(), boxes),
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
    ImageReadError when the source cannot have one.

    Deprecated: `espmed.pipeline` writes what predict and serve write (derived UIDs, the Secondary
    Capture fallback); build datasets with `dicom_results` and write them with `save_dicom`.
    """
    warnings.warn(
        "espmed.io.write_dicom_seg is deprecated and will be removed; use espmed.io.dicom_seg.dicom_results "
        "and save_dicom (what espmed.pipeline writes)", DeprecationWarning, stacklevel=2,
    )
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
    algorithm: Algorithm | None = None,
    boxes: np.ndarray | None = None,
) -> tuple[list, str | None]:
    """(datasets, note): the SEG of `masks`, or where the source cannot have one (e.g. a
    multi-frame image without Frame of Reference) one Secondary Capture overlay per frame, with a
    one-line note saying so. frames: the display frames the masks were computed on.

    With `boxes` (N x 4, one 2-D frame), `masks` are the N box masks: segment k = box k, each whole
    (a BINARY SEG holds overlaps), the box in its description; an overlay draws their union.
    """
    try:
        seg = _segmentation(
            sources, masks, label="ESP-MedSAM mask", modality_name=modality_name, series_uid=series_uid,
            sop_uid=sop_uid, instance_number=instance_number, algorithm=algorithm, boxes=boxes,
        )
        return [seg], None
    except SEG_UNSUPPORTED as exc:
        why = f"no DICOM SEG for this source ({first_line(exc, with_type=True)})"
    captures = overlay_secondary_captures(
        sources, frames, masks if boxes is None else [np.any(masks, axis=0)],
        series_uid=derived_uid(series_uid, "sc") if series_uid else None,
        sop_uid=sop_uid,
    )
    return captures, f"{why}; wrote {len(captures)} Secondary Capture overlay(s) instead"


#: Copied from the source into each Secondary Capture overlay: Patient, General Study and the
#: character set (Type 2 attributes written empty when the source lacks them).
SC_COPIED = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


def copied_value(source, keyword: str):
    """A source attribute as a derived instance may copy it: its value when valid for its VR (each
    value of a multi-valued one), else empty (these are Type 2), so a sender's oversized or
    malformed patient and study attributes do not travel into what the node writes."""
    from pydicom import config
    from pydicom.datadict import dictionary_VR
    from pydicom.valuerep import validate_value

    value = source.get(keyword, "")
    if value in ("", None):
        return ""
    vr = dictionary_VR(keyword)
    values = value if is_multi_value(value) else [value]
    try:
        for v in values:
            validate_value(vr, v, config.RAISE)
    except (ValueError, TypeError):
        return ""
    return value


def _valid_copies(sources) -> list:
    """The sources with invalid patient and study attributes (`copied_value`) emptied, on copies:
    highdicom copies those attributes into the SEG."""
    from pydicom.dataset import Dataset

    cleaned = []
    for ds in sources:
        bad = [k for k in SC_COPIED if k in ds and k != "StudyInstanceUID" and copied_value(ds, k) != ds.get(k)]
        if bad:
            copy = Dataset()
            copy.update(ds)  # a new element dict: the source keeps its values
            if hasattr(ds, "file_meta"):
                copy.file_meta = ds.file_meta
            for keyword in bad:
                delattr(copy, keyword)  # the element object is shared with the source: a new one
                setattr(copy, keyword, "")
            ds = copy
        cleaned.append(ds)
    return cleaned


def overlay_secondary_captures(
    sources, frames, masks, *, series_uid: str | None = None, sop_uid: str | None = None
) -> list:
    """One Secondary Capture (RGB) per frame: the frame with its mask drawn as `overlay` does,
    referencing its source instance and frame. For sources a SEG cannot describe.

    sources: the pydicom datasets, frames in order across them; frames / masks: (H, W[, 3]) each.
    series_uid / sop_uid: seeds for derived UIDs (fresh random ones when None).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    series_uid = series_uid or generate_uid()
    owners = [(ds, i) for ds in sources for i in range(int(ds.get("NumberOfFrames", 1) or 1))]
    out = []
    for n, ((source, index), frame, mask) in enumerate(zip(owners, frames, masks, strict=True)):
        if "SOPClassUID" not in source or "SOPInstanceUID" not in source:
            raise ImageReadError(f"{source.get('filename') or 'source'}: no SOP Class/Instance UID to reference")
        rgb = overlay(to_rgb_uint8(frame), mask)
        ds = Dataset()
        for keyword in SC_COPIED:
            setattr(ds, keyword, copied_value(source, keyword))
        ds.SOPClassUID = SecondaryCaptureImageStorage
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
