"""The association acceptor: who may connect, what it accepts, and the C-ECHO / C-STORE handlers.

Calling AE titles outside the allowlist are rejected at association. Presentation contexts are
the image storage SOP classes with every transfer syntax a decoder is installed for; anything
else is refused in negotiation. A C-STORE is answered Success only after the instance passed the
same checks as a `predict` input (SOP class, declared size, decodable pixels) and is in the spool;
otherwise it gets a failure status naming the reason, and the association goes on.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from ..errors import EspmedError, SpoolFull, first_line
from ..io.dicom import check_decodable, check_image_instance, decoded_bytes, frame_size, is_image_storage
from .scheduler import SeriesClock
from .spool import Spool, check_uid
from .status import Status

log = logging.getLogger("espmed.serve")

#: C-STORE failure statuses (PS3.4 B.2.3).
OUT_OF_RESOURCES = 0xA700
NOT_AN_IMAGE = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000
#: Largest command set accepted (a C-STORE or C-ECHO request's is a few hundred bytes).
MAX_COMMAND_BYTES = 64 * 1024
#: Uncompressed transfer syntaxes: always accepted. Not Deflated Explicit VR Little Endian: a few
#: hundred kB of it inflate to gigabytes before any size check could see them (a deflate bomb).
NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
#: Compressed transfer syntaxes, accepted when a pixel decoder for them is installed.
COMPRESSED_SYNTAXES = (
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
    HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, RLELossless,
)


def accepted_syntaxes() -> list[str]:
    """Native transfer syntaxes plus the compressed ones this machine can decode."""
    from pydicom.pixels import get_decoder

    from ..io.dicom_codecs import register

    register()
    return list(NATIVE_SYNTAXES) + [uid for uid in COMPRESSED_SYNTAXES if get_decoder(uid).is_available]


def storage_classes() -> list[str]:
    """The image storage SOP classes pynetdicom knows, in UID order."""
    from pynetdicom import AllStoragePresentationContexts

    return sorted({c.abstract_syntax for c in AllStoragePresentationContexts if is_image_storage(c.abstract_syntax)})


def tls_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """Server TLS; with `ca`, clients must present a certificate it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
        if ca is not None:
            context.load_verify_locations(cafile=str(ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise EspmedError(f"TLS: cannot load {cert} / {key}{f' / {ca}' if ca else ''} ({exc})") from None
    return context


def destination_tls(config) -> ssl.SSLContext:
    """The client TLS context for tls:// destinations: the server's certificate is verified (against
    `destination_ca`, else the system's CAs) and its name checked; a client certificate is
    presented when given (`config.validate` checks that the settings go together)."""
    given = [p for p in (config.destination_ca, config.destination_cert, config.destination_key) if p]
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.destination_ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if config.destination_cert:
            context.load_cert_chain(certfile=str(config.destination_cert), keyfile=str(config.destination_key))
    except (OSError, ssl.SSLError) as exc:
        raise EspmedError(f"TLS to destinations: cannot load {', '.join(map(str, given))} ({exc})") from None
    return context


class StoreHandler:
    """The C-STORE / C-ECHO / association event handlers over one spool."""

    def __init__(self, *, spool: Spool, clock: SeriesClock, status: Status, instance_bytes: int,
                 allow: list[str] | None = None, output_copies: int = 1) -> None:
        self.spool = spool
        self.clock = clock
        self.status = status
        self.instance_bytes = instance_bytes
        self.allow = allow or []
        self.output_copies = output_copies  # outboxes (or the one results/) of the route with the most
        # association -> [data-set, command-set] bytes of the messages being received (None: aborting)
        self._receiving: dict = {}

    def handlers(self) -> list:
        from pynetdicom import evt

        return [
            (evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_ACCEPTED, self.on_accepted), (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_DATA_RECV, self.on_data), (evt.EVT_CONN_CLOSE, self.on_closed),
        ]

    def on_echo(self, event) -> int:
        self.status.add("echoes")
        return 0x0000

    def on_accepted(self, event) -> None:
        self.status.add("associations")

    def on_rejected(self, event) -> None:
        self.status.add("associations_rejected")
        who = event.assoc.requestor
        if self.allow and who.ae_title not in self.allow:
            why = "calling AE title not allowed"
        else:
            why = f"all {event.assoc.ae.maximum_associations} association slots in use"
        message = f"association from {who.ae_title}@{who.address} rejected: {why}"
        self.status.error(message)
        log.warning(message)

    def on_data(self, event) -> None:
        """Count each association's message bytes as they arrive: pynetdicom writes a data set to
        disk before any C-STORE handler runs, and gathers a command set in memory, both without a
        bound. An instance a little over the limit is received and answered 0xA700 with the reason;
        a data set past twice the limit, or a command set past `MAX_COMMAND_BYTES`, aborts the
        association mid-transfer, so no transfer can fill the disk or the memory."""
        sizes = self._receiving.setdefault(event.assoc, [0, 0])  # data-set, command-set bytes so far
        if sizes is None:
            return  # being aborted: what still arrives before the socket closes is not counted again
        for control, length in _pdv_items(event.data):
            command = control & 1  # bit 0: a command fragment (else data set)
            sizes[command] += length
            if sizes[1] > MAX_COMMAND_BYTES:
                self._abort(event, f"command set passed {_size(MAX_COMMAND_BYTES)}")
                return
            if sizes[0] > 2 * self.instance_bytes:
                self._abort(event, f"instance transfer passed twice the {_size(self.instance_bytes)} limit")
                return
            if control & 2:  # bit 1: the last fragment: the next message starts from zero
                sizes[command] = 0

    def _abort(self, event, why: str) -> None:
        """Abort the association now, logged and counted as a refused instance; remove the file
        pynetdicom was writing the data set to."""
        self._receiving[event.assoc] = None
        who = event.assoc.requestor
        why = f"{why}; association aborted"
        self.status.add("instances_refused")
        self.status.error(f"C-STORE from {who.ae_title}@{who.address}: {why}")
        log.warning("C-STORE from %s@%s: %s", who.ae_title, who.address, why)
        # the file pynetdicom was writing the data set to (its message's, not public API)
        partial = getattr(getattr(event.assoc.dimse, "message", None), "_data_set_path", None)
        event.assoc.abort()
        if event.assoc.dul.socket is not None:
            event.assoc.dul.socket.close()  # stop the inflow now
        if isinstance(partial, Path):
            partial.unlink(missing_ok=True)

    def on_closed(self, event) -> None:
        self._receiving.pop(event.assoc, None)

    def on_store(self, event):
        """Check, spool, then acknowledge; any refusal is a failure status whose comment leads with
        the reason (the log line also names the instance)."""
        calling = event.assoc.requestor.ae_title
        sop = repr(str(event.request.AffectedSOPInstanceUID)[:64])[1:-1]  # for the log until checked
        code = CANNOT_UNDERSTAND  # what a failure of the current step answers
        received = event.dataset_path  # pynetdicom wrote the data set to <spool>/incoming as it came
        try:
            size = received.stat().st_size
            if size > self.instance_bytes:
                raise SpoolFull(f"instance {_size(size)} > {_size(self.instance_bytes)} limit")
            ds, has_pixels = _header(received)
            sop = check_uid(ds.SOPInstanceUID, "SOP Instance UID")
            if check_uid(event.request.AffectedSOPInstanceUID, "Affected SOP Instance UID") != sop:
                raise ValueError("SOP Instance UID differs from the command's Affected SOP Instance UID")
            series = check_uid(ds.SeriesInstanceUID, "Series Instance UID")
            check_uid(ds.get("StudyInstanceUID", ""), "Study Instance UID")
            if "FrameOfReferenceUID" in ds:
                check_uid(ds.FrameOfReferenceUID, "Frame of Reference UID")
            label = Path(f"{calling}:{sop}")
            code = NOT_AN_IMAGE
            check_image_instance(ds, label, has_pixels=has_pixels)
            decoded = decoded_bytes(ds)
            if decoded > self.instance_bytes:
                raise SpoolFull(f"instance decodes to {_size(decoded)} > {_size(self.instance_bytes)} limit")
            code = CANNOT_UNDERSTAND
            # declared size, decodable, finite: read from the received file a frame at a time
            stored = self.spool.store_file(series, sop, received, reserve=self.output_copies * output_bytes(ds),
                                           check=lambda path: check_decodable(ds, label, source=path))
            self.spool.note_caller(series, calling)  # for routing by calling_ae, after a restart too
        except (SpoolFull, OSError) as exc:
            return self._refuse(OUT_OF_RESOURCES, calling, sop, str(exc))
        except (EspmedError, ValueError) as exc:
            return self._refuse(code, calling, sop, str(exc))
        except Exception as exc:  # noqa: BLE001 - a malformed data set raises anything on access
            why = f"malformed data set ({first_line(exc, with_type=True)})"
            return self._refuse(CANNOT_UNDERSTAND, calling, sop, why)
        finally:
            received.unlink(missing_ok=True)  # moved into the spool, or refused
        if stored == "changed":
            self.status.add("instances_changed")
            log.info("instance %s of series %s changed (other bytes under its SOP Instance UID): the series "
                     "will be segmented again", sop, series)
        self.clock.touch(series)
        self.status.add("instances_received")
        return 0x0000

    def _refuse(self, code: int, calling: str, sop: str, why: str):
        """A failure status: ErrorComment is the reason (at most 64 characters), the log has it all."""
        from pydicom.dataset import Dataset

        reason = " ".join(why.split()).removeprefix(f"{calling}:{sop}: ")
        self.status.add("instances_refused")
        self.status.error(f"C-STORE from {calling} refused (0x{code:04X}): {sop}: {reason}")
        log.warning("C-STORE from %s refused (0x%04X): %s: %s", calling, code, sop, reason)
        status = Dataset()
        status.Status = code
        status.ErrorComment = reason[:64]
        return status


def _header(path: Path) -> tuple:
    """(the received file's data set up to its pixel data, with its file meta; whether pixel data
    follows): the pixels are neither read nor decoded here."""
    from pydicom.filereader import read_partial

    found = []

    def at_pixels(tag, vr, length) -> bool:
        if int(tag) in _PIXEL_TAGS:
            found.append(tag)
            return True
        return False

    with open(path, "rb") as fh:
        ds = read_partial(fh, stop_when=at_pixels)
    return ds, bool(found)


def output_bytes(ds) -> int:
    """What one instance adds to its series' SEG: one bit per pixel per frame, plus its share of the
    SEG's attributes (a margin for the per-frame functional groups)."""
    rows, cols = frame_size(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return frames * ((rows * cols + 7) // 8 + 1024) + 4096


def _pdv_items(pdu: bytes):
    """(message control header, fragment length) of each PDV item of a P-DATA-TF PDU (PS3.8 9.3.5);
    nothing for other PDU types."""
    if pdu[:1] != b"\x04":
        return
    offset = 6
    while offset + 6 <= len(pdu):
        item_length = int.from_bytes(pdu[offset:offset + 4], "big")
        if item_length < 2:
            return
        yield pdu[offset + 5], item_length - 2
        offset += 4 + item_length


#: (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data, (7FE0,0010) Pixel Data.
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


def _size(n: int) -> str:
    """A byte count short enough for a 64-character ErrorComment: KiB below 1 MiB, else MiB."""
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MiB"
