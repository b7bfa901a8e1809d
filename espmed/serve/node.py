"""Wiring: load the routes' models, open the spool, resume, accept, segment, send."""

from __future__ import annotations

import logging
import signal
import tempfile
import threading

from ..errors import EspmedError
from .config import NodeConfig, validate
from .destinations import Destination, check_ae_title

__all__ = ["Destination", "run"]  # Destination: its home is destinations.py

log = logging.getLogger("espmed.serve")

GIB = 1 << 30
#: The largest P-DATA PDU the node receives (pynetdicom's default).
MAX_PDU = 16382
#: The largest PDU a connection may send before negotiating (an A-ASSOCIATE-RQ is a few kB).
PRE_ASSOCIATION_PDU = 64 * 1024


def run(config: NodeConfig, stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM / SIGINT (or `stop`); everything acknowledged is in the spool first."""
    from pynetdicom import _config as pynetdicom_config
    from pynetdicom.sop_class import Verification
    from pynetdicom.transport import ThreadedAssociationServer

    from .guard import ConnectionGuard, GuardedRequestHandler, NodeAE
    from .routing import Router
    from .scheduler import SeriesClock, Worker
    from .sender import Retry, make_sender
    from .server import StoreHandler, accepted_syntaxes, storage_classes, tls_context
    from .spool import Spool
    from .status import Status

    for warning in validate(config):
        log.warning("%s", warning)
    s = config.serve
    ae_title = check_ae_title(s.ae_title)
    allow = [check_ae_title(a) for a in s.allow]
    ssl_context = tls_context(s.tls_cert, s.tls_key, s.tls_ca) if s.tls_cert else None
    stop = stop or threading.Event()
    router = Router(config.all_routes, device=s.device, threads=s.threads)
    spool = Spool(s.spool, series_bytes=int(s.max_series_gib * GIB), spool_bytes=int(s.max_spool_gib * GIB),
                  min_free_bytes=int(s.min_free_gib * GIB))
    swept = spool.sweep_incoming()  # transfers a crash cut off
    if swept:
        log.warning("removed %d unfinished transfer(s) from %s", swept, spool.incoming)
    # pynetdicom writes each received data set to a temporary file as it arrives (not to memory),
    # in the temp folder: the spool's incoming/, so that keeping it is a rename. Both settings are
    # process-wide; the node is its own process.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool.incoming)
    status = Status(spool.root / "status.json", {
        "ae_title": ae_title, "port": s.port, "tls": ssl_context is not None,
        "destinations": [str(d) for d in s.destinations],
        "routes": [{"route": r.route.name, "model": r.route.model, "modality": r.segmenter.modality,
                    "match": r.route.match, "destinations": [str(d) for d in r.route.where(s.destinations)]}
                   for r in router.routes],
    })
    clock = SeriesClock(s.series_timeout)
    retry = Retry(tries=s.send_tries, base=s.retry_seconds)
    senders = [make_sender(d, spool=spool, status=status, calling_aet=ae_title, retry=retry, stop=stop, config=s)
               for d in config.all_destinations]
    worker = Worker(router=router, spool=spool, clock=clock, status=status, senders=senders,
                    destinations=s.destinations, keep_seconds=s.keep_hours * 3600,
                    unrouted_keep_seconds=s.unrouted_keep_hours * 3600, stop=stop)
    resumed = worker.resume()

    guard = ConnectionGuard(handshake_seconds=s.handshake_seconds, unnegotiated=s.max_negotiating,
                            per_address=s.max_negotiating_per_address, pre_association_pdu=PRE_ASSOCIATION_PDU,
                            max_pdu=MAX_PDU, status=status)
    ae = NodeAE(ae_title=ae_title)
    ae.maximum_associations = s.max_associations
    ae.maximum_pdu_size = MAX_PDU
    ae.require_calling_aet = allow
    ae.network_timeout = ae.dimse_timeout = 60
    # pynetdicom's own wait for an A-ASSOCIATE-RQ: longer than the guard's deadline, so that the guard
    # closes (and logs) a silent connection first; it also bounds how long a closed one lingers.
    ae.acse_timeout = s.handshake_seconds + 2
    syntaxes = accepted_syntaxes()
    ae.add_supported_context(Verification)  # C-ECHO
    for uid in storage_classes():
        ae.add_supported_context(uid, syntaxes)
    copies = max(len(r.route.where(s.destinations)) for r in router.routes)  # outboxes per series, at most
    handler = StoreHandler(spool=spool, clock=clock, status=status, instance_bytes=int(s.max_instance_gib * GIB),
                           allow=allow, output_copies=max(1, copies))
    try:
        server = ae.make_server((s.host, s.port), ssl_context=ssl_context, evt_handlers=handler.handlers(),
                                server_class=ThreadedAssociationServer, request_handler=GuardedRequestHandler)
    except OSError as exc:
        raise EspmedError(f"cannot listen on {s.host}:{s.port} ({exc})") from None
    server.guard = guard
    ae._servers.append(server)  # as AE.start_server does, so that server.shutdown() finds it
    threading.Thread(target=server.serve_forever, name="acceptor", daemon=True).start()
    guard.start()
    for thread in (worker, *senders):
        thread.start()
    main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = {n: signal.signal(n, lambda *_: stop.set()) for n in (signal.SIGTERM, signal.SIGINT)} if main else {}
    status.state = "running"
    status.write(spool.counts())
    log.info(
        "espmed serve: %s listening on %s:%d%s, %s, %d model(s) loaded, %d destination(s), series timeout "
        "%.1f s, %d pending series resumed, spool %s",
        ae_title, s.host, s.port, " (TLS)" if ssl_context else "",
        "; ".join(f"route {r.route.label} ({r.segmenter.backend})" for r in router.routes), router.models,
        len(senders), s.series_timeout, resumed, spool.root,
    )
    try:
        stop.wait()
    finally:
        status.state = "stopping"
        guard.stop()
        server.shutdown()
        for thread in (worker, *senders):
            thread.join(timeout=30)
        for n, handler_fn in previous.items():
            signal.signal(n, handler_fn)
        status.state = "stopped"
        status.write(spool.counts())
        log.info("espmed serve: stopped")

