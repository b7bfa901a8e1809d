"""Counters, the last errors and the status file (`<spool>/status.json`), read by `espmed serve --status`."""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path

from ..atomic import write_text

COUNTERS = (
    "associations", "associations_rejected", "connections_refused", "echoes", "instances_received",
    "instances_changed", "instances_refused", "series_segmented", "series_failed", "series_unrouted",
    "frames_segmented", "sent", "send_failures", "dead_lettered",
)
#: How many recent errors the status file keeps.
LAST_ERRORS = 20


class Status:
    """Thread-safe counters plus the work in progress; `write` publishes them atomically."""

    def __init__(self, path: Path, info: dict) -> None:
        self.path = Path(path)
        self.info = info
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.refusals: collections.Counter = collections.Counter()  # connections closed, by reason
        self.by_route: collections.Counter = collections.Counter()  # series segmented, by route name
        self.errors: collections.deque = collections.deque(maxlen=LAST_ERRORS)
        self.state = "starting"
        self.segmenting: str | None = None
        self.waiting = 0
        self._lock = threading.Lock()
        self._written = 0.0

    def add(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self.counts[counter] += n

    def refused(self, reason: str) -> None:
        """One connection closed before (or instead of) negotiating, for `reason`."""
        with self._lock:
            self.counts["connections_refused"] += 1
            self.refusals[reason] += 1

    def routed(self, route: str) -> None:
        """One series segmented by the route named `route`."""
        with self._lock:
            self.by_route[route] += 1

    def error(self, message: str) -> None:
        with self._lock:
            self.errors.append({"time": _now(), "error": message})

    def write(self, queue: dict, *, force: bool = True) -> None:
        """Publish the status; unforced writes are skipped within a second of the last one."""
        with self._lock:
            if not force and time.monotonic() - self._written < 1.0:
                return
            self._written = time.monotonic()
            data = {
                **self.info, "pid": os.getpid(), "state": self.state, "updated": _now(),
                "queue": {"series_waiting": self.waiting, "segmenting": self.segmenting, **queue},
                "counts": dict(self.counts), "series_by_route": dict(self.by_route),
                "connections_refused_by_reason": dict(self.refusals),
                "last_errors": list(self.errors),
            }
        write_text(self.path, json.dumps(data, indent=1))


def read_status(spool: Path) -> dict:
    """The status file, with the outbox / dead-letter depths counted afresh from the folders."""
    from .spool import queue_counts

    path = Path(spool) / "status.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {"state": "no status file"}
    data.setdefault("queue", {}).update(queue_counts(Path(spool)))
    data["running"] = _alive(int(data.get("pid", 0) or 0)) and data.get("state") == "running"
    return data


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
