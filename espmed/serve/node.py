"""Configuration and wiring: load the model, open the spool, resume, accept, segment, send."""

from __future__ import annotations

import logging
import re
import signal
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EspmedError

log = logging.getLogger("espmed.serve")

GIB = 1 << 30
_AET = re.compile(r"^[\x20-\x7e]{1,16}$")


def check_ae_title(title: str) -> str:
    """An AE title: 1-16 printable ASCII characters, not all spaces, no backslash."""
    if not _AET.match(title) or not title.strip() or "\\" in title:
        raise EspmedError(f"invalid AE title {title!r} (1-16 printable ASCII characters)")
    return title.strip()


@dataclass(frozen=True)
class Destination:
    """A C-STORE destination, written AET@HOST:PORT, or tls://AET@HOST:PORT for DICOM over TLS."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> Destination:
        tls = text.lower().startswith("tls://")
        aet, at, address = text[len("tls://"):].partition("@") if tls else text.partition("@")
        host, colon, port = address.rpartition(":")
        if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise EspmedError(
                f"destination {text!r}: expected AET@HOST:PORT or tls://AET@HOST:PORT, e.g. PACS@10.0.0.5:104"
            )
        return cls(check_ae_title(aet), host.strip("[]"), int(port), tls)

    @property
    def key(self) -> str:
        """The destination's folder name in the spool."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{'tls-' if self.tls else ''}{self.ae_title}@{self.host}_{self.port}")

    def __str__(self) -> str:
        return f"{'tls://' if self.tls else ''}{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Limits:
    """Refuse (status 0xA700) rather than take more than this; defaults shown in `--help`."""

    instance_bytes: int = 1 * GIB
    series_bytes: int = 4 * GIB
    spool_bytes: int = 64 * GIB
    min_free_bytes: int = 2 * GIB


@dataclass(frozen=True)
class GuardLimits:
    """Connections that have not negotiated an association (`guard.ConnectionGuard`)."""

    handshake_seconds: float = 10.0  # closed if not negotiated by then, whatever they send
    unnegotiated: int = 16  # negotiating at once, all peers (beside --max-associations)
    per_address: int = 8  # negotiating at once from one peer address (a router may carry several scanners)
    pre_association_pdu: int = 64 * 1024  # largest PDU before negotiation (an A-ASSOCIATE-RQ is a few kB)


#: The largest P-DATA PDU the node receives (pynetdicom's default).
MAX_PDU = 16382


@dataclass
class ServeConfig:
    model: str | Path  # an artifact, a checkpoint or a triton:// URL
    spool: Path
    ae_title: str = "ESPMED"
    host: str = "0.0.0.0"
    port: int = 11112
    destinations: list[Destination] = field(default_factory=list)
    allow: list[str] = field(default_factory=list)  # calling AE titles; empty: anyone
    series_timeout: float = 10.0
    max_associations: int = 10
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    destination_ca: Path | None = None  # CA bundle to verify tls:// destinations (else the system's)
    destination_cert: Path | None = None  # client certificate for tls:// destinations that ask for one
    destination_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    guard: GuardLimits = field(default_factory=GuardLimits)
    send_tries: int = 10
    retry_seconds: float = 2.0
    keep_hours: float = 24.0
    device: str = "CPU"
    threads: int | None = None


