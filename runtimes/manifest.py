"""Manifest check: the SHA-256 of every artifact file, written beside it by the exporter.

`<artifact file name>.manifest.json` = `{"metadata": {...}, "files": {"<name>": "<sha256>"}}`.
A present manifest must cover the artifact file, every listed file must exist and match, and its
metadata must equal the metadata embedded in the artifact. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

from espmed.atomic import file_sha256
from espmed.errors import ArtifactError, first_line

from .metadata import ArtifactMetadata


def manifest_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".manifest.json")


def read_listing(path: Path, what: str = "manifest") -> tuple[dict, dict]:
    """A manifest's JSON and its non-empty `files` table {name: sha256}; ArtifactError otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable {what} ({first_line(exc)})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}: manifest lists no files")
    return data, files


def check_listed_file(member: Path, expected: str, manifest: Path, damaged: str) -> None:
    """A listed file must exist and have the SHA-256 the manifest records; `damaged` names what broke."""
    if not member.is_file():
        raise ArtifactError(f"{member}: listed in {manifest.name} but missing")
    actual = file_sha256(member)
    if actual != expected:
        raise ArtifactError(
            f"{member}: SHA-256 {actual[:12]}... does not match {manifest.name} ({str(expected)[:12]}...); "
            f"{damaged} was modified or is corrupt"
        )


def verify_manifest(artifact: str | Path) -> ArtifactMetadata | None:
    """Check the files against a present manifest (ArtifactError on any mismatch).

    Returns the manifest's metadata for `check_manifest_metadata`, or None without a manifest.
    """
    artifact = Path(artifact)
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    data, files = read_listing(path)
    if artifact.name not in files:
        raise ArtifactError(f"{path}: manifest does not cover {artifact.name}")
    for name, expected in files.items():
        if Path(name).name != name:
            raise ArtifactError(f"{path}: manifest entry {name!r} is not a file name beside the artifact")
        check_listed_file(artifact.with_name(name), expected, path, artifact.name)
    if "metadata" not in data:
        raise ArtifactError(f"{path}: manifest has no metadata")
    listed = ArtifactMetadata.from_json(json.dumps(data["metadata"]), str(path))
    if listed.decoder is not None and listed.decoder not in files:
        raise ArtifactError(f"{path}: manifest does not cover the prompt decoder {listed.decoder}")
    return listed


def check_manifest_metadata(artifact: str | Path, listed: ArtifactMetadata, embedded: ArtifactMetadata) -> None:
    """The manifest must describe the same graph as the metadata embedded in the artifact."""
    if listed.to_json() != embedded.to_json():
        raise ArtifactError(
            f"{manifest_path(artifact)}: manifest metadata differs from the metadata inside {Path(artifact).name}"
        )
