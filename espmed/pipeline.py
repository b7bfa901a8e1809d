"""One segmentation pipeline under `espmed predict` and `espmed serve`.

inputs -> jobs (`collect_jobs`: a file, or the DICOM files of one series) -> volumes (one DICOM
rule, `io.dicom.dicom_volumes`) -> frames streamed through the segmenter `CHUNK_FRAMES` at a time
(a DICOM series is decoded chunk by chunk, so memory follows the chunk, not the series) -> outputs.
DICOM outputs are the same in both commands: a SEG per volume (Secondary Capture overlays where
the source cannot have one) whose UIDs derive from the model hash and the source UIDs, so the same
instances always give the same output instances. `predict` writes files (`run_job`); `serve` queues
the datasets (`segment_series`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import file_sha256
from .errors import EspmedError, UsageError, first_line
from .io import is_supported, read_image, write_mask_png, write_nifti_mask, write_overlay_png
from .io.common import MedicalImage, image_name, to_rgb_uint8
from .io.dicom import (
    DICOM_SUFFIXES,
    DicomSeries,
    dicom_volumes,
    group_series,
    is_dicom_file,
    read_dataset,
    read_dicom,
)
from .io.dicom_seg import derived_uid, dicom_results, save_dicom

#: Frames decoded and segmented at a time.
CHUNK_FRAMES = 8
#: `--format` choices; `auto` is png for images, nifti for NIfTI, dicom-seg for DICOM.
FORMATS = ("auto", "png", "nifti", "dicom-seg")
#: What a bad input raises while it is read, segmented or written: reported, and the rest go on.
INPUT_ERRORS = (EspmedError, ValueError, OSError)

#: Called with (frames, masks, index of the first frame) for each chunk of a volume.
ChunkHook = Callable[[list[np.ndarray], list[np.ndarray], int], None]


@dataclass
class Job:
    """One input: a file, or the DICOM files of one series (segmented volume by volume)."""

    label: Path
    paths: list[Path]
    series: bool = False

    @property
    def name(self) -> str:
        """What its outputs are named after: a folder's name, or a file's name without image suffixes."""
        if self.series and len(self.paths) > 1:
            return self.label.name
        return image_name(self.label)


@dataclass
class Outcome:
    """What one job gave predict's summary."""

    label: Path
    frames: int = 0
    foreground: float = 0.0  # fraction of mask pixels over all frames
    infer_ms: float = 0.0  # mean graph time per frame
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    warning: str | None = None  # segmented, but written in another form than asked (one line)


def collect_jobs(inputs: list[Path]) -> tuple[list[Job], list[Outcome], list[Path]]:
    """(jobs, missing inputs, ignored files): files as given (a DICOM file is a series of its own);
    folders walked recursively, their DICOM files grouped into series, files of unsupported types
    ignored."""
    jobs: list[Job] = []
    missing: list[Outcome] = []
    ignored: list[Path] = []
    for item in inputs:
        if item.is_file():
            jobs.append(Job(item, [item], series=_is_dicom(item)))
            continue
        if not item.is_dir():
            missing.append(Outcome(item, error="no such file or folder"))
            continue
        files = sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
        dicom = [p for p in files if _is_dicom(p)]
        series = group_series(dicom)
        several = sum(len(paths) > 1 for paths in series.values()) > 1
        for uid, paths in series.items():
            if len(paths) == 1:
                jobs.append(Job(paths[0], paths, series=True))  # named after its file
            else:
                jobs.append(Job(paths[0].parent / f"series-{uid}" if several else paths[0].parent, paths, series=True))
        dicom_set = set(dicom)
        for p in files:
            if p in dicom_set:
                continue
            if is_supported(p):
                jobs.append(Job(p, [p]))
            else:
                ignored.append(p)
    return jobs, missing, ignored


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(path)


def model_hash(artifact: str | Path, metadata=None) -> str:
    """What output UIDs derive from besides the sources: the artifact's manifest when it has one
    (it hashes every member file), else the artifact file itself; a remote model (Triton) has no
    local file, so the metadata it is served with (`ArtifactMetadata`) stands for it."""
    artifact = Path(artifact)
    manifest = artifact.with_name(artifact.name + ".manifest.json")
    if manifest.is_file() or artifact.is_file() or metadata is None:
        return file_sha256(manifest if manifest.is_file() else artifact)
    return hashlib.sha256(metadata.to_json().encode()).hexdigest()


