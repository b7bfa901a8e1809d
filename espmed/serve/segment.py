"""One received series -> its derived datasets (a SEG per volume, or Secondary Capture overlays).

The series' single-frame instances of one size are one volume, sorted along the slice normal and
segmented in batches; each multi-frame instance is a volume of its own. UIDs are derived from the
model hash and the source UIDs, so the same instances always give the same output instances.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EspmedError, first_line
from ..io.dicom import derived_uid, dicom_results, read_dataset, read_dicom, read_dicom_series


@dataclass
class SeriesResult:
    """What segmenting one series gave: output datasets plus the numbers for the log line."""

    series_uid: str
    instances: set[str]
    frames: int = 0
    infer_ms: float = 0.0  # wall time of the graph calls, all volumes
    outputs: list = field(default_factory=list)  # pydicom datasets
    notes: list[str] = field(default_factory=list)  # fallbacks (Secondary Capture instead of SEG)
    errors: list[str] = field(default_factory=list)  # volumes that could not be read or segmented

    @property
    def result(self) -> str:
        if self.errors:
            return ("partial: " if self.outputs else "failed: ") + self.errors[0]
        return f"ok ({self.notes[0]})" if self.notes else "ok"


def volumes(paths: list[Path]) -> list[list[Path]]:
    """The series' instances as volumes: single-frame instances grouped by size, multi-frame alone."""
    groups: dict[tuple, list[Path]] = {}
    for path in paths:
        try:
            ds = read_dataset(path, header_only=True)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        except (EspmedError, ValueError, TypeError):  # alone, so that reading it reports the problem
            frames, size = 0, (0, 0)
        key = ("single", *size) if frames == 1 else ("alone", path)
        groups.setdefault(key, []).append(path)
    return list(groups.values())


def segment_series(segmenter, *, model_hash: str, series_uid: str, paths: list[Path]) -> SeriesResult:
    """Segment every volume of the series; a volume that fails is reported, the others still count."""
    result = SeriesResult(series_uid, {p.stem for p in paths})
    output_series = derived_uid(model_hash, series_uid, "seg-series")
    for group in volumes(paths):
        try:
            image = read_dicom_series(group, group[0].parent) if len(group) > 1 else read_dicom(group[0])
            t0 = time.perf_counter()
            masks = [p.mask for p in segmenter.predict_batch(image.frames)]
            result.infer_ms += (time.perf_counter() - t0) * 1e3
            outputs, note = dicom_results(
                image.source, image.frames, masks, modality_name=segmenter.modality, series_uid=output_series,
                sop_uid=derived_uid(model_hash, *sorted(str(ds.SOPInstanceUID) for ds in image.source)),
                instance_number=len(result.instances),
            )
        except (EspmedError, ValueError, OSError) as exc:  # a bad volume: reported, the rest go on
            result.errors.append(first_line(exc))
            continue
        result.frames += len(masks)
        result.outputs.extend(outputs)
        if note:
            result.notes.append(note)
    return result
