"""Deliver each destination's outbox, by C-STORE or DICOMweb STOW-RS: retry with exponential backoff,
then a dead letter.

One thread per destination. An item leaves the outbox only when the destination took it (C-STORE:
Success, or a Warning, which PS3.4 counts as stored; STOW-RS: see `stow_result`), or answered that it
already holds it, so that a re-delivery after a crash is not a failure; after `tries` failed attempts
it moves to the dead-letter folder, where it stays until an operator moves it back. Nothing is
deleted unsent.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from ..errors import EspmedError, first_line
from .destinations import Destination, DicomWebDestination
from .spool import Spool
from .status import Status

if TYPE_CHECKING:
    import requests

log = logging.getLogger("espmed.serve")

#: C-STORE response statuses meaning "stored": Success and the Warning statuses (PS3.4 B.2.3).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
#: The SOP classes a node sends: what `espmed.io.dicom.dicom_results` makes.
SENT_CLASSES = (SegmentationStorage, SecondaryCaptureImageStorage)
#: STOW-RS FailureReason "Duplicate SOP Instance" (PS3.4 Table GG.4-1 / C.4.2.1.4): already held.
DUPLICATE = 0x0111
#: Seconds any one request (association step, HTTP request) may take.
TIMEOUT = 30


@dataclass(frozen=True)
class Retry:
    """Attempts per item and the backoff between them: base * 2**(n-1) seconds, at most cap."""

    tries: int = 10
    base: float = 2.0
    cap: float = 300.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.base * 2 ** max(0, failures - 1))


class Sender(threading.Thread):
    """Sends one destination's outbox until `stop` is set; `wake` to look at the outbox now.

    `tls`: the ssl.SSLContext for a tls:// C-STORE destination; `session`: the requests.Session
    (verification, client certificate, authentication) for a DICOMweb one. `make_sender` builds
    both from the node's configuration."""

    def __init__(self, *, destination: Destination | DicomWebDestination, spool: Spool, status: Status,
                 calling_aet: str, retry: Retry, stop: threading.Event, tls: ssl.SSLContext | None = None,
                 session: requests.Session | None = None) -> None:
        super().__init__(name=f"send-{destination.key}", daemon=True)
        self.destination = destination
        self.spool = spool
        self.status = status
        self.calling_aet = calling_aet
        self.retry = retry
        self.stop = stop
        self.wake = threading.Event()
        self.tls = tls
        self.client = None
        if isinstance(destination, DicomWebDestination):
            from dicomweb_client import DICOMwebClient

            if session is None:
                session = dicomweb_session(None)
            self.client = DICOMwebClient(destination.base, session=session, timeout=TIMEOUT)
            self.client.set_http_retry_params(retry=False)  # `retry` is the only retry
        self._not_before: dict[str, float] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            ready = [p for p in self.spool.outbox(self.destination.key)
                     if self._not_before.get(p.name, 0.0) <= time.monotonic()]
            if ready:
                try:
                    self._stow(ready) if self.client is not None else self._c_store(ready)
                except Exception as exc:  # noqa: BLE001 - keep the outbox moving; the items stay queued
                    message = f"sending to {self.destination}: unexpected {first_line(exc, with_type=True)}"
                    log.exception(message)
                    self.status.error(message)
                    self.stop.wait(self.retry.base)
            self.wake.wait(0.5)
            self.wake.clear()

    def _c_store(self, items: list[Path]) -> None:
        from pynetdicom import AE

        d = self.destination
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
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
                    self._delivered(item)
                else:
                    self._failed(item, "no response" if code < 0 else f"status 0x{code:04X}")
                if not assoc.is_established:
                    for rest in items[items.index(item) + 1:]:
                        self._failed(rest, "association lost")
                    break
        finally:
            if assoc.is_established:
                assoc.release()

    def _stow(self, items: list[Path]) -> None:
        """STOW-RS, one instance per request; a server that cannot be reached fails the rest too."""
        import pydicom
        import requests
        from pydicom.errors import InvalidDicomError

        for n, item in enumerate(items):
            if self.stop.is_set():
                break
            try:
                ds = pydicom.dcmread(item)
                uid = str(ds.SOPInstanceUID)
            except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
                self._failed(item, f"unreadable: {first_line(exc, with_type=True)}")
                continue
            try:
                why = stow_result(None, self.client.store_instances([ds]), uid)
            except requests.HTTPError as exc:
                why = stow_result(exc.response.status_code, _answer(exc.response), uid, _first_line(exc.response.text))
            except requests.exceptions.SSLError as exc:  # the server is up: not "destination down?"
                for rest in items[n:]:
                    self._failed(rest, f"TLS handshake failed (server certificate not trusted by dicomweb_ca, or "
                                       f"client certificate missing or refused?): {_reason(exc)}")
                return
            except (requests.ConnectionError, requests.Timeout) as exc:
                for rest in items[n:]:
                    self._failed(rest, f"cannot connect (destination down?): {_reason(exc)}")
                return
            except (requests.RequestException, ValueError) as exc:
                why = first_line(exc, with_type=True)
            if why is None:
                self._delivered(item)
            else:
                self._failed(item, why)

    def _delivered(self, item: Path) -> None:
        self.spool.sent(item)
        self._not_before.pop(item.name, None)
        self.status.add("sent")
        log.info("sent %s to %s", item.stem, self.destination)

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