def segment_frames(segmenter, volume: DicomSeries | MedicalImage, *, on_chunk: ChunkHook | None = None,
                   chunk: int = CHUNK_FRAMES) -> tuple[list[np.ndarray], float]:
    """(masks, graph ms) of every frame of `volume`, `chunk` frames decoded and segmented at a time."""
    masks: list[np.ndarray] = []
    infer_ms = 0.0
    for start, frames in _chunks(volume, chunk):
        predictions = segmenter.predict_batch(frames)
        chunk_masks = [p.mask for p in predictions]
        infer_ms += sum(p.timings["infer"] for p in predictions)
        if on_chunk is not None:
            on_chunk(frames, chunk_masks, start)
        masks.extend(chunk_masks)
    return masks, infer_ms


def _chunks(volume: DicomSeries | MedicalImage, size: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    if isinstance(volume, DicomSeries):
        for start in range(0, len(volume), size):
            yield start, volume.frames(start, start + size)
    else:
        for start in range(0, len(volume.frames), size):
            yield start, volume.frames[start:start + size]


def _all_frames(volume: DicomSeries | MedicalImage) -> list[np.ndarray]:
    return volume.frames() if isinstance(volume, DicomSeries) else volume.frames


@dataclass
class VolumeResult:
    """One volume of a series, segmented: its masks and DICOM outputs, or why it failed."""

    frames: int = 0
    infer_ms: float = 0.0
    foreground: int = 0  # mask pixels
    pixels: int = 0
    datasets: list = field(default_factory=list)  # pydicom datasets: a SEG, or Secondary Captures
    note: str | None = None  # a fallback (Secondary Capture instead of SEG)
    error: str | None = None


@dataclass
class SeriesResult:
    """What segmenting one series gave: one result per volume, plus the numbers for the log line."""

    series_uid: str
    instances: set[str]
    volumes: list[VolumeResult] = field(default_factory=list)

    @property
    def outputs(self) -> list:
        return [ds for v in self.volumes for ds in v.datasets]

    @property
    def frames(self) -> int:
        return sum(v.frames for v in self.volumes)

    @property
    def infer_ms(self) -> float:
        return sum(v.infer_ms for v in self.volumes)

    @property
    def errors(self) -> list[str]:
        return [v.error for v in self.volumes if v.error]

    @property
    def result(self) -> str:
        notes = [v.note for v in self.volumes if v.note]
        if self.errors:
            return ("partial: " if self.outputs else "failed: ") + self.errors[0]
        return f"ok ({notes[0]})" if notes else "ok"


def segment_series(
    segmenter, paths: list[Path], *, model_hash: str, series_uid: str | None = None,
    dicom_out: bool = True, on_chunk: Callable[[int, list, list, int], None] | None = None,
    chunk: int = CHUNK_FRAMES, revision: int = 0,
) -> SeriesResult:
    """Segment every volume of one series; a volume that fails is reported, the others still count.

    dicom_out: build each volume's DICOM outputs (SEG, or Secondary Captures). on_chunk: called
    with (volume index, frames, masks, first frame index) while a chunk's frames are decoded.
    chunk: slices decoded and segmented at a time. revision: how many times an instance of the
    series was replaced by other bytes (serve): a revision gives new output UIDs and a higher
    InstanceNumber, so the SEG of changed pixels supersedes the old one instead of reusing its UID.
    """
    result = SeriesResult(series_uid or "", {p.stem for p in paths})
    for index, group in enumerate(dicom_volumes(paths)):
        volume_result = VolumeResult()
        result.volumes.append(volume_result)
        try:
            volume = DicomSeries(group) if len(group) > 1 else read_dicom(group[0])
            hook = None if on_chunk is None else (lambda f, m, s, i=index: on_chunk(i, f, m, s))
            masks, volume_result.infer_ms = segment_frames(segmenter, volume, on_chunk=hook, chunk=chunk)
            if dicom_out:
                uid = result.series_uid or str(volume.source[0].get("SeriesInstanceUID", ""))
                volume_result.datasets, volume_result.note = dicom_results(
                    volume.source, _LazyFrames(volume), masks, modality_name=segmenter.modality,
                    series_uid=derived_uid(model_hash, uid, "seg-series"),
                    sop_uid=derived_uid(model_hash, *sorted(str(ds.get("SOPInstanceUID", "")) for ds in volume.source),
                                        *([f"revision {revision}"] if revision else [])),
                    instance_number=len(result.instances) + revision,
                )
        except INPUT_ERRORS as exc:  # a bad volume: reported, the rest go on
            volume_result.error = first_line(exc)
            continue
        volume_result.frames = len(masks)
        volume_result.foreground = sum(int(np.count_nonzero(m)) for m in masks)
        volume_result.pixels = sum(m.size for m in masks)
    return result


class _LazyFrames:
    """A volume's display frames, decoded only if a Secondary Capture fallback draws on them."""

    def __init__(self, volume: DicomSeries | MedicalImage) -> None:
        self._volume = volume
        self._frames: list[np.ndarray] | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._frames is None:
            self._frames = _all_frames(self._volume)
        return iter(self._frames)


def output_format(requested: str, kind: str) -> str:
    """The format to write for an input of `kind` ("raster", "nifti", "dicom")."""
    if requested == "auto":
        return {"raster": "png", "nifti": "nifti", "dicom": "dicom-seg"}[kind]
    if requested == "nifti" and kind != "nifti":
        raise UsageError("--format nifti needs a NIfTI input (its affine and header are reused)")
    if requested == "dicom-seg" and kind != "dicom":
        raise UsageError("--format dicom-seg needs a DICOM input (the SEG references its instances)")
    return requested


def unique_name(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate


@dataclass
class PredictOptions:
    """What `espmed predict` writes, and where."""

    out: Path
    fmt: str = "auto"
    overlay: bool = False
    axis: int = 2
    model_hash: str = ""


def run_job(job: Job, segmenter, opts: PredictOptions, used: set[str]) -> Outcome:
    """Read, segment and write one job; a bad input is the outcome's error, never an exception."""
    name = unique_name(job.name, used)
    try:
        if job.series:
            return _run_series(job, segmenter, opts, name)
        return _run_image(job, segmenter, opts, name)
    except INPUT_ERRORS as exc:  # UsageError (a format the input cannot have) included
        return Outcome(job.label, error=first_line(exc))


def _frame_files(opts: PredictOptions, fmt: str, name: str, many: bool, outputs: list[Path]) -> ChunkHook:
    """Writes each chunk's mask PNGs (when `fmt` is png) and overlay PNGs as they are segmented."""

    def write(frames: list[np.ndarray], masks: list[np.ndarray], start: int) -> None:
        for i, (frame, mask) in enumerate(zip(frames, masks, strict=True), start):
            tag = f"_{i:04d}" if many else ""
            if fmt == "png":
                outputs.append(write_mask_png(opts.out / f"{name}{tag}_mask.png", mask))
            if opts.overlay:
                outputs.append(write_overlay_png(opts.out / f"{name}{tag}_overlay.png", to_rgb_uint8(frame), mask))

    return write


def _run_image(job: Job, segmenter, opts: PredictOptions, name: str) -> Outcome:
    image = read_image(job.paths[0], opts.axis)
    fmt = output_format(opts.fmt, image.kind)
    outputs: list[Path] = []
    hook = _frame_files(opts, fmt, name, len(image.frames) > 1, outputs)
    masks, infer_ms = segment_frames(segmenter, image, on_chunk=hook)
    if fmt == "nifti":
        outputs.append(write_nifti_mask(opts.out / f"{name}_mask.nii.gz", image, masks))
    return Outcome(
        job.label, frames=len(masks), infer_ms=infer_ms / len(masks), outputs=outputs,
        foreground=sum(int(np.count_nonzero(m)) for m in masks) / sum(m.size for m in masks),
    )


def _run_series(job: Job, segmenter, opts: PredictOptions, name: str) -> Outcome:
    fmt = output_format(opts.fmt, "dicom")
    volumes = dicom_volumes(job.paths)
    names = [name] if len(volumes) == 1 else [f"{name}_v{i + 1}" for i in range(len(volumes))]
    outputs: list[Path] = []
    many = [len(v) > 1 or _multi_frame(v[0]) for v in volumes]
    hooks = [_frame_files(opts, fmt, n, m, outputs) for n, m in zip(names, many, strict=True)]
    result = segment_series(
        segmenter, job.paths, model_hash=opts.model_hash, dicom_out=fmt == "dicom-seg",
        on_chunk=lambda i, frames, masks, start: hooks[i](frames, masks, start),
    )
    for volume_name, volume in zip(names, result.volumes, strict=True):
        if volume.note is None:
            outputs.extend(save_dicom(opts.out / f"{volume_name}_seg.dcm", ds) for ds in volume.datasets)
        else:
            outputs.extend(save_dicom(opts.out / f"{volume_name}_{i:04d}_overlay_sc.dcm", ds)
                           for i, ds in enumerate(volume.datasets))
    done = [v for v in result.volumes if not v.error]
    frames = sum(v.frames for v in done)
    return Outcome(
        job.label, frames=frames, outputs=outputs,
        infer_ms=sum(v.infer_ms for v in done) / frames if frames else 0.0,
        foreground=sum(v.foreground for v in done) / max(1, sum(v.pixels for v in done)),
        error=(result.errors[0] if len(result.volumes) == 1 else f"{job.label}: {result.result}")
        if result.errors else None,
        warning=next((v.note for v in result.volumes if v.note), None),
    )


def _multi_frame(path: Path) -> bool:
    """Whether one DICOM file holds several frames (its masks are then numbered per frame)."""
    try:
        return int(read_dataset(path, header_only=True).get("NumberOfFrames", 1) or 1) > 1
    except (EspmedError, ValueError, TypeError):
        return False
