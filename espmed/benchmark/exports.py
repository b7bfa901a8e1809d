"""One export per target, cached in `--out/artifacts/<target>` while what it was made from matches:
the checkpoint hash, the options, the calibration images and recipe, the library versions and the
exporter's own source."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import file_sha256, write_text
from ..errors import EspmedError
from ..runtimes.formats import format_named
from .data import list_samples
from .model_prep import BenchModel
from .options import BenchOptions
from .versions import library_versions


@dataclass(frozen=True)
class Export:
    """A row's artifact; `seconds` is what its export took (None for the reference's checkpoint)."""

    artifact: Path
    reused: bool
    seconds: float | None


def calibration_dir(opts: BenchOptions, modality: str, out: Path) -> Path | None:
    """Where INT8 exports calibrate and gate: `--data` as given, except that a trained checkpoint on
    an indexed folder (the bundled samples) uses only the images of its modality (copied into
    `out/calibration/<modality>/`): another modality's images through this controller say nothing
    about its masks, and an INT8 gate on them refuses what the modality's own images accept."""
    if opts.checkpoint is None:
        return opts.data
    folder = Path(opts.data) if opts.data is not None else None
    if folder is not None and not (folder / "samples.json").is_file():
        return opts.data
    ours = [s for s in list_samples(folder) if s.modality == modality]
    if not ours:
        return opts.data
    dest = out / "calibration" / modality
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for s in ours:
        shutil.copyfile(s.image, dest / Path(s.image).name)
    return dest


def _calib_sha(data: str | None) -> str:
    from espmed.export.calibration import set_files
    from espmed.export.manifest import files_sha256

    return files_sha256(set_files(data))


def _export_key(target: str, model: BenchModel, opts: BenchOptions) -> dict:
    """What a cached export of `target` must have been made from."""
    calibrated = format_named(target).calibrated
    return {
        "target": target,
        "checkpoint_sha256": model.checkpoint_sha256,
        "image_size": model.image_size,
        "modality": model.modality,
        "batch": opts.batch,
        "dynamic": opts.batch > 1,
        "calibration_sha256": _calib_sha(model.calibration) if calibrated else None,
        "recipe_sha256": _recipe_sha(model.checkpoint) if calibrated else None,
        "int8_gate_max_drop": opts.max_drop if calibrated else None,
        "prompt": opts.prompt,
        "versions": library_versions(),
        "exporter_source_sha256": _exporter_source_sha256(),
    }


def _recipe_sha(checkpoint: str | Path) -> str | None:
    """The float-layer recipe an INT8 export of `checkpoint` reads (beside it), so that a re-ranked
    recipe is not answered with an artifact quantized by the old one."""
    from espmed.export.recipe import recipe_beside

    recipe = recipe_beside(Path(checkpoint))
    return file_sha256(recipe) if recipe.is_file() else None


def _cached(record_path: Path, key: dict) -> Export | None:
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            artifact = Path(record["artifact"])
            if record["key"] == key and _still_valid(artifact):
                return Export(artifact, True, record["export_s"])
        except (ValueError, KeyError, EspmedError):
            pass
    return None


def _artifact_dir(target: str, opts: BenchOptions, out: Path) -> Path:
    """Where `target`'s export is cached: self-prompted and box-prompted artifacts apart."""
    return out / "artifacts" / (target if opts.prompt == "self" else f"{opts.prompt}-{target}")


def cached_export(target: str, model: BenchModel, opts: BenchOptions, out: Path) -> Export | None:
    """The cached export of `target` in `out` (with the seconds it took), or None."""
    return _cached(_artifact_dir(target, opts, out) / "bench-export.json", _export_key(target, model, opts))


def export_artifact(target: str, model: BenchModel, opts: BenchOptions, out: Path) -> Export:
    """The cached export of `target` when its record matches, else a new one."""
    from espmed.export import export
    from espmed.runtimes.metadata import SHARED_TRUNK

    dest = _artifact_dir(target, opts, out)
    record_path = dest / "bench-export.json"
    key = _export_key(target, model, opts)
    found = _cached(record_path, key)
    if found is not None:
        return found
    gate = {"max_drop": opts.max_drop} if opts.max_drop is not None and opts.max_drop < 1.0 else {}
    t = time.perf_counter()
    with _quiet_root_logger():  # ONNX Runtime's quantizer logs advice at WARNING on the root logger
        result = export(
            Path(model.checkpoint),
            target,
            dest,
            modality=None if model.modality == SHARED_TRUNK else model.modality,
            imgsz=model.image_size,
            prompt=opts.prompt,
            batch=1,
            dynamic=opts.batch > 1,
            calib=model.calibration,
            **gate,
        )
    seconds = time.perf_counter() - t
    write_text(record_path, json.dumps({"key": key, "artifact": str(result.artifact), "export_s": seconds}, indent=2))
    return Export(Path(result.artifact), False, seconds)


def _still_valid(artifact: Path) -> bool:
    """A cached export still matches its manifest (a folder: the Triton repositories' manifest)."""
    from espmed.runtimes.manifest import verify_manifest
    from espmed.runtimes.triton_repository import verify_repository

    if artifact.is_dir():
        return bool(verify_repository(artifact))
    return artifact.is_file() and verify_manifest(artifact) is not None


def _exporter_source_sha256() -> str:
    """Identity of the export code itself: a changed exporter must not reuse old artifacts."""
    import espmed.export

    folder = Path(espmed.export.__file__).parent
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def artifact_files(artifact: Path) -> list[Path]:
    """The files of an artifact: those its manifest lists, else the file itself."""
    from espmed.runtimes.manifest import manifest_path

    if artifact.is_dir():  # a folder artifact (Triton repositories)
        return sorted(p for p in artifact.rglob("*") if p.is_file())
    mp = manifest_path(artifact)
    if mp.is_file():
        try:
            return [artifact.with_name(n) for n in json.loads(mp.read_text(encoding="utf-8"))["files"]]
        except (ValueError, KeyError):
            pass
    return [artifact]
