"""`espmed serve` against hostile and broken peers (issue 27): a real node subprocess on loopback and
a pynetdicom peer that sends what a scanner never would. Each refusal must be a failure status whose
ErrorComment leads with the reason, and nothing refused may reach the spool."""

from __future__ import annotations

import copy
import re
import shutil
import socket
import threading
import time

import pytest

from .serve_node import HOST, Node, echo, send, series, wait_for

pytest.importorskip("pynetdicom")
#: The tests write invalid values on purpose; pydicom warns about each one.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.valuerep")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from .runtime_artifacts import build_artifacts

    model = build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")["onnx"]
    spool = tmp_path_factory.mktemp("hostile") / "spool"
    n = Node(model, spool, "--series-timeout", "600", "--max-instance-gib", str(1 / 1024)).start()  # 1 MiB
    yield n
    n.stop()


def store(node: Node, ds, *, affected_uid: str | None = None) -> tuple[int, str]:
    """C-STORE one data set; (status, ErrorComment). affected_uid: the command's Affected SOP
    Instance UID when it should not be the data set's own (pynetdicom always copies it)."""
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE

    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate(HOST, node.port, ae_title="ESPMED")
    assert assoc.is_established
    try:
        if affected_uid is not None:  # rewrite the command on its way out
            send_msg = assoc.dimse.send_msg

            def tampered(primitive, context_id):
                if isinstance(primitive, C_STORE):
                    primitive.AffectedSOPInstanceUID = affected_uid
                return send_msg(primitive, context_id)

            assoc.dimse.send_msg = tampered
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status), str(rsp.get("ErrorComment", ""))
    finally:
        assoc.release()


def spooled(node: Node) -> set[str]:
    return {p.stem for p in (node.spool / "instances").rglob("*.dcm")}


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("StudyInstanceUID", "../../tmp/pwned"),  # was copied into the SEG unchecked
        ("StudyInstanceUID", ""),
        ("StudyInstanceUID", "1." * 150),
        ("FrameOfReferenceUID", "1.2.x"),
    ],
)
def test_a_uid_that_is_not_a_whole_valid_uid_is_refused_saying_which(node, keyword, value):
    ds = copy.deepcopy(series(1)[0])
    setattr(ds, keyword, value)
    before = spooled(node)
    status, comment = store(node, ds)
    assert status == 0xC000
    name = {"StudyInstanceUID": "Study Instance UID", "FrameOfReferenceUID": "Frame of Reference UID"}[keyword]
    assert comment.startswith(f"invalid {name}"), comment
    assert spooled(node) == before


def test_check_uid_matches_the_whole_value():
    """pydicom trims what it reads, so these come from a peer that writes raw bytes."""
    from espmed.serve.spool import check_uid

    assert check_uid("1.2.3\0", "UID") == check_uid("1.2.3 ", "UID") == "1.2.3"  # one pad character
    for bad in ("1.2.3\n\0\n", "1.2.3\n", "1.2.3\0\0", " 1.2.3", "1..2", "1.2."):
        with pytest.raises(ValueError, match="invalid UID"):
            check_uid(bad, "UID")


def test_the_command_and_the_data_set_must_name_the_same_instance(node):
    ds = series(1)[0]
    status, comment = store(node, ds, affected_uid="1.2.826.0.1.3680043.8.498.1")
    assert status == 0xC000 and comment.startswith("SOP Instance UID differs from the command"), comment
    assert str(ds.SOPInstanceUID) not in spooled(node)
    assert store(node, ds) == (0, "")  # the same instance, sent properly
    assert str(ds.SOPInstanceUID) in spooled(node)


def test_refusals_lead_with_the_reason_not_the_instance(node):
    ds = copy.deepcopy(series(1)[0])
    del ds.PixelData
    status, comment = store(node, ds)
    assert status == 0xA900 and comment == "CT Image Storage has no pixel data", comment
    assert f"{ds.SOPInstanceUID}: CT Image Storage has no pixel data" in node.log()  # the log names the instance


# -- peers that never negotiate -----------------------------------------------------------------------
HANDSHAKE = 2.0  # the guarded node's --handshake-seconds


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    from .runtime_artifacts import build_artifacts

    model = build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")["onnx"]
    spool = tmp_path_factory.mktemp("guarded") / "spool"
    n = Node(model, spool, "--series-timeout", "600", "--max-associations", "2", "--handshake-seconds",
             str(HANDSHAKE), "--max-negotiating", "6", "--max-negotiating-per-address", "3").start()
    yield n
    n.stop()