def run(config: ServeConfig, stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM / SIGINT (or `stop`); everything acknowledged is in the spool first."""
    from pynetdicom import _config as pynetdicom_config
    from pynetdicom.sop_class import Verification
    from pynetdicom.transport import ThreadedAssociationServer

    from ..runtimes import load
    from .guard import ConnectionGuard, GuardedRequestHandler, NodeAE
    from .scheduler import SeriesClock, Worker
    from .sender import Retry, Sender
    from .server import StoreHandler, accepted_syntaxes, destination_tls, storage_classes, tls_context
    from .spool import Spool
    from .status import Status

    if bool(config.tls_cert) != bool(config.tls_key):
        raise EspmedError("--tls-cert and --tls-key go together")
    if config.tls_ca and not config.tls_cert:
        raise EspmedError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    ae_title = check_ae_title(config.ae_title)
    allow = [check_ae_title(a) for a in config.allow]
    ssl_context = tls_context(config.tls_cert, config.tls_key, config.tls_ca) if config.tls_cert else None
    client_tls = destination_tls(config)
    stop = stop or threading.Event()
    segmenter = load(config.model, device=config.device, threads=config.threads)
    limits = config.limits
    spool = Spool(config.spool, series_bytes=limits.series_bytes, spool_bytes=limits.spool_bytes,
                  min_free_bytes=limits.min_free_bytes)
    swept = spool.sweep_incoming()  # transfers a crash cut off
    if swept:
        log.warning("removed %d unfinished transfer(s) from %s", swept, spool.incoming)
    # pynetdicom writes each received data set to a temporary file as it arrives (not to memory),
    # in the temp folder: the spool's incoming/, so that keeping it is a rename. Both settings are
    # process-wide; the node is its own process.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool.incoming)
    status = Status(spool.root / "status.json", {
        "ae_title": ae_title, "port": config.port, "model": segmenter.source.name,
        "destinations": [str(d) for d in config.destinations], "tls": ssl_context is not None,
    })
    clock = SeriesClock(config.series_timeout)
    retry = Retry(tries=config.send_tries, base=config.retry_seconds)
    senders = [Sender(destination=d, spool=spool, status=status, calling_aet=ae_title, retry=retry, stop=stop,
                      tls=client_tls if d.tls else None) for d in config.destinations]
    worker = Worker(segmenter=segmenter, spool=spool, clock=clock, status=status, senders=senders,
                    destinations=config.destinations, keep_seconds=config.keep_hours * 3600, stop=stop)
    resumed = worker.resume()

    guard = ConnectionGuard(**asdict(config.guard), max_pdu=MAX_PDU, status=status)
    ae = NodeAE(ae_title=ae_title)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = MAX_PDU
    ae.require_calling_aet = allow
    ae.network_timeout = ae.dimse_timeout = 60
    # pynetdicom's own wait for an A-ASSOCIATE-RQ: longer than the guard's deadline, so that the guard
    # closes (and logs) a silent connection first; it also bounds how long a closed one lingers.
    ae.acse_timeout = config.guard.handshake_seconds + 2
    syntaxes = accepted_syntaxes()
    ae.add_supported_context(Verification)  # C-ECHO
    for uid in storage_classes():
        ae.add_supported_context(uid, syntaxes)
    handler = StoreHandler(spool=spool, clock=clock, status=status, instance_bytes=limits.instance_bytes,
                           allow=allow, output_copies=max(1, len(config.destinations)))
    try:
        server = ae.make_server((config.host, config.port), ssl_context=ssl_context, evt_handlers=handler.handlers(),
                                server_class=ThreadedAssociationServer, request_handler=GuardedRequestHandler)
    except OSError as exc:
        raise EspmedError(f"cannot listen on {config.host}:{config.port} ({exc})") from None
    server.guard = guard
    ae._servers.append(server)  # as AE.start_server does, so that server.shutdown() finds it
    threading.Thread(target=server.serve_forever, name="acceptor", daemon=True).start()
    guard.start()
    for thread in (worker, *senders):
        thread.start()
    main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    status.state = "running"
    status.write(spool.counts())
    log.info(
        "espmed serve: %s listening on %s:%d%s, model %s (%s), %d destination(s), series timeout %.1f s, "
        "%d pending series resumed, spool %s",
        ae_title, config.host, config.port, " (TLS)" if ssl_context else "", segmenter.source.name,
        segmenter.backend, len(config.destinations), config.series_timeout, resumed, spool.root,
    )
    try:
        stop.wait()
    finally:
        status.state = "stopping"
        guard.stop()
        server.shutdown()
        for thread in (worker, *senders):
            thread.join(timeout=30)
        for s, handler_fn in previous.items():
            signal.signal(s, handler_fn)
        status.state = "stopped"
        status.write(spool.counts())
        log.info("espmed serve: stopped")
