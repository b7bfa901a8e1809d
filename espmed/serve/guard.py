"""What a peer gets before its association is negotiated: a deadline, caps, and bounded PDUs.

pynetdicom, left alone, counts every accepted connection against `maximum_associations` from
its first byte, restarts its timers on every byte a peer drips, waits out an unknown PDU type, and
reads a PDU's declared length as given (`01 00 FF FF FF FF` buffers up to 4 GiB). So the node puts
a guard in front of it:

- a connection that has not negotiated an association within `handshake_seconds` is closed,
  whatever it has sent (the limits are `ServeConfig`'s handshake_seconds,
  max_negotiating, max_negotiating_per_address, and `node.PRE_ASSOCIATION_PDU`);
- connections not yet negotiated have their own cap (`unnegotiated`, all peers together) and a
  per-address cap (`per_address`); they do not count against `--max-associations`, which is then
  the number of negotiated associations only (`NodeAE`);
- a PDU header is checked before its body is read: an unknown PDU type closes the connection at
  once, and a declared length above `pre_association_pdu` (before negotiation) or the node's
  maximum PDU (after) closes it before anything is buffered.

Every refusal is logged with the peer address and its reason and counted by reason in the status.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time

from pynetdicom import AE, evt
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger("espmed.serve")

#: The PDU types of PS3.8 9.3 (A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT).
PDU_TYPES = frozenset(range(1, 8))


class ConnectionGuard:
    """The connections whose association is not (yet) negotiated, their deadline, and the refusal
    counts. A connection holds its place until its thread has ended, so one that was closed but
    lingers still counts. Thread-safe."""

    def __init__(self, *, handshake_seconds: float, unnegotiated: int, per_address: int, pre_association_pdu: int,
                 max_pdu: int, status) -> None:
        self.handshake_seconds = handshake_seconds
        self.unnegotiated = unnegotiated
        self.per_address = per_address
        self.pre_association_pdu = pre_association_pdu
        self.max_pdu = max_pdu
        self.status = status
        self._open: dict[object, list] = {}  # association -> [peer address, opened at, closed by us]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="connection-guard", daemon=True)

    def admit(self, address: str) -> str | None:
        """Why a new connection from `address` is refused, or None."""
        with self._lock:
            self._forget_finished()
            if len(self._open) >= self.unnegotiated:
                return f"{len(self._open)} connections are negotiating (cap {self.unnegotiated})"
            mine = sum(1 for peer, *_ in self._open.values() if peer == address)
            if mine >= self.per_address:
                return f"{mine} connections from this address are negotiating (cap {self.per_address})"
        return None

    def opened(self, assoc, address: str) -> None:
        with self._lock:
            self._open[assoc] = [address, time.monotonic(), False]

    def closed(self, assoc) -> None:
        """We closed it: it counts until its thread ends, but its deadline is spent."""
        with self._lock:
            if assoc in self._open:
                self._open[assoc][2] = True

    def refuse(self, address: str, reason: str, key: str) -> None:
        """Log and count one refused connection."""
        message = f"connection from {address} closed: {reason}"
        log.warning(message)
        self.status.error(message)
        self.status.refused(key)

    def pdu_limit(self, assoc) -> int:
        return self.max_pdu if assoc.is_established else self.pre_association_pdu

    def start(self) -> None:
        self._sweeper.start()

    def stop(self) -> None:
        """Stop sweeping and close what is still negotiating."""
        self._stop.set()
        with self._lock:
            pending = list(self._open)
        for assoc in pending:
            _close(assoc)

    def _forget_finished(self) -> None:
        """Drop negotiated associations and connections whose thread has ended (lock held)."""
        for assoc in [a for a in self._open if a.is_established or (a.ident is not None and not a.is_alive())]:
            del self._open[assoc]

    def _sweep_loop(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._lock:
                self._forget_finished()
                late = [(a, entry[0]) for a, entry in self._open.items()
                        if not entry[2] and now - entry[1] > self.handshake_seconds]
                for assoc, _ in late:
                    self._open[assoc][2] = True
            for assoc, peer in late:
                self.refuse(peer, f"no association negotiated within {self.handshake_seconds:g} s", "handshake_timeout")
                _close(assoc)


def _close(assoc) -> None:
    """Shut the connection now. Its reader gets a closed socket; an acceptor still waiting for its
    A-ASSOCIATE-RQ (pynetdicom blocks on the DUL's queue for `acse_timeout`) gets None, which it
    takes as that timeout: it ends at once instead of lingering."""
    sock = assoc.dul.socket
    if sock is not None:
        sock.close()
    if not assoc.is_established:
        assoc.dul.to_user_queue.put(None)


class GuardedSocket(AssociationSocket):
    """An association's socket that checks each PDU header before pynetdicom reads the body.

    pynetdicom's DUL reads a PDU as `recv(6)` (type, reserved, length) then `recv(length)`; a
    refusal here raises OSError, which the DUL treats as the transport closing."""

    guard: ConnectionGuard
    peer: str
    _body_next = False

    def recv(self, nr_bytes: int) -> bytearray:
        if self._body_next:
            self._body_next = False
            return super().recv(nr_bytes)
        data = super().recv(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type not in PDU_TYPES:
                self._refuse(f"unknown PDU type 0x{pdu_type:02X}", "unknown_pdu")
            limit = self.guard.pdu_limit(self.assoc)
            if length > limit:
                self._refuse(f"declared PDU length {length:,} > {limit:,} bytes", "pdu_too_long")
            self._body_next = length > 0
        return data

    def _refuse(self, reason: str, key: str) -> None:
        self.guard.closed(self.assoc)
        self.guard.refuse(self.peer, reason, key)
        _close(self.assoc)
        raise OSError(reason)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler with the guard's admission, deadline and PDU checks."""

    def handle(self) -> None:
        guard: ConnectionGuard = self.server.guard
        address = str(self.client_address[0])
        why = guard.admit(address)
        if why is not None:
            guard.refuse(address, why, "too_many_negotiating")
            with contextlib.suppress(OSError):
                self.request.shutdown(socket.SHUT_RDWR)
            self.request.close()
            return
        assoc = self._create_association()
        sock = assoc.dul.socket
        sock.__class__ = GuardedSocket  # the socket pynetdicom built (its Evt5 is queued), now guarded
        sock.guard, sock.peer = guard, address
        guard.opened(assoc, address)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class NodeAE(AE):
    """An AE whose association limit counts negotiated associations only: connections still
    negotiating are the guard's (its own caps and deadline), so they cannot take those slots."""

    @property
    def active_associations(self) -> list:
        me = threading.current_thread()  # the association being negotiated counts itself
        return [a for a in super().active_associations if a is me or a.is_established]