def attacker(node: Node, source: str = "127.0.0.2") -> socket.socket:
    """A TCP connection to the node from another loopback address."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect((HOST, node.port))
    return s


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the node closed `s` (it reads EOF or a reset), or None if it stayed open."""
    t0 = time.monotonic()
    s.settimeout(seconds)
    try:
        while True:
            if not s.recv(4096):
                return time.monotonic() - t0
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - t0
    except TimeoutError:
        return None
    finally:
        s.close()


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def refusals(node: Node, **at_least: int) -> dict:
    """The status file's refusal counts, once each named reason has reached its count."""

    def counts():
        got = node.status().get("connections_refused_by_reason", {})
        return got if all(got.get(k, 0) >= n for k, n in at_least.items()) else None

    return wait_for(counts, 10, f"refusal counts {at_least}")


def test_an_unknown_pdu_type_is_closed_at_once(guarded):
    s = attacker(guarded)
    s.sendall(bytes.fromhex("09000000000401020304"))
    took = closed_within(s, 5)
    assert took is not None and took < 1.0
    assert "connection from 127.0.0.2 closed: unknown PDU type 0x09" in guarded.log()


def test_a_declared_pdu_length_is_not_believed(guarded):
    before = rss_mib(guarded.proc.pid)
    s = attacker(guarded, "127.0.0.3")
    s.sendall(bytes.fromhex("0100FFFFFFFF") + b"\x00\x01" + b"\x00" * 64)
    try:  # the node closes before it reads the body: sending 64 MiB more fails or goes nowhere
        for _ in range(64):
            s.sendall(b"\x00" * (1 << 20))
    except OSError:
        pass
    assert closed_within(s, 5) is not None
    assert rss_mib(guarded.proc.pid) - before < 20
    assert "connection from 127.0.0.3 closed: declared PDU length 4,294,967,295 > 65,536 bytes" in guarded.log()
    time.sleep(HANDSHAKE + 0.5)
    assert guarded.log().count("connection from 127.0.0.3 closed") == 1  # closed once, not again at the deadline


def test_silent_and_dripping_peers_cannot_take_the_slots(guarded):
    silent = [attacker(guarded) for _ in range(3)]  # the per-address cap
    time.sleep(0.3)
    extra = attacker(guarded)
    assert closed_within(extra, 3) is not None  # a fourth from the same address: closed at once
    drip = attacker(guarded, "127.0.0.4")
    rq = bytes.fromhex("010000000044")  # an A-ASSOCIATE-RQ header, then one byte at a time

    def dripping():
        for byte in rq + b"\x00" * 20:
            try:
                drip.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.4)

    thread = threading.Thread(target=dripping, daemon=True)
    thread.start()
    assert echo(guarded.port)  # a legitimate scanner gets a slot during the attack
    took = [closed_within(s, HANDSHAKE + 3) for s in silent]
    assert all(t is not None for t in took), took  # closed at the deadline, not held
    thread.join(HANDSHAKE + 5)
    refusals(guarded, handshake_timeout=4, too_many_negotiating=1)
    log = guarded.log()
    assert "connection from 127.0.0.4 closed: no association negotiated within 2 s" in log
    assert re.search(r"connection from 127\.0\.0\.2 closed: \d connections from this address are negotiating \(cap 3\)",
                     log)
    assert echo(guarded.port)


def test_deflated_transfer_syntax_is_not_offered(node):
    """A deflate bomb (424 KiB inflating to 400 MiB) passed the size limit: the syntax is refused."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
    from pynetdicom import AE

    ds = series(1)[0]
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ds.SOPClassUID, [DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian])
    assoc = ae.associate(HOST, node.port, ae_title="ESPMED")
    assert assoc.is_established
    accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {ExplicitVRLittleEndian}


def test_the_instance_limit_applies_to_the_decoded_size(node):
    """An RLE instance of a few kB that decodes to 2 MiB, against the node's 1 MiB instance limit."""
    import numpy as np
    from pydicom.uid import RLELossless

    ds = copy.deepcopy(series(1)[0])
    ds.Rows = ds.Columns = 1024
    ds.PixelData = np.zeros((1024, 1024), np.uint16).tobytes()
    ds.compress(RLELossless)
    assert len(ds.PixelData) < 64 * 1024
    status, comment = store(node, ds)
    assert status == 0xA700 and comment == "instance decodes to 2.0 MiB > 1.0 MiB limit", comment
    assert str(ds.SOPInstanceUID) not in spooled(node)


