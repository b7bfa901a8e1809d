"""One segmentation pipeline under `espmed predict` and `espmed serve`.

inputs -> jobs (`collect_jobs`: a file, or the DICOM files of one series) -> volumes (one DICOM
rule, `io.dicom.dicom_volumes`) -> frames streamed through the segmenter `CHUNK_FRAMES` at a time
(a DICOM series is decoded chunk by chunk, so memory follows the chunk, not the series) -> outputs.
DICOM outputs are the same in both commands: a SEG per volume (Secondary Capture overlays where
the source cannot have one) whose UIDs derive from the model hash and the source UIDs, so the same
instances always give the same output instances. `predict` writes files (`run_job`); `serve` queues
the datasets (`segment_series`).

Box prompts (predict): `prompt_boxes` gives each job its boxes (`--box`, `--boxes FILE.json`; a
MedSAM-on-Laptop `.npz` carries its own), `check_prompts` refuses a model that cannot honour them
before anything runs, and a job with boxes writes one label image (value k = box k) with its boxes'
IoU estimates and pixel counts, a `.npz` of `segs`, or a SEG of one segment per box (`_run_boxes`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import file_sha256, write_text
from .errors import EspmedError, PromptError, UsageError, first_line
from .io import is_supported, read_image, write_label_png, write_mask_png, write_nifti_mask, write_overlay_png
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
from .io.dicom_seg import Algorithm, derived_uid, dicom_results, save_dicom
from .io.npz import is_npz, write_npz_segs
from .runtimes.boxes import check_boxes

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
    boxes: int = 0  # box prompts segmented (0: self-prompted)


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
                    algorithm=algorithm_of(segmenter, "self"),
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
    boxes: dict[Path, np.ndarray] = field(default_factory=dict)  # job label -> its boxes (`prompt_boxes`)


def run_job(job: Job, segmenter, opts: PredictOptions, used: set[str]) -> Outcome:
    """Read, segment and write one job; a bad input is the outcome's error, never an exception."""
    name = unique_name(job.name, used)
    try:
        if job.label in opts.boxes or is_npz(job.label):
            return _run_boxes(job, segmenter, opts, name)
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


# -- box prompts ---------------------------------------------------------------------------------------
def algorithm_of(segmenter, prompt: str) -> Algorithm:
    """A SEG's Algorithm Identification from the model's metadata: its preset, espmed's version with the
    checkpoint's identity (so two models' SEGs differ), the target and the prompt ("self" or "boxes")."""
    m = segmenter.metadata
    sha = m.source_checkpoint_sha256
    parameters = {"prompt": prompt, "target": m.target, "checkpoint_sha256": sha}
    if prompt == "self":  # a box path may run on the shared trunk, under no modality's controller
        parameters["modality"] = m.modality
    return Algorithm(name=f"{m.preset} (espmed)", version=f"{m.espmed_version}+{sha[:12]}" if sha else m.espmed_version,
                     parameters=parameters)


def parse_box(text: str) -> list[float]:
    """`--box x0,y0,x1,y1` -> four numbers, checked by the box rules (clipped later, to the image)."""
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise PromptError(f"--box {text!r}: expected x0,y0,x1,y1 (four numbers)")
    check_boxes(box, (1, 1), f"--box {text}")  # non-finite or inverted; the image size only clips
    return box


