"""One atomic-write helper for every file espmed writes (and the file hash the manifests use).

A file is written under a temporary name in the destination folder, flushed and fsync'ed, then
renamed over the final name, so an interrupted or failed write never leaves a partial file under
the final name. Torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`.

    For libraries that insist on writing to a path themselves. The temporary name keeps the
    final suffix (or `suffix`) so format sniffing by extension still works.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=(suffix if suffix is not None else final.suffix) + ".tmp",
        dir=final.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask).
        os.chmod(tmp_path, 0o666 & ~_umask())
        _fsync(tmp_path)
        os.replace(tmp_path, final)
        _fsync(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces `path` only if the block succeeds."""
    if "w" not in mode:
        raise ValueError("atomic_open is for writing")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def publish(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move a finished file (on the same file system) to `path` atomically and durably, with the
    mode a plain open() would give it: for files that arrive whole from elsewhere."""
    source, final = Path(source), Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(source, 0o666 & ~_umask())
    _fsync(source)
    os.replace(source, final)
    _fsync(final.parent)
    return final


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask races threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a rename is durable only once its folder is synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed (manifests, checkpoint provenance, calibration sets)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
