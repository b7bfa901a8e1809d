"""The spool: everything the node has acknowledged or still has to send, on disk, written atomically.

    incoming/<random>.dcm                                instances being received (pynetdicom writes here)
    instances/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received instances, bytes as sent
    instances/<SeriesInstanceUID>/.revision              times an instance was replaced by other bytes
    instances/<SeriesInstanceUID>/.calling_ae            the AE title that sent the series' first instance
    done/<SeriesInstanceUID>.json                        instances last segmented (or routed nowhere), and when
    outbox/<destination>/<SOPInstanceUID>.dcm            derived instances still to send
    outbox/<destination>/<SOPInstanceUID>.tries          failed attempts so far
    dead/<destination>/<SOPInstanceUID>.dcm              given up after the last try (kept)
    results/<SeriesInstanceUID>/<SOPInstanceUID>.dcm     outputs, when there is no destination
    status.json                                          see status.py

A series is pending while its instance files (or its revision) differ from its done record, so a
restart finds the work it was doing from the files alone. UIDs are file names only after `check_uid`.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

from ..atomic import publish, write_bytes, write_text
from ..errors import SpoolFull
from ..io.dicom_seg import save_dicom

#: Beside a series' instances: how many times one of them was replaced by other bytes.
REVISION = ".revision"
#: Beside a series' instances: the calling AE title it came from (routing reads it after a restart).
CALLING_AE = ".calling_ae"

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def check_uid(uid: str, what: str) -> str:
    """A UID safe to use as a file name and to write: digits and dots, at most 64 characters, the
    whole value (one trailing NUL or space of padding allowed, nothing else)."""
    text = str(uid)
    uid = text[:-1] if text.endswith(("\0", " ")) else text
    if not uid or len(uid) > 64 or not _UID.fullmatch(uid):
        raise ValueError(f"invalid {what} {text[:70]!r}")
    return uid


class Spool:
    """The spool folder and its byte accounting. Thread-safe."""

    def __init__(self, root: Path, *, series_bytes: int, spool_bytes: int, min_free_bytes: int) -> None:
        self.root = Path(root)
        self.series_limit = series_bytes
        self.spool_limit = spool_bytes
        self.min_free = min_free_bytes
        for sub in ("incoming", "instances", "done", "outbox", "dead"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.incoming = self.root / "incoming"
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}  # bytes set aside for outputs not yet written, per series
        self._series: dict[str, int] = {}
        for folder in (self.root / "instances").iterdir():
            if folder.is_dir():
                self._series[folder.name] = sum(p.stat().st_size for p in folder.glob("*.dcm"))
        derived = sum(_folder_bytes(self.root / sub) for sub in ("outbox", "dead", "results"))
        self._total = sum(self._series.values()) + derived

    # -- received instances ----------------------------------------------------------------------
    def store_instance(self, series_uid: str, sop_uid: str, data: bytes, check=None) -> str:
        """`store_file` for an instance held in memory."""
        incoming = self.incoming / f"{uuid.uuid4().hex}.dcm"
        write_bytes(incoming, data)
        return self.store_file(series_uid, sop_uid, incoming, check)

    def store_file(self, series_uid: str, sop_uid: str, source: Path, check=None, reserve: int = 0) -> str:
        """Move one received instance (a file under `incoming/`, which is always consumed) into the
        spool, within the limits (SpoolFull otherwise).

        check: called with the file before it is published; whatever it raises refuses the instance
        (nothing is kept), e.g. decoding it frame by frame. Returns "new", "same" (a resend of the
        stored bytes: nothing changes) or "changed" (other bytes under a stored SOP Instance UID:
        published, and the series' revision bumped, so it is segmented again). reserve: bytes set
        aside for the outputs the instance will give (counted against the spool limit until the
        series' outputs are written and `release` is called), so outputs never overrun the limit.
        """
        path = self.root / "instances" / series_uid / f"{sop_uid}.dcm"
        source = Path(source)
        try:
            size = source.stat().st_size
            existed = path.is_file()
            if existed and filecmp.cmp(source, path, shallow=False):
                return "same"
            with self._lock:
                old = path.stat().st_size if existed else 0
                grow = size - old
                series = self._series.get(series_uid, 0)
                if series + grow > self.series_limit:
                    raise SpoolFull(f"series {series_uid} would exceed the {_gib(self.series_limit)} per-series limit")
                if self._total + grow + reserve > self.spool_limit:
                    raise SpoolFull(f"spool would exceed its {_gib(self.spool_limit)} limit")
                free = shutil.disk_usage(self.root).free
                if free < self.min_free:
                    raise SpoolFull(f"disk free {_gib(free)} is at the {_gib(self.min_free)} floor")
                self._series[series_uid] = series + grow
                self._reserved[series_uid] = self._reserved.get(series_uid, 0) + reserve
                self._total += grow + reserve
            try:
                if check is not None:
                    check(source)
                publish(source, path)
            except BaseException:
                with self._lock:
                    self._series[series_uid] -= grow
                    self._reserved[series_uid] -= reserve
                    self._total -= grow + reserve
                raise
        finally:
            source.unlink(missing_ok=True)
        if not existed:
            return "new"
        with self._lock:
            write_text(path.with_name(REVISION), str(self.revision(series_uid) + 1))
        return "changed"

    def sweep_incoming(self, older_than: float = 0.0) -> int:
        """Remove received files never moved into the spool (a transfer cut off or aborted, a crash)
        that are older than `older_than` seconds. Returns how many."""
        removed = 0
        for path in self.incoming.glob("*"):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime >= older_than:
                    path.unlink()
                    removed += 1
        return removed

    def release(self, series_uid: str) -> None:
        """The series' outputs are written (and counted as files): drop what was set aside for them."""
        with self._lock:
            self._total -= self._reserved.pop(series_uid, 0)

    def revision(self, series_uid: str) -> int:
        """How many times a stored instance of the series was replaced by other bytes."""
        try:
            return int((self.root / "instances" / series_uid / REVISION).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return 0

    def note_caller(self, series_uid: str, calling_ae: str) -> None:
        """Record the AE title a series came from, once: the first sender's (call after `store_file`)."""
        path = self.root / "instances" / series_uid / CALLING_AE
        if not path.is_file():
            write_text(path, calling_ae)

    def caller(self, series_uid: str) -> str | None:
        """The calling AE title the series came from (None if not recorded)."""
        try:
            return (self.root / "instances" / series_uid / CALLING_AE).read_text(encoding="utf-8")
        except OSError:
            return None

    def instances(self, series_uid: str) -> list[Path]:
        return sorted((self.root / "instances" / series_uid).glob("*.dcm"))

    def series_uids(self) -> list[str]:
        return sorted(p.name for p in (self.root / "instances").iterdir() if p.is_dir())

    # -- done records ----------------------------------------------------------------------------
    def done(self, series_uid: str) -> set[str]:
        """SOP Instance UIDs covered by the last segmentation of the series."""
        return set(self._done_record(series_uid).get("instances", ()))

    def _done_record(self, series_uid: str) -> dict:
        """The series' done record ({} when there is none or it cannot be read)."""
        path = self.root / "done" / f"{series_uid}.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            instances = record.get("instances") if isinstance(record, dict) else None
            return record if isinstance(instances, list) and all(isinstance(u, str) for u in instances) else {}
        except (OSError, ValueError):
            return {}

    def mark_done(self, series_uid: str, instance_uids: set[str], outputs: list[str], result: str,
                  revision: int = 0, *, route: str = "", unrouted: bool = False) -> None:
        """Record what the series' last segmentation covered; route: the route that did it;
        unrouted: no route took it (not segmented; kept for `expire`'s unrouted_seconds)."""
        record = {"instances": sorted(instance_uids), "outputs": outputs, "result": result, "time": time.time(),
                  "revision": revision, "route": route, "unrouted": unrouted}
        write_text(self.root / "done" / f"{series_uid}.json", json.dumps(record, indent=1))

    def pending(self, series_uid: str) -> bool:
        """Whether the series' instances (or their bytes: its revision) differ from its done record."""
        stems = {p.stem for p in self.instances(series_uid)}
        record = self._done_record(series_uid)
        if stems != set(record.get("instances", ())):
            return True
        if not stems:
            return False
        try:
            return int(record.get("revision", 0)) != self.revision(series_uid)
        except (ValueError, TypeError):
            return True

    def expire(self, keep_seconds: float, *, unrouted_seconds: float | None = None) -> int:
        """Forget series segmented more than `keep_seconds` ago, and series no route took more than
        `unrouted_seconds` ago (default `keep_seconds`); their instances are kept until then so that a
        late instance can reopen the series. Returns how many were removed."""
        removed = 0
        for record in (self.root / "done").glob("*.json"):
            uid = record.stem
            try:
                data = json.loads(record.read_text(encoding="utf-8"))
                done_at, unrouted = float(data["time"]), data.get("unrouted") is True
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            keep = unrouted_seconds if unrouted and unrouted_seconds is not None else keep_seconds
            if time.time() - done_at < keep or self.pending(uid):
                continue
            with self._lock:
                shutil.rmtree(self.root / "instances" / uid, ignore_errors=True)
                record.unlink(missing_ok=True)
                self._total -= self._series.pop(uid, 0) + self._reserved.pop(uid, 0)
            removed += 1
        return removed

    # -- outbox and dead letters -------------------------------------------------------------------
    def queue(self, destination: str, sop_uid: str, ds) -> None:
        """Put a derived dataset in a destination's outbox (a re-made identical one replaces it)."""
        self._save(self.root / "outbox" / destination / f"{sop_uid}.dcm", ds)

    def keep_result(self, series_uid: str, sop_uid: str, ds) -> None:
        """Without destinations, derived datasets stay in results/<series>/ for collection."""
        self._save(self.root / "results" / series_uid / f"{sop_uid}.dcm", ds)

    def _save(self, path: Path, ds) -> None:
        old = path.stat().st_size if path.is_file() else 0
        save_dicom(path, ds)
        with self._lock:
            self._total += path.stat().st_size - old

    def outbox(self, destination: str) -> list[Path]:
        folder = self.root / "outbox" / destination
        return sorted(folder.glob("*.dcm"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []

    def tries(self, item: Path) -> int:
        try:
            return int(item.with_suffix(".tries").read_text(encoding="ascii"))
        except (OSError, ValueError):
            return 0

    def record_try(self, item: Path, tries: int) -> None:
        write_text(item.with_suffix(".tries"), str(tries))

    def sent(self, item: Path) -> None:
        size = item.stat().st_size
        item.unlink()
        item.with_suffix(".tries").unlink(missing_ok=True)
        with self._lock:
            self._total -= size

    def bury(self, item: Path, destination: str) -> Path:
        """Move an undeliverable item to the dead-letter folder (kept; move it back to retry)."""
        dead = self.root / "dead" / destination
        dead.mkdir(parents=True, exist_ok=True)
        target = dead / item.name
        os.replace(item, target)
        item.with_suffix(".tries").unlink(missing_ok=True)
        return target

    def counts(self) -> dict[str, dict[str, int]]:
        return queue_counts(self.root)

    @property
    def total_bytes(self) -> int:
        return self._total


def queue_counts(root: Path) -> dict[str, dict[str, int]]:
    """Items waiting in each destination's outbox and dead-letter folder of the spool at `root`."""

    def by_folder(folder: Path) -> dict[str, int]:
        if not folder.is_dir():
            return {}
        return {d.name: len(list(d.glob("*.dcm"))) for d in sorted(folder.iterdir()) if d.is_dir()}

    return {"outbox": by_folder(Path(root) / "outbox"), "dead_letter": by_folder(Path(root) / "dead")}


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.dcm"))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"