def stow_result(code: int | None, answer, sop_uid: str, body: str = "") -> str | None:
    """None when a STOW-RS response means the server holds `sop_uid`, else why not, in a few words.

    code: the HTTP status, None for a 2xx (whose dataset `answer` is); answer: the response's Store
    Instances Response dataset where there was one; body: the first line of an error response. Held:
    listed in ReferencedSOPSequence (and not failed for another reason), listed in FailedSOPSequence
    as a duplicate (0x0111), or HTTP 409 Conflict, which some servers answer for an instance they
    already have. Orthanc 1.10 with DICOMweb 1.7 answers a repeat with 200 and the instance in
    ReferencedSOPSequence."""
    failed = {str(i.get("ReferencedSOPInstanceUID", "")): int(i.get("FailureReason", -1))
              for i in getattr(answer, "FailedSOPSequence", None) or []}
    referenced = {str(i.get("ReferencedSOPInstanceUID", ""))
                  for i in getattr(answer, "ReferencedSOPSequence", None) or []}
    reason = failed.get(sop_uid)
    if code == 409 or reason == DUPLICATE or (sop_uid in referenced and reason is None):
        return None
    status = "HTTP 2xx" if code is None else f"HTTP {code}"
    if reason is not None:
        return f"{status}, FailureReason 0x{reason:04X}" if reason >= 0 else f"{status}, failed without a reason"
    if code is None:
        return f"{status} without the instance in ReferencedSOPSequence"
    return f"{status}: {body}" if body else status


def _answer(response):
    """The Store Instances Response dataset of an error response, if it carries one in JSON."""
    import pydicom

    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _first_line(text: str) -> str:
    """An error body's first non-blank line, cut short (it may be a page of HTML)."""
    return next((line.strip()[:120] for line in text.splitlines() if line.strip()), "")


def _reason(exc: Exception) -> str:
    """The innermost cause of a requests error: its own message nests a page of urllib3 context."""
    while exc.__cause__ is not None or (exc.args and isinstance(exc.args[0], Exception)):
        exc = exc.__cause__ or exc.args[0]
    return first_line(exc, with_type=True)


def check_dicomweb_settings(config) -> tuple:
    """The dicomweb_* settings (ca, cert, key, username, password, token) once they make sense
    together: a certificate with its key, a user with a password, basic or bearer but not both."""
    ca, cert, key, username, password, token = (
        getattr(config, f"dicomweb_{name}", None) for name in ("ca", "cert", "key", "username", "password", "token")
    )
    if bool(cert) != bool(key):
        raise EspmedError("dicomweb_cert and dicomweb_key go together")
    if (username is None) != (password is None):
        raise EspmedError("dicomweb_username and dicomweb_password go together")
    if token and username is not None:
        raise EspmedError("dicomweb_token (bearer) and dicomweb_username/dicomweb_password (basic): give one")
    return ca, cert, key, username, password, token


def dicomweb_session(config) -> requests.Session:
    """The requests.Session for DICOMweb destinations, from the config file's dicomweb_* settings:
    the server's certificate is always verified (against `dicomweb_ca`, else the system's CAs); a
    client certificate; basic or bearer authentication. Nothing is taken from the environment
    (proxies, .netrc, REQUESTS_CA_BUNDLE), so the config file says all there is."""
    import requests

    ca, cert, key, username, password, token = check_dicomweb_settings(config)
    try:  # load them now: a wrong path or key is one error at start, not a failure per instance
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert:
            context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        given = ", ".join(str(p) for p in (ca, cert, key) if p)
        raise EspmedError(f"TLS to DICOMweb destinations: cannot load {given} ({exc})") from None
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry as ConnectionRetry

    session = requests.Session()
    session.trust_env = False
    # A kept-alive connection the server closed meanwhile (Orthanc's web server drops idle ones
    # within seconds) fails the next request before it is answered: try that request once more at
    # once, on a new connection. Storing an instance twice is harmless (a held one counts as
    # delivered); HTTP error statuses are not retried here (the sender's own Retry does that).
    adapter = HTTPAdapter(max_retries=ConnectionRetry(total=1, connect=1, read=1, status=0, other=0,
                                                      allowed_methods=None, raise_on_status=False))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.verify = str(ca) if ca else True
    if cert:
        session.cert = (str(cert), str(key))
    if username is not None:
        session.auth = (username, password)
    elif token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def make_sender(destination: Destination | DicomWebDestination, *, spool: Spool, status: Status, calling_aet: str,
                retry: Retry, stop: threading.Event, config) -> Sender:
    """The sender for one destination of the node configured by `config` (a ServeConfig): TLS for a
    tls:// C-STORE destination, the DICOMweb settings for a dicomweb+ one. Bad settings raise here,
    before anything is sent."""
    common = dict(destination=destination, spool=spool, status=status, calling_aet=calling_aet, retry=retry,
                  stop=stop)
    if isinstance(destination, DicomWebDestination):
        if destination.base.startswith("http:") and any(
                getattr(config, f"dicomweb_{n}", None) for n in ("username", "token")):
            log.warning("%s: credentials go over plain http", destination)
        return Sender(**common, session=dicomweb_session(config))
    from .server import destination_tls

    return Sender(**common, tls=destination_tls(config) if destination.tls else None)
