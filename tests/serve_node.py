"""Test helpers for `espmed serve`: the node as a real subprocess, a recording destination, a sender,
and series made from pydicom's CT / MR instances with new UIDs. Loopback only."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"


def print_table(columns, rows) -> None:
    """A Markdown table of a test module's measured rows (shown with `pytest -s`)."""
    if rows:
        print("\n| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(str(v) for v in row) + " |")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def series(n: int, base: str = "CT_small.dcm", *, like=None, start: int = 0) -> list:
    """n instances of one series from a pydicom sample: new UIDs, 5 mm apart, each slice shifted.
    like: an instance whose study and series the new ones join (as slices start, start + 1, ...)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = pydicom.dcmread(get_testdata_file(base))
    series_uid = str(like.SeriesInstanceUID) if like is not None else generate_uid()
    study = str(like.StudyInstanceUID) if like is not None else generate_uid()
    out = []
    for i in range(start, start + n):
        ds = copy.deepcopy(source)  # Dataset.copy() is shallow: the copies would share their elements
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        if "ImagePositionPatient" in source:
            x, y, z = (float(v) for v in source.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        ds.PixelData = np.ascontiguousarray(np.roll(source.pixel_array, 5 * i, axis=1)).tobytes()
        out.append(ds)
    return out


def send(datasets, port: int, *, calling: str = "SCANNER", called: str = "ESPMED", on_ack=None, tls=None):
    """C-STORE `datasets` over one association: each one's status (None where none came back),
    or None when the association was refused. on_ack(n) runs after the n-th Success."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for uid, syntax in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
        ae.add_requested_context(uid, syntax)
    assoc = ae.associate(HOST, port, ae_title=called, tls_args=tls)
    if not assoc.is_established:
        return None
    statuses, acked = [], 0
    for ds in datasets:
        try:
            rsp = assoc.send_c_store(ds)
            code = int(rsp.Status) if rsp and "Status" in rsp else None
        except (RuntimeError, OSError, ValueError):
            code = None
        statuses.append(code)
        if code == 0:
            acked += 1
            if on_ack:
                on_ack(acked)
    if assoc.is_established:
        assoc.release()
    return statuses


def echo(port: int, *, calling: str = "SCANNER", tls=None) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title="ESPMED", tls_args=tls)
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().get("Status", -1)) == 0
    assoc.release()
    return ok


class Node:
    """`espmed serve` as a subprocess on a fresh port, over a spool that outlives restarts."""

    def __init__(self, model: Path | None, spool: Path, *args: str) -> None:
        self.model, self.spool, self.args = model, spool, list(args)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []

    def start(self, *extra: str) -> Node:
        log = self.spool.with_name(f"{self.spool.name}-{len(self.logs)}.log")
        self.logs.append(log)
        model = ["--model", str(self.model)] if self.model is not None else []  # None: --config's routes only
        cmd = [sys.executable, "-c", "from espmed.cli import run; run()", "serve", *model,
               "--spool", str(self.spool), "--port", str(self.port), "--host", HOST, "--threads", "1",
               *self.args, *extra]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or "listening on" in log.read_text(), 120, "the node to start")
        assert self.proc.poll() is None, log.read_text()[-3000:]
        return self

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def status(self) -> dict:
        try:
            return json.loads((self.spool / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def log(self) -> str:
        return "\n".join(p.read_text() for p in self.logs)


class Receiver:
    """A destination that records every C-STORE it gets (repeats included), optionally slow once."""

    def __init__(self, port: int | None = None, *, ae_title: str = "DEST", delay_first: float = 0.0) -> None:
        self.port = port or free_port()
        self.ae_title = ae_title
        self.delay_first = delay_first
        self.records: list[dict] = []
        self.first = threading.Event()
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> Receiver:
        from pydicom.uid import (
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            SecondaryCaptureImageStorage,
            SegmentationStorage,
        )
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        for uid in (SegmentationStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server((HOST, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server = None

    def _store(self, event) -> int:
        ds = event.dataset
        if "ReferencedSeriesSequence" in ds:
            refs = {r.ReferencedSOPInstanceUID
                    for s in ds.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
        else:
            refs = {r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence}
        with self._lock:
            self.records.append({
                "sop": str(ds.SOPInstanceUID), "series": str(ds.SeriesInstanceUID), "class": str(ds.SOPClassUID),
                "number": int(ds.InstanceNumber), "refs": frozenset(str(r) for r in refs),
            })
            first = len(self.records) == 1
        self.first.set()
        if first and self.delay_first:
            time.sleep(self.delay_first)
        return 0x0000

    def covering(self, uids) -> list[dict]:
        """Records whose references are exactly `uids`."""
        with self._lock:
            return [r for r in self.records if r["refs"] == frozenset(uids)]