def test_a_changed_instance_reopens_its_series_and_a_resend_does_not(tmp_path):
    """Other pixels under a stored SOP Instance UID were acknowledged and ignored; now they give a
    superseding SEG (new UID, higher InstanceNumber). The same bytes again change nothing."""
    import numpy as np
    import pydicom

    from .runtime_artifacts import build_artifacts

    model = build_artifacts(tmp_path.parent / "runtime-artifacts")["onnx"]
    node = Node(model, tmp_path / "spool", "--series-timeout", "1").start()
    try:
        instances = series(2)
        results = tmp_path / "spool" / "results" / str(instances[0].SeriesInstanceUID)

        def segs(n: int) -> list:
            return wait_for(lambda: len(list(results.glob("*.dcm"))) >= n and sorted(results.glob("*.dcm")),
                            60, f"{n} SEG(s)")

        assert send(instances, node.port) == [0, 0]
        first = pydicom.dcmread(segs(1)[0])
        assert send([instances[0]], node.port) == [0]  # a resend: the same bytes
        time.sleep(3)
        assert len(list(results.glob("*.dcm"))) == 1
        changed = copy.deepcopy(instances[0])
        changed.PixelData = np.ascontiguousarray(255 - changed.pixel_array).tobytes()
        assert send([changed], node.port) == [0]
        second = next(pydicom.dcmread(p) for p in segs(2) if pydicom.dcmread(p).SOPInstanceUID != first.SOPInstanceUID)
        assert second.SeriesInstanceUID == first.SeriesInstanceUID
        assert int(second.InstanceNumber) > int(first.InstanceNumber)
        assert "changed (other bytes under its SOP Instance UID)" in node.log()
        assert node.status()["counts"]["instances_changed"] == 1
    finally:
        node.stop()


def test_a_transfer_far_over_the_limit_is_aborted_mid_way(node):
    """8 MiB against the node's 1 MiB limit: cut off at 2 MiB, nothing kept, memory flat."""
    import numpy as np

    ds = copy.deepcopy(series(1)[0])
    ds.Rows = ds.Columns = 2048
    ds.PixelData = np.ones((2048, 2048), np.uint16).tobytes()
    before = rss_mib(node.proc.pid)
    assert send([ds], node.port) in (None, [None])  # no status: the association was aborted
    assert str(ds.SOPInstanceUID) not in spooled(node)
    assert rss_mib(node.proc.pid) - before < 20
    assert "instance transfer passed twice the 1.0 MiB limit; association aborted" in node.log()
    wait_for(lambda: not list((node.spool / "incoming").iterdir()), 10, "the partial transfer to be removed")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed: no test certificate")
def test_results_go_to_a_tls_destination_that_is_verified(tmp_path):
    """tls://AET@HOST:PORT: the destination's certificate is checked (against --destination-ca), the
    node presents its client certificate; without the CA the SEG is not sent to an unverified peer."""
    import ssl
    import subprocess

    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SegmentationStorage
    from pynetdicom import AE, evt

    from .runtime_artifacts import build_artifacts
    from .serve_node import free_port

    for name in ("dest", "node"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.pem")],
                       check=True, capture_output=True)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(str(tmp_path / "dest.pem"), str(tmp_path / "dest.key"))
    server_tls.load_verify_locations(str(tmp_path / "node.pem"))
    server_tls.verify_mode = ssl.CERT_REQUIRED  # the destination wants the node's certificate
    received = []
    dest = AE(ae_title="DEST")
    dest.add_supported_context(SegmentationStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = dest.start_server((HOST, port), block=False, ssl_context=server_tls,
                               evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(e.dataset) or 0)])
    model = build_artifacts(tmp_path.parent / "runtime-artifacts")["onnx"]
    try:
        node = Node(model, tmp_path / "spool", "--series-timeout", "0.5", "--retry-seconds", "0.5",
                    "--destination", f"tls://DEST@127.0.0.1:{port}", "--destination-ca", str(tmp_path / "dest.pem"),
                    "--destination-cert", str(tmp_path / "node.pem"),
                    "--destination-key", str(tmp_path / "node.key")).start()
        instances = series(2)
        assert send(instances, node.port) == [0, 0]
        wait_for(lambda: received, 60, "the SEG over TLS")
        assert str(received[0].SOPClassUID) == SegmentationStorage
        node.stop()

        untrusted = Node(model, tmp_path / "spool2", "--series-timeout", "0.5", "--retry-seconds", "0.5",
                         "--destination", f"tls://DEST@127.0.0.1:{port}").start()  # system CAs only
        assert send(series(1), untrusted.port) == [0]
        wait_for(lambda: untrusted.status().get("counts", {}).get("send_failures", 0) >= 1, 60, "a refused send")
        untrusted.stop()
        assert len(received) == 1 and "certificate not trusted?" in untrusted.log()
    finally:
        server.shutdown()