def read_box_file(path: Path) -> dict[str, np.ndarray]:
    """`--boxes FILE.json`: {"<input path as given, or its file name>": [[x0, y0, x1, y1], ...], ...}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PromptError(f"{path}: cannot read the boxes file ({first_line(exc)})") from None
    except ValueError as exc:
        raise PromptError(f"{path}: not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict) or not data:
        raise PromptError(f'{path}: expected {{"<input>": [[x0, y0, x1, y1], ...], ...}}')
    return {key: _box_list(value, f"{path}: {key}") for key, value in data.items()}


def _box_list(value, where: str) -> np.ndarray:
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(value, list) or not all(isinstance(b, list) and all(map(number, b)) for b in value):
        raise PromptError(f"{where}: expected a list of [x0, y0, x1, y1] boxes")
    check_boxes(value, (1, 1), where)  # shape, non-finite or inverted; the image size only clips
    return np.asarray(value, np.float64)


def match_boxes(jobs: list[Job], given: dict[str, np.ndarray], source: str) -> dict[Path, np.ndarray]:
    """Each job's boxes from the key that names it: its path as given, or its file name. A key matching no
    input or several, or an input with no key or two, is one PromptError before anything runs."""
    labels = list(dict.fromkeys(job.label for job in jobs))
    hits = {key: [label for label in labels if Path(key) == label or key == label.name] for key in given}
    unmatched = [key for key, found in hits.items() if not found]
    if unmatched:
        raise PromptError(f"{source}: no input for key(s) {', '.join(map(repr, unmatched))}")
    several = next((key for key, found in hits.items() if len(found) > 1), None)
    if several is not None:
        raise PromptError(f"{source}: key {several!r} names {len(hits[several])} inputs; key them by path")
    keys = {label: [key for key, found in hits.items() if found == [label]] for label in labels}
    unkeyed = [str(label) for label, found in keys.items() if not found]
    if unkeyed:
        more = f" and {len(unkeyed) - 3} more" if len(unkeyed) > 3 else ""
        raise PromptError(f"{source}: no boxes for input(s) {', '.join(unkeyed[:3])}{more}")
    twice = next((label for label, found in keys.items() if len(found) > 1), None)
    if twice is not None:
        raise PromptError(f"{source}: {twice} has boxes under two keys ({', '.join(keys[twice])})")
    return {label: given[found[0]] for label, found in keys.items()}


def prompt_boxes(
    inputs: list[Path], jobs: list[Job], box: list[str], boxes_file: Path | None
) -> dict[Path, np.ndarray]:
    """Each job's boxes from `--box` (one image file) or `--boxes FILE.json`; {} without either."""
    if box and boxes_file is not None:
        raise UsageError("--box and --boxes cannot be used together")
    if not box and boxes_file is None:
        return {}
    npz = next((job.label for job in jobs if is_npz(job.label)), None)
    if npz is not None:
        raise UsageError(f"{npz}: a .npz input carries its own boxes; leave out --box and --boxes")
    if boxes_file is not None:
        return match_boxes(jobs, read_box_file(boxes_file), str(boxes_file))
    if len(inputs) != 1 or inputs[0].is_dir():
        raise UsageError("--box takes one image file; give several inputs their boxes with --boxes FILE.json")
    given = np.asarray([parse_box(text) for text in box])
    return {job.label: given for job in jobs}  # none for a missing file: reported as missing


def check_prompts(segmenter, jobs: list[Job], boxes: dict[Path, np.ndarray]) -> None:
    """Refuse, before anything runs, boxes for a model without a box path, and a box-only model
    (an exported box encoder) without boxes."""
    prompted = [job.label for job in jobs if job.label in boxes or is_npz(job.label)]
    if prompted and not segmenter.supports_boxes:
        raise PromptError(
            f"{segmenter.source.name}: this model has no box-prompted path, and {prompted[0]} has boxes; "
            "use a checkpoint with one (e.g. the shipped esp-medsam-real.safetensors) or its exported box encoder"
        )
    bare = [job.label for job in jobs if job.label not in boxes and not is_npz(job.label)]
    if bare and not segmenter.self_prompted:
        raise PromptError(f"{segmenter.source.name}: a box-prompted model segments boxes only; "
                          f"give {bare[0]} boxes (--box x0,y0,x1,y1 or --boxes FILE.json)")


def box_format(requested: str, kind: str) -> str:
    """The format a box job writes: a label PNG, the input's `.npz` (`segs`), or a SEG of one segment per box."""
    if requested == "auto":
        return {"dicom": "dicom-seg", "npz": "npz"}.get(kind, "png")
    if requested == "nifti":
        raise UsageError("box prompts write a label PNG, a .npz or a DICOM SEG, not NIfTI (use --format png)")
    return output_format(requested, kind)


