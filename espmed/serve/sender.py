"""Deliver each destination's outbox by C-STORE: retry with exponential backoff, then a dead letter.

One thread per destination. An item leaves the outbox only when the destination answered
Success (or a Warning, which PS3.4 counts as stored); after `tries` failed attempts it moves to the
dead-letter folder, where it stays until an operator moves it back. Nothing is deleted unsent.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from ..errors import first_line
from .spool import Spool
from .status import Status

log = logging.getLogger("espmed.serve")

#: C-STORE response statuses meaning "stored": Success and the Warning statuses (PS3.4 B.2.3).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
#: The SOP classes a node sends: what `espmed.io.dicom.dicom_results` makes.
SENT_CLASSES = (SegmentationStorage, SecondaryCaptureImageStorage)


@dataclass(frozen=True)
class Retry:
    """Attempts per item and the backoff between them: base * 2**(n-1) seconds, at most cap."""

    tries: int = 10
    base: float = 2.0
    cap: float = 300.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.base * 2 ** max(0, failures - 1))


class Sender(threading.Thread):
    """Sends one destination's outbox until `stop` is set; `wake` to look at the outbox now."""

    def __init__(self, *, destination, spool: Spool, status: Status, calling_aet: str, retry: Retry,
                 stop: threading.Event, tls=None) -> None:
        super().__init__(name=f"send-{destination.key}", daemon=True)
        self.destination = destination
        self.spool = spool
        self.status = status
        self.calling_aet = calling_aet
        self.retry = retry
        self.stop = stop
        self.wake = threading.Event()
        self.tls = tls  # ssl.SSLContext for a tls:// destination
        self._not_before: dict[str, float] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            ready = [p for p in self.spool.outbox(self.destination.key)
                     if self._not_before.get(p.name, 0.0) <= time.monotonic()]
            if ready:
                try:
                    self._send(ready)
                except Exception as exc:  # noqa: BLE001 - keep the outbox moving; the items stay queued
                    message = f"sending to {self.destination}: unexpected {first_line(exc, with_type=True)}"
                    log.exception(message)
                    self.status.error(message)
                    self.stop.wait(self.retry.base)
            self.wake.wait(0.5)
            self.wake.clear()

    def _send(self, items: list[Path]) -> None:
        from pynetdicom import AE

        d = self.destination
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for uid in SENT_CLASSES:
            ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title,
                             tls_args=(self.tls, d.host) if self.tls is not None else None)
        if not assoc.is_established:
            down = "no TLS association (destination down, or its certificate not trusted?)" if self.tls else \
                "no association (destination down?)"
            why = "association rejected" if assoc.is_rejected else down
            for item in items:
                self._failed(item, why)
            return
        try:
            for item in items:
                if self.stop.is_set():
                    break
                try:
                    response = assoc.send_c_store(item)
                except (OSError, ValueError, RuntimeError) as exc:
                    self._failed(item, first_line(exc, with_type=True))
                    continue
                code = int(getattr(response, "Status", -1)) if response else -1
                if code in STORED:
                    self.spool.sent(item)
                    self._not_before.pop(item.name, None)
                    self.status.add("sent")
                    log.info("sent %s to %s", item.stem, d)
                else:
                    self._failed(item, "no response" if code < 0 else f"status 0x{code:04X}")
                if not assoc.is_established:
                    for rest in items[items.index(item) + 1:]:
                        self._failed(rest, "association lost")
                    break
        finally:
            if assoc.is_established:
                assoc.release()

    def _failed(self, item: Path, why: str) -> None:
        if not item.is_file():
            return
        tries = self.spool.tries(item) + 1
        self.status.add("send_failures")
        if tries >= self.retry.tries:
            target = self.spool.bury(item, self.destination.key)
            self._not_before.pop(item.name, None)
            self.status.add("dead_lettered")
            message = f"gave up sending {item.stem} to {self.destination} after {tries} tries ({why}); kept in {target}"
            self.status.error(message)
            log.error(message)
            return
        self.spool.record_try(item, tries)
        delay = self.retry.delay(tries)
        self._not_before[item.name] = time.monotonic() + delay
        message = f"send {item.stem} to {self.destination} failed ({why}); try {tries + 1} in {delay:.1f} s"
        self.status.error(message)
        log.warning(message)
