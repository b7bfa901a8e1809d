"""`espmed serve`: run the DICOM node (espmed.serve), or print its status."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..serve.node import GIB, GuardLimits, Limits

_DEFAULTS = Limits()
_GUARD = GuardLimits()


# Options (module-level so that Typer's defaults are singletons).
MODEL = typer.Option(None, "--model", "-m", help="Artifact (.onnx, .xml, .engine), checkpoint or triton://HOST:PORT/MODEL.")
AE_TITLE = typer.Option("ESPMED", "--ae-title", help="This node's AE title (the called AE title senders use).")
PORT = typer.Option(11112, "--port", min=1, max=65535, help="TCP port to listen on (DICOM: 104 or 11112).")
HOST = typer.Option("0.0.0.0", "--host", help="Address to listen on.")
DESTINATION = typer.Option(
    [], "--destination", "-d",
    help="Where results go by C-STORE, AET@HOST:PORT or tls://AET@HOST:PORT (repeatable). Without one, each "
    "SEG is kept in <spool>/results/<SeriesInstanceUID>/.",
)
ALLOW = typer.Option([], "--allow", help="Calling AE titles allowed to connect (repeatable; default anyone).")
SPOOL = typer.Option(
    Path("espmed-spool"), "--spool",
    help="Spool folder: received instances, outbox, dead letters, status.",
)
SERIES_TIMEOUT = typer.Option(
    10.0, "--series-timeout", min=0.1,
    help="Seconds without a new instance after which a series is complete.",
)
MAX_ASSOCIATIONS = typer.Option(
    10, "--max-associations", min=1,
    help="Concurrent negotiated associations (connections still negotiating have their own caps).",
)
HANDSHAKE_SECONDS = typer.Option(
    _GUARD.handshake_seconds, "--handshake-seconds", min=0.5,
    help="A connection that has not negotiated an association by then is closed, whatever it sends.",
)
MAX_NEGOTIATING = typer.Option(
    _GUARD.unnegotiated, "--max-negotiating", min=1, help="Connections negotiating at once, all peers.",
)
MAX_NEGOTIATING_PER_ADDRESS = typer.Option(
    _GUARD.per_address, "--max-negotiating-per-address", min=1,
    help="Connections negotiating at once from one peer address.",
)
TLS_CERT = typer.Option(None, "--tls-cert", help="Server certificate (PEM): accept TLS only.")
TLS_KEY = typer.Option(None, "--tls-key", help="Private key of --tls-cert (PEM).")
TLS_CA = typer.Option(None, "--tls-ca", help="CA bundle: require client certificates it signed.")
DESTINATION_CA = typer.Option(
    None, "--destination-ca", help="CA bundle (PEM) that tls:// destinations' certificates must chain to "
    "(default: the system's CAs; verification is always on).",
)
DESTINATION_CERT = typer.Option(None, "--destination-cert", help="Client certificate (PEM) for tls:// destinations.")
DESTINATION_KEY = typer.Option(None, "--destination-key", help="Private key of --destination-cert (PEM).")
MAX_INSTANCE_GIB = typer.Option(
    _DEFAULTS.instance_bytes / GIB, "--max-instance-gib",
    help="Largest instance accepted, GiB.",
)
MAX_SERIES_GIB = typer.Option(_DEFAULTS.series_bytes / GIB, "--max-series-gib", help="Largest series accepted, GiB.")
MAX_SPOOL_GIB = typer.Option(_DEFAULTS.spool_bytes / GIB, "--max-spool-gib", help="Spool size limit, GiB.")
MIN_FREE_GIB = typer.Option(_DEFAULTS.min_free_bytes / GIB, "--min-free-gib", help="Disk space always left free, GiB.")
SEND_TRIES = typer.Option(
    10, "--send-tries", min=1,
    help="Attempts per result before it goes to the dead-letter folder.",
)
RETRY_SECONDS = typer.Option(
    2.0, "--retry-seconds", min=0.05,
    help="First retry delay; doubles per failure, at most 300 s.",
)
KEEP_HOURS = typer.Option(
    24.0, "--keep-hours", min=0.0,
    help="How long segmented series stay in the spool (late instances reopen them).",
)
DEVICE = typer.Option("CPU", "--device", help="CPU, GPU/CUDA, TensorRT (ONNX Runtime) or AUTO (OpenVINO).")
THREADS = typer.Option(None, "--threads", min=1, help="Backend intra-op threads.")
STATUS = typer.Option(False, "--status", help="Print the status of the node using --spool and exit.")


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: str | None = MODEL,
        ae_title: str = AE_TITLE,
        port: int = PORT,
        host: str = HOST,
        destination: list[str] = DESTINATION,
        allow: list[str] = ALLOW,
        spool: Path = SPOOL,
        series_timeout: float = SERIES_TIMEOUT,
        max_associations: int = MAX_ASSOCIATIONS,
        handshake_seconds: float = HANDSHAKE_SECONDS,
        max_negotiating: int = MAX_NEGOTIATING,
        max_negotiating_per_address: int = MAX_NEGOTIATING_PER_ADDRESS,
        tls_cert: Path | None = TLS_CERT,
        tls_key: Path | None = TLS_KEY,
        tls_ca: Path | None = TLS_CA,
        destination_ca: Path | None = DESTINATION_CA,
        destination_cert: Path | None = DESTINATION_CERT,
        destination_key: Path | None = DESTINATION_KEY,
        max_instance_gib: float = MAX_INSTANCE_GIB,
        max_series_gib: float = MAX_SERIES_GIB,
        max_spool_gib: float = MAX_SPOOL_GIB,
        min_free_gib: float = MIN_FREE_GIB,
        send_tries: int = SEND_TRIES,
        retry_seconds: float = RETRY_SECONDS,
        keep_hours: float = KEEP_HOURS,
        device: str = DEVICE,
        threads: int | None = THREADS,
        status: bool = STATUS,
    ) -> None:
        """Receive DICOM by C-STORE, segment each complete series, send a DICOM SEG to the destinations."""
        import logging

        from ..errors import EspmedError
        from ..serve import Destination, ServeConfig, run
        from ..serve.status import read_status

        if status:
            typer.echo(json.dumps(read_status(spool), indent=1))
            return
        if model is None:
            raise EspmedError("--model is required (or --status to read a node's status)")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        # pynetdicom's per-association notes and errors, highdicom's per-attribute notes: the node
        # logs one line per event itself.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        logging.getLogger("highdicom").setLevel(logging.WARNING)
        limits = Limits(
            instance_bytes=int(max_instance_gib * GIB), series_bytes=int(max_series_gib * GIB),
            spool_bytes=int(max_spool_gib * GIB), min_free_bytes=int(min_free_gib * GIB),
        )
        run(ServeConfig(
            model=model, spool=spool, ae_title=ae_title, host=host, port=port,
            destinations=[Destination.parse(d) for d in destination], allow=list(allow),
            series_timeout=series_timeout, max_associations=max_associations,
            tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, destination_ca=destination_ca,
            destination_cert=destination_cert, destination_key=destination_key, limits=limits, send_tries=send_tries,
            retry_seconds=retry_seconds, keep_hours=keep_hours, device=device, threads=threads,
            guard=GuardLimits(handshake_seconds=handshake_seconds, unnegotiated=max_negotiating,
                              per_address=max_negotiating_per_address),
        ))
