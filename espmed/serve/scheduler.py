"""Series completion and the segmentation worker.

A series is due once `timeout` seconds passed without a new instance. The single worker (the
model uses all the cores it was given) routes each due series (`routing`), segments it with its
route's model, queues the outputs for the route's destinations, then writes the done record, so a
crash anywhere leaves the series pending and a restart redoes it with the same output UIDs. A
series no route takes gets a done record too (not segmented), so a restart does not route it again.
"""

from __future__ import annotations

import logging
import threading
import time

from ..errors import first_line
from ..pipeline import segment_series
from .routing import Router, describe, read_header
from .spool import Spool
from .status import Status

log = logging.getLogger("espmed.serve")
#: Seconds between sweeps for series past their retention.
EXPIRE_EVERY = 60.0
#: A received file not written to for this long belongs to a transfer that was cut off.
INCOMING_STALE_S = 600.0


class SeriesClock:
    """When each open series last received an instance (monotonic seconds). Thread-safe."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def touch(self, series_uid: str) -> None:
        with self._lock:
            self._last[series_uid] = time.monotonic()

    def take_due(self) -> list[str]:
        """The series whose timeout has passed, removed from the clock (oldest first)."""
        now = time.monotonic()
        with self._lock:
            due = sorted((t, uid) for uid, t in self._last.items() if now - t >= self.timeout)
            for _, uid in due:
                del self._last[uid]
            return [uid for _, uid in due]

    def __len__(self) -> int:
        with self._lock:
            return len(self._last)


class Worker(threading.Thread):
    """Segments due series and queues their outputs until `stop` is set."""

    def __init__(self, *, router: Router, spool: Spool, clock: SeriesClock, status: Status, senders: list,
                 destinations: list, keep_seconds: float, unrouted_keep_seconds: float,
                 stop: threading.Event) -> None:
        super().__init__(name="segment", daemon=True)
        self.router = router
        self.spool = spool
        self.clock = clock
        self.status = status
        self.senders = senders
        self.destinations = destinations  # the node's: for routes without their own
        self.keep_seconds = keep_seconds
        self.unrouted_keep_seconds = unrouted_keep_seconds
        self.stop = stop
        self._expired_at = 0.0

    def resume(self) -> int:
        """Put every pending series of the spool back on the clock (after a restart)."""
        pending = [uid for uid in self.spool.series_uids() if self.spool.pending(uid)]
        for uid in pending:
            self.clock.touch(uid)
        return len(pending)

    def run(self) -> None:
        while not self.stop.is_set():
            for uid in self.clock.take_due():
                if self.stop.is_set():
                    break
                if self.spool.pending(uid):
                    self._process_guarded(uid)
            if time.monotonic() - self._expired_at > EXPIRE_EVERY:
                self._expired_at = time.monotonic()
                self.spool.expire(self.keep_seconds, unrouted_seconds=self.unrouted_keep_seconds)
                self.spool.sweep_incoming(older_than=INCOMING_STALE_S)
            self.status.waiting = len(self.clock)
            self.status.write(self.spool.counts(), force=False)
            self.stop.wait(0.1)

    def _process_guarded(self, series_uid: str) -> None:
        """`process`, where an unexpected error (a full disk while queueing, a library bug) leaves
        the series pending and retries it a timeout later instead of stopping the worker."""
        try:
            self.process(series_uid)
        except Exception as exc:  # noqa: BLE001 - the node must keep serving the other series
            why = first_line(exc, with_type=True)
            message = f"series {series_uid}: unexpected {why}; retried in {self.clock.timeout} s"
            log.exception(message)
            self.status.error(message)
            self.status.segmenting = None
            self.clock.touch(series_uid)

    def process(self, series_uid: str) -> None:
        paths = self.spool.instances(series_uid)
        revision = self.spool.revision(series_uid)  # read first: a change during segmentation re-opens it
        header, calling = read_header(paths[0]), self.spool.caller(series_uid)
        routed = self.router.choose(header, calling)
        if routed is None:
            self.spool.mark_done(series_uid, {p.stem for p in paths}, [], "no route", revision, unrouted=True)
            self.status.add("series_unrouted")
            log.warning("series %s (%s) matched no route: not segmented; its %d instance(s) are kept %g h",
                        series_uid, describe(header, calling), len(paths), self.unrouted_keep_seconds / 3600)
            return
        route = routed.route
        destinations = route.where(self.destinations)
        self.status.segmenting = series_uid
        self.status.write(self.spool.counts())
        t0 = time.perf_counter()
        result = segment_series(routed.segmenter, paths, model_hash=routed.model_hash, series_uid=series_uid,
                                revision=revision)
        for ds in result.outputs:
            for d in destinations:
                self.spool.queue(d.key, str(ds.SOPInstanceUID), ds)
        if not destinations:
            for ds in result.outputs:
                self.spool.keep_result(series_uid, str(ds.SOPInstanceUID), ds)
        outputs = [str(ds.SOPInstanceUID) for ds in result.outputs]
        self.spool.mark_done(series_uid, result.instances, outputs, result.result, revision, route=route.name)
        self.spool.release(series_uid)
        for sender in self.senders:
            sender.wake.set()
        self.status.segmenting = None
        self.status.add("series_segmented" if result.outputs else "series_failed")
        self.status.add("frames_segmented", result.frames)
        self.status.routed(route.name)
        if result.errors:
            self.status.error(f"series {series_uid}: {result.result}")
        ms_frame = result.infer_ms / result.frames if result.frames else 0.0
        where = ", ".join(str(d) for d in destinations) or f"{self.spool.root / 'results'}"
        log.info(
            "series %s: route %s: %d instances, %d frames, %.1f ms/frame, %.0f ms total, %d output(s) -> %s; %s",
            series_uid, route.label, len(result.instances), result.frames, ms_frame,
            (time.perf_counter() - t0) * 1e3, len(outputs), where, result.result,
        )
        self.status.write(self.spool.counts())
