"""Manifests, hashes and the atomic publication of a multi-file artifact.

An export writes every file into a hidden staging folder beside the destination, then moves each
file over its final name with `os.replace` and writes the manifest LAST (through
`espmed.atomic`). A stale manifest is removed before the first move, so at no moment does a
manifest vouch for files it does not describe, and an interrupted export leaves nothing new under
a final name. Torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

from espmed.atomic import file_sha256, write_text
from espmed.runtimes.manifest import manifest_path
from espmed.runtimes.metadata import ArtifactMetadata

#: Libraries whose versions decide what an artifact computes.
TRACKED_LIBRARIES = (
    "torch", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "onnxsim", "onnxslim", "tensorrt",
)


def files_sha256(paths: Iterable[str | os.PathLike]) -> str:
    """One hash for a set of files: sha256 over their sorted sha256 hex digests."""
    digests = sorted(file_sha256(p) for p in paths)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def library_versions(names: Iterable[str] = TRACKED_LIBRARIES) -> dict[str, str]:
    """Installed versions of `names` (absent ones omitted): the libraries that took part in an export
    by default; the benchmark records its own list through this too."""
    versions = {}
    for name in names:
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[name] = importlib_metadata.version(name)
    return versions


@dataclass
class ExportResult:
    """What an export published: its main file, the manifest and every file it lists."""

    artifact: Path  # the main file (.onnx, .xml, .engine)
    manifest: Path
    metadata: ArtifactMetadata
    files: list[Path] = field(default_factory=list)  # every file of the artifact

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def manifest_dict(meta: ArtifactMetadata, files: Iterable[Path]) -> dict:
    return {
        "metadata": json.loads(meta.to_json()),
        "files": {Path(f).name: file_sha256(f) for f in files},
    }


@contextlib.contextmanager
def staging_dir(destination: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary folder beside `destination` (same file system, so renames are atomic);
    removed afterwards whatever happens."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".export-tmp", dir=destination.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(
    staged: list[Path], destination_dir: Path, meta: ArtifactMetadata, artifact_name: str
) -> tuple[list[Path], Path]:
    """Move staged files to their final names, then write the manifest (last).

    Returns (final file paths, manifest path). The first staged file is the main artifact.
    """
    destination_dir = Path(destination_dir)
    manifest = manifest_path(destination_dir / artifact_name)
    manifest.unlink(missing_ok=True)
    finals = []
    for f in staged:
        final = destination_dir / f.name
        os.replace(f, final)
        finals.append(final)
    write_text(manifest, json.dumps(manifest_dict(meta, finals), indent=2, sort_keys=True) + "\n")
    return finals, manifest