def _run_boxes(job: Job, segmenter, opts: PredictOptions, name: str) -> Outcome:
    """One 2-D image, its boxes segmented on one embedding; written as `box_format` says."""
    if len(job.paths) > 1:
        raise PromptError(f"{job.label}: a series of {len(job.paths)} files; box prompts need one 2-D image")
    image = read_image(job.paths[0], opts.axis)
    if len(image.frames) != 1:
        raise PromptError(f"{job.label}: {len(image.frames)} frames; box prompts need one 2-D image")
    boxes = image.info.get("boxes") if image.kind == "npz" else opts.boxes[job.label]
    if boxes is None:
        raise PromptError(f"{job.label}: no 'boxes' array (a MedSAM-on-Laptop .npz holds imgs and boxes)")
    fmt = box_format(opts.fmt, image.kind)
    if fmt == "npz" and (opts.out / f"{name}.npz").resolve() == job.paths[0].resolve():
        raise UsageError(f"{job.label}: its segs would overwrite it; give another --out folder")
    frame = image.frames[0]
    pred = segmenter.decode(segmenter.embed(frame), boxes, source=str(job.label))
    labels = pred.label_image()
    outputs, note = _box_outputs(image, segmenter, opts, name, fmt, pred, labels)
    if opts.overlay:
        outputs.append(write_overlay_png(opts.out / f"{name}_overlay.png", to_rgb_uint8(frame), labels > 0))
    return Outcome(
        job.label, frames=1, outputs=outputs, boxes=len(pred.boxes),
        infer_ms=pred.timings["encoder"] + pred.timings["decoder"],
        foreground=float(np.count_nonzero(labels)) / labels.size,
        warning=note,
    )


def _box_outputs(
    image: MedicalImage, segmenter, opts: PredictOptions, name: str, fmt: str, pred, labels: np.ndarray
) -> tuple[list[Path], str | None]:
    """(outputs, note): the label image as `fmt` says (`<name>_mask.png`, `<name>.npz` or a SEG), and
    `<name>_boxes.json` beside a PNG or SEG (a `.npz` output holds `segs` only, as MedSAM-on-Laptop's do)."""
    if fmt == "npz":
        return [write_npz_segs(opts.out / f"{name}.npz", labels)], None
    note = None
    if fmt == "png":
        outputs = [write_label_png(opts.out / f"{name}_mask.png", labels)]
    else:
        outputs, note = _box_seg(image, segmenter, opts, name, pred)
    return [*outputs, _write_box_table(opts.out / f"{name}_boxes.json", image.path, pred)], note


def _box_seg(image: MedicalImage, segmenter, opts: PredictOptions, name: str, pred) -> tuple[list[Path], str | None]:
    """(files, note): a SEG of one segment per box (or Secondary Capture overlays, and why); its UIDs
    derive from the boxes too, so it never takes the self-prompted SEG's (or another box set's) UID."""
    source = image.source[0]
    boxes = json.dumps(pred.boxes.tolist())
    datasets, note = dicom_results(
        image.source, image.frames, pred.masks, modality_name=segmenter.modality,
        series_uid=derived_uid(opts.model_hash, str(source.get("SeriesInstanceUID", "")), "seg-series", "boxes"),
        sop_uid=derived_uid(opts.model_hash, str(source.get("SOPInstanceUID", "")), "boxes", boxes),
        algorithm=algorithm_of(segmenter, "boxes"), boxes=pred.boxes,
    )
    if note is None:
        return [save_dicom(opts.out / f"{name}_seg.dcm", datasets[0])], None
    return [save_dicom(opts.out / f"{name}_{i:04d}_overlay_sc.dcm", ds) for i, ds in enumerate(datasets)], note


def _write_box_table(path: Path, source: Path, pred) -> Path:
    """`<name>_boxes.json`: each box (as clipped to the image) with its label, IoU estimate and mask pixels."""
    rows = [
        json.dumps({"label": k, "box": box, "iou": round(float(iou), 4), "pixels": int(pixels)})
        for k, (box, iou, pixels) in enumerate(zip(pred.boxes.tolist(), pred.iou, pred.pixels, strict=True), 1)
    ]
    write_text(path, f'{{"input": {json.dumps(str(source))}, "boxes": [\n  ' + ",\n  ".join(rows) + "\n]}\n")
    return path
