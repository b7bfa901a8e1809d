"""The espmed TensorRT engine file: magic, length-prefixed JSON header, serialized engine.

    b"ESPMEDTRT\\0" | uint64 little-endian header length | ArtifactMetadata JSON (UTF-8) | engine

The exporter writes it (`write_engine`), `espmed.runtimes.tensorrt_engine` reads it. The TensorRT
version, GPU name and compute capability the engine was built with live in `metadata.extra`
(`tensorrt_version`, `gpu_name`, `compute_capability`). A serialized engine only runs on the TensorRT version and GPU
architecture that built it, so `check_compatible` refuses a mismatch before deserializing.
Torch-free and TensorRT-free, so the header is checked before TensorRT is needed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from espmed.atomic import atomic_open
from espmed.errors import ArtifactError

from .metadata import ArtifactMetadata

MAGIC = b"ESPMEDTRT\x00"
_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 1 << 20


@dataclass(frozen=True)
class EngineBuildInfo:
    """Where an engine was built, i.e. what it can run on."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "8.9"

    def to_extra(self) -> dict:
        return {
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
        }

    @classmethod
    def from_metadata(cls, meta: ArtifactMetadata, source: str = "engine") -> EngineBuildInfo:
        extra = meta.extra
        missing = [k for k in ("tensorrt_version", "gpu_name", "compute_capability") if not extra.get(k)]
        if missing:
            raise ArtifactError(f"{source}: engine header lacks {', '.join(missing)}")
        return cls(str(extra["tensorrt_version"]), str(extra["gpu_name"]), str(extra["compute_capability"]))


def pack(meta: ArtifactMetadata, engine: bytes) -> bytes:
    if not engine:
        raise ArtifactError("refusing to write an engine file without an engine")
    header = meta.to_json().encode("utf-8")
    if len(header) > MAX_HEADER_BYTES:
        raise ArtifactError(f"engine header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return MAGIC + _LENGTH.pack(len(header)) + header + bytes(engine)


def write_engine(path: str | Path, meta: ArtifactMetadata, engine: bytes) -> Path:
    """Write an engine file atomically; the metadata must name the TensorRT build."""
    EngineBuildInfo.from_metadata(meta, str(path))
    data = pack(meta, engine)
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def unpack(data: bytes, source: str = "engine") -> tuple[ArtifactMetadata, bytes]:
    if not data.startswith(MAGIC):
        raise ArtifactError(
            f"{source}: not an espmed TensorRT engine (missing header magic; a bare TensorRT plan has no espmed header)"
        )
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise ArtifactError(f"{source}: truncated engine header")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if length > MAX_HEADER_BYTES or start + length > len(data):
        raise ArtifactError(f"{source}: engine header length {length} is invalid for a {len(data)}-byte file")
    meta = ArtifactMetadata.from_json(data[start : start + length], source)
    engine = data[start + length :]
    if not engine:
        raise ArtifactError(f"{source}: engine file holds a header but no engine")
    return meta, engine


def read_engine(path: str | Path) -> tuple[ArtifactMetadata, bytes]:
    """(metadata, serialized engine) of an engine file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read engine file ({exc.strerror})") from None
    return unpack(data, str(path))


def read_metadata(path: str | Path) -> ArtifactMetadata:
    return read_engine(path)[0]


def check_compatible(meta: ArtifactMetadata, here: EngineBuildInfo, source: str = "engine") -> None:
    """Refuse an engine built for another TensorRT version or GPU than `here`."""
    built = EngineBuildInfo.from_metadata(meta, source)
    problems = []
    if built.tensorrt_version != here.tensorrt_version:
        problems.append(f"TensorRT {built.tensorrt_version} (this machine has {here.tensorrt_version})")
    if built.compute_capability != here.compute_capability:
        problems.append(f"compute capability {built.compute_capability} (this GPU is {here.compute_capability})")
    if built.gpu_name != here.gpu_name:
        problems.append(f"GPU {built.gpu_name!r} (this machine has {here.gpu_name!r})")
    if problems:
        raise ArtifactError(
            f"{source}: engine was built for {'; '.join(problems)}; rebuild it on this machine with "
            f"`espmed export --target {meta.target}`"
        )