def test_outputs_are_reserved_so_the_spool_limit_holds(tmp_path):
    """A 1 MiB spool used to hold 1.63 MB of .dcm (outputs were counted, not reserved)."""
    from .runtime_artifacts import build_artifacts

    model = build_artifacts(tmp_path.parent / "runtime-artifacts")["onnx"]
    node = Node(model, tmp_path / "spool", "--series-timeout", "1", "--max-spool-gib", str(1 / 1024)).start()
    try:
        instances = series(30)  # 30 x ~39 kB
        statuses = send(instances, node.port)
        accepted = [ds for ds, s in zip(instances, statuses, strict=True) if s == 0]
        assert 0 < len(accepted) < 30 and set(statuses) == {0, 0xA700}
        results = tmp_path / "spool" / "results" / str(instances[0].SeriesInstanceUID)
        wait_for(lambda: list(results.glob("*.dcm")), 60, "the SEG")
        held = sum(p.stat().st_size for p in (tmp_path / "spool").rglob("*.dcm"))
        assert held <= 2**20, held
    finally:
        node.stop()


def test_patient_and_study_attributes_are_copied_only_when_valid():
    """A sender's oversized or malformed Type 2 attributes are emptied in what the node writes."""
    import numpy as np

    from espmed.io.dicom_seg import copied_value, dicom_results

    ds = copy.deepcopy(series(1)[0])
    ds.PatientID = "x" * 300  # LO: 64 characters at most
    ds.StudyDate = "2020-01-01"  # DA: YYYYMMDD
    ds.PatientName = "Doe^Jane"
    assert copied_value(ds, "PatientID") == "" and copied_value(ds, "StudyDate") == ""
    assert copied_value(ds, "PatientName") == "Doe^Jane"
    frame = ds.pixel_array.astype(np.uint8)
    (seg,), note = dicom_results([ds], [frame], [frame > 100])
    assert note is None and seg.PatientID == "" and seg.StudyDate == "" and seg.PatientName == "Doe^Jane"
    assert ds.PatientID == "x" * 300  # the source itself is left as it is


def hwm_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_memory_does_not_follow_the_instance(guarded):
    """A 32 MiB instance is accepted with the node's peak RSS up by less than its size (it was ~20x:
    the data set was held, joined, decoded and windowed whole)."""
    import numpy as np

    ds = copy.deepcopy(series(1)[0])
    ds.Rows = ds.Columns = 2048
    ds.NumberOfFrames = 4
    ds.PixelData = np.random.default_rng(0).integers(0, 4000, (4, 2048, 2048), dtype=np.uint16).tobytes()
    before = hwm_mib(guarded.proc.pid)
    assert send([ds], guarded.port) == [0]
    assert hwm_mib(guarded.proc.pid) - before < 32


def test_an_endless_command_set_is_aborted(node):
    """pynetdicom gathers a command set in memory without a bound: 160 KiB of command fragments that
    never end abort the association at 64 KiB."""
    from pynetdicom import AE

    ds = series(1)[0]
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate(HOST, node.port, ae_title="ESPMED")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    fragment = b"\x00" * 16000  # one PDV: a command fragment (control 0x01), never the last
    item = (len(fragment) + 2).to_bytes(4, "big") + bytes([context_id, 0x01]) + fragment
    pdu = b"\x04\x00" + len(item).to_bytes(4, "big") + item
    try:
        for _ in range(10):
            assoc.dul.socket.send(pdu)
    except (OSError, AttributeError):
        pass  # the node closed the connection
    wait_for(lambda: "command set passed 64.0 KiB; association aborted" in node.log(), 10, "the abort")
    wait_for(lambda: not assoc.is_alive(), 10, "the association to end")
