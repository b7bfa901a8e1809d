"""`espmed serve` under faults and load: the node is a real subprocess killed with SIGKILL at several
points, a destination that goes away, four concurrent senders, a non-allowed AE, a malformed
instance, a full spool. The invariant everywhere: every acknowledged instance ends up referenced by
a delivered SEG, re-deliveries carry the same UIDs, and no instance is delivered under two UIDs.

`pytest -s tests/test_serve.py` prints the fault/load table of the README."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from espmed.errors import SpoolFull
from espmed.io.dicom_seg import derived_uid
from espmed.pipeline import model_hash
from espmed.serve.destinations import Destination, DicomWebDestination, parse_destination
from espmed.serve.sender import Retry
from espmed.serve.spool import Spool, check_uid

from .serve_node import Node, Receiver, echo, print_table, send, series, wait_for

pytest.importorskip("pynetdicom")

ROWS: list[tuple] = []
COLUMNS = ("scenario", "instances sent", "acknowledged", "SEG delivered", "re-sent (same UIDs)", "duplicates", "lost")
#: How long any one delivery may take in these tests (series timeout 1 s, tiny model).
DELIVERY = 60


@pytest.fixture(scope="module")
def model(tiny_onnx):
    return tiny_onnx


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    print_table(COLUMNS, ROWS)


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def account(name: str, receiver: Receiver, sent: int, acked: dict[str, set[str]]) -> None:
    """Check the invariant for {series: acknowledged SOP UIDs} and add the scenario's table row."""
    latest = {}
    for series_uid, uids in acked.items():
        got = wait_for(lambda uids=uids: receiver.covering(uids), DELIVERY, f"a SEG covering series {series_uid}")
        assert len({r["sop"] for r in got}) == 1, got  # one UID for one instance set, however often sent
        latest[series_uid] = got[0]
    time.sleep(0.5)  # let any re-delivery in flight land before counting
    records = list(receiver.records)
    by_refs: dict[frozenset, set[str]] = {}
    for r in records:
        by_refs.setdefault(r["refs"], set()).add(r["sop"])
    duplicates = sum(len(uids) - 1 for uids in by_refs.values())
    referenced = set().union(*(r["refs"] for r in records)) if records else set()
    lost = sum(len(uids - referenced) for uids in acked.values())
    resent = len(records) - len({r["sop"] for r in records})
    assert duplicates == 0 and lost == 0
    ROWS.append((name, sent, sum(map(len, acked.values())), len(latest), resent, duplicates, lost))


# -- units -----------------------------------------------------------------------------------------
def test_uids_destinations_retry_and_spool_limits(tmp_path):
    assert derived_uid("model", "1.2.3") == derived_uid("model", "1.2.3") != derived_uid("model1.2.3")
    assert derived_uid("model", "1.2.3").startswith("2.25.") and len(derived_uid("x")) <= 64
    assert check_uid("1.2.840.113619.2.55", "uid") == "1.2.840.113619.2.55"
    for bad in ("../../etc/passwd", "1.2/3", "", "1." * 40 + "1"):
        with pytest.raises(ValueError):
            check_uid(bad, "SOP Instance UID")
    d = Destination.parse("PACS@10.0.0.5:104")
    assert (d.ae_title, d.host, d.port, d.key) == ("PACS", "10.0.0.5", 104, "PACS_10.0.0.5_104")
    assert Destination.parse("A@[::1]:11112").host == "::1"
    from espmed.errors import EspmedError

    for bad in ("PACS", "PACS@host", "@h:1", "A@h:99999", "WAY_TOO_LONG_AE_TITLE@h:1"):
        with pytest.raises(EspmedError):
            Destination.parse(bad)
    for text, kind, shown in (("PACS@10.0.0.5:104", Destination, "PACS@10.0.0.5:104"),
                              ("TLS://PACS@pacs:2762", Destination, "tls://PACS@pacs:2762"),
                              ("dicomweb+http://127.0.0.1:8042/dicom-web/", DicomWebDestination,
                               "dicomweb+http://127.0.0.1:8042/dicom-web"),
                              ("dicomweb+HTTPS://PACS.example/wado", DicomWebDestination,
                               "dicomweb+https://pacs.example/wado")):
        d = parse_destination(text)
        assert isinstance(d, kind) and str(d) == shown and parse_destination(str(d)) == d
    web = parse_destination("dicomweb+https://pacs:443/dicom-web")
    assert web.base == "https://pacs:443/dicom-web" and web.key == "dicomweb+https_pacs_443_dicom-web"
    keys = {parse_destination(t).key for t in ("A@h:1", "tls://A@h:1", "dicomweb+http://h:1", "dicomweb+https://h:1")}
    assert len(keys) == 4 and all("/" not in k and ":" not in k for k in keys)
    for bad, match in (("PACS", "expected AET@HOST:PORT, tls://AET@HOST:PORT, dicomweb"),
                       ("http://pacs/dicom-web", "expected AET@HOST:PORT, tls://AET@HOST:PORT, dicomweb"),
                       ("dicomweb+ftp://pacs/x", "expected AET@HOST:PORT, tls://AET@HOST:PORT, dicomweb"),
                       ("dicomweb+http://pacs:notaport/x", "expected dicomweb"),
                       ("dicomweb+https://", "expected dicomweb"),
                       ("dicomweb+http://pacs/x?token=1", "no query"),
                       ("dicomweb+http://[::1]:8042/x", "IPv6"),
                       ("A@h:0", "expected AET@HOST:PORT")):
        with pytest.raises(EspmedError, match=match):
            parse_destination(bad)
    with pytest.raises(EspmedError, match="no credentials in the URL.*config file") as err:
        parse_destination("dicomweb+https://admin:s3cret@pacs/dicom-web")
    assert "s3cret" not in str(err.value)
    retry = Retry(tries=5, base=2.0, cap=10.0)
    assert [retry.delay(n) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]

    spool = Spool(tmp_path / "s", series_bytes=250, spool_bytes=400, min_free_bytes=0)
    spool.store_instance("1.2", "1.2.1", b"x" * 200)
    spool.store_instance("1.2", "1.2.1", b"x" * 200)  # a resend replaces, does not add
    with pytest.raises(SpoolFull, match="per-series"):
        spool.store_instance("1.2", "1.2.2", b"x" * 100)
    spool.store_instance("1.3", "1.3.1", b"x" * 150)
    with pytest.raises(SpoolFull, match="spool would exceed"):
        spool.store_instance("1.4", "1.4.1", b"x" * 100)
    assert Spool(spool.root, series_bytes=250, spool_bytes=400, min_free_bytes=0).total_bytes == 350  # recounted
    with pytest.raises(SpoolFull, match="disk free"):
        Spool(tmp_path / "t", series_bytes=1 << 40, spool_bytes=1 << 50, min_free_bytes=1 << 60).store_instance(
            "1.5", "1.5.1", b"x")
    assert spool.pending("1.2") and not spool.pending("1.9")
    spool.mark_done("1.2", {"1.2.1"}, [], "ok")
    assert not spool.pending("1.2")
    assert spool.expire(keep_seconds=0) == 1 and not (spool.root / "instances" / "1.2").exists()
    assert spool.total_bytes == 150


# -- kill -9 at four points --------------------------------------------------------------------------
def test_kill_mid_association_then_restart(model, tmp_path, receiver):
    node = Node(model, tmp_path / "spool", "--destination", f"DEST@127.0.0.1:{receiver.port}",
                "--series-timeout", "1").start()
    instances = series(8)
    statuses = send(instances, node.port, on_ack=lambda n: n == 4 and node.kill())
    acked = {str(ds.SOPInstanceUID) for ds, s in zip(instances, statuses, strict=True) if s == 0}
    assert len(acked) == 4 and all(s is None for s in statuses[4:])
    node.start()
    account("kill -9 mid-association", receiver, len(instances), {str(instances[0].SeriesInstanceUID): acked})
    node.stop()


def test_kill_after_ack_before_segmentation(model, tmp_path, receiver):
    node = Node(model, tmp_path / "spool", "--destination", f"DEST@127.0.0.1:{receiver.port}").start(
        "--series-timeout", "30")
    instances = series(5)
    assert send(instances, node.port) == [0] * 5
    node.kill()
    assert not receiver.records
    node.start("--series-timeout", "1")
    account("kill -9 after ack, before segmentation", receiver, 5,
            {str(instances[0].SeriesInstanceUID): {str(ds.SOPInstanceUID) for ds in instances}})
    node.stop()


def test_kill_mid_segmentation_gives_the_same_uids(model, tmp_path, receiver):
    node = Node(model, tmp_path / "spool", "--destination", f"DEST@127.0.0.1:{receiver.port}",
                "--series-timeout", "0.5").start()
    instances = series(40)
    uid = str(instances[0].SeriesInstanceUID)
    assert send(instances, node.port) == [0] * 40
    wait_for(lambda: node.status().get("queue", {}).get("segmenting") == uid, 30, "segmentation to start", 0.01)
    node.kill()
    assert not (node.spool / "done" / f"{uid}.json").exists() and not receiver.records  # killed inside it
    node.start()
    sops = sorted(str(ds.SOPInstanceUID) for ds in instances)
    account("kill -9 mid-segmentation", receiver, 40, {uid: set(sops)})
    assert receiver.records[0]["sop"] == derived_uid(model_hash(model), *sops)  # what the killed run would have sent
    node.stop()


def test_kill_mid_send_redelivers_the_same_instance(model, tmp_path):
    slow = Receiver(delay_first=5.0).start()
    node = Node(model, tmp_path / "spool", "--destination", f"DEST@127.0.0.1:{slow.port}",
                "--series-timeout", "0.5").start()
    instances = series(5)
    assert send(instances, node.port) == [0] * 5
    assert slow.first.wait(DELIVERY)  # the destination has the SEG, its response is not back yet
    node.kill()
    first = slow.records[0]
    node.start()
    wait_for(lambda: len(slow.records) >= 2, DELIVERY, "the re-delivery")
    assert slow.records[1]["sop"] == first["sop"] and slow.records[1]["series"] == first["series"]
    account("kill -9 mid-send", slow, 5,
            {str(instances[0].SeriesInstanceUID): {str(ds.SOPInstanceUID) for ds in instances}})
    node.stop()
    slow.stop()


# -- destination, load, security, malformed input, limits ------------------------------------------------
def test_destination_down_then_back(model, tmp_path):
    later = Receiver()
    node = Node(model, tmp_path / "spool", "--destination", f"DEST@127.0.0.1:{later.port}",
                "--series-timeout", "0.5", "--retry-seconds", "0.5").start()
    instances = series(4)
    assert send(instances, node.port) == [0] * 4
    wait_for(lambda: node.status().get("counts", {}).get("send_failures", 0) >= 2, 30, "failed sends")
    assert any("failed" in e["error"] for e in node.status()["last_errors"])
    later.start()
    account("destination down, then back", later, 4,
            {str(instances[0].SeriesInstanceUID): {str(ds.SOPInstanceUID) for ds in instances}})
    wait_for(lambda: node.status().get("queue", {}).get("outbox", {}) == {"DEST_127.0.0.1_" + str(later.port): 0},
             10, "an empty outbox")
    node.stop()
    later.stop()


def test_concurrent_senders_allowlist_malformed_and_late_instance(model, tmp_path, receiver):
    senders = ["MODALITY1", "MODALITY2", "MODALITY3", "MODALITY4"]
    allow = [a for name in senders for a in ("--allow", name)]
    node = Node(model, tmp_path / "spool", "--destination", f"DEST@127.0.0.1:{receiver.port}",
                "--series-timeout", "1", "--max-associations", "8", *allow).start()
    assert echo(node.port, calling="MODALITY1")
    assert send(series(1), node.port, calling="INTRUDER") is None  # rejected at association
    assert not echo(node.port, calling="INTRUDER")
    import pydicom
    from pydicom.data import get_testdata_file

    rtdose = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    assert send([rtdose], node.port, calling="MODALITY1") is None  # RT Dose: no context accepted

    work = {name: [series(3, "CT_small.dcm" if i % 2 else "MR_small.dcm") for i in range(5)] for name in senders}
    results: dict[str, list] = {}

    def run(name):
        results[name] = [send(s, node.port, calling=name) for s in work[name]]

    import threading

    threads = [threading.Thread(target=run, args=(name,)) for name in senders]
    for t in threads:
        t.start()
    bad = series(4)
    cut = bad[2]
    cut.PixelData = cut.PixelData[: len(cut.PixelData) // 2]  # truncated pixel data
    statuses = send(bad, node.port, calling="MODALITY1")
    for t in threads:
        t.join(timeout=120)
    assert statuses[2] == 0xC000 and [statuses[i] for i in (0, 1, 3)] == [0, 0, 0]
    acked = {str(s[0].SeriesInstanceUID): {str(ds.SOPInstanceUID) for ds in s} for name in senders for s in work[name]}
    assert all(r == [0, 0, 0] for name in senders for r in results[name])
    acked[str(bad[0].SeriesInstanceUID)] = {str(bad[i].SOPInstanceUID) for i in (0, 1, 3)}
    account("4 senders x 5 series + a malformed instance", receiver, 3 * 20 + 4, acked)
    assert len({r["sop"] for r in receiver.records}) == 21
    counts = node.status()["counts"]
    assert counts["associations_rejected"] >= 2 and counts["instances_refused"] == 1
    assert any("INTRUDER" in e["error"] for e in node.status()["last_errors"])

    # A late instance reopens its series: a superseding SEG, same SEG series, higher InstanceNumber.
    first_series = work["MODALITY1"][0]
    first = receiver.covering({str(ds.SOPInstanceUID) for ds in first_series})[0]
    late = series(1, "MR_small.dcm", like=first_series[0], start=3)
    assert send(late, node.port, calling="MODALITY2") == [0]
    everything = {str(ds.SOPInstanceUID) for ds in first_series + late}
    superseding = wait_for(lambda: receiver.covering(everything), DELIVERY, "the superseding SEG")[0]
    assert superseding["series"] == first["series"] and superseding["number"] > first["number"]
    assert superseding["sop"] != first["sop"]
    node.stop()
    assert "series " in node.log() and "ms/frame" in node.log()


def test_spool_limit_refuses_and_keeps_what_was_acknowledged(model, tmp_path, receiver):
    node = Node(model, tmp_path / "spool", "--destination", f"DEST@127.0.0.1:{receiver.port}",
                "--series-timeout", "1", "--max-spool-gib", str(100_000 / 2**30)).start()
    instances = series(5)  # ~40 kB each: two fit in 100 kB
    statuses = send(instances, node.port)
    assert statuses[:2] == [0, 0] and set(statuses[2:]) == {0xA700}, statuses
    acked = {str(ds.SOPInstanceUID) for ds, s in zip(instances, statuses, strict=True) if s == 0}
    account("spool limit reached", receiver, 5, {str(instances[0].SeriesInstanceUID): acked})
    assert "spool would exceed" in " ".join(e["error"] for e in node.status()["last_errors"])
    node.stop()
    proc = subprocess.run([sys.executable, "-c", "from espmed.cli import run; run()", "serve", "--status",
                           "--spool", str(node.spool)], capture_output=True, text=True, timeout=60)
    report = json.loads(proc.stdout)
    assert report["state"] == "stopped" and report["running"] is False
    assert report["counts"]["instances_refused"] == 3 and report["counts"]["sent"] == 1
    assert report["queue"]["outbox"] == {f"DEST_127.0.0.1_{receiver.port}": 0}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed: no test certificate")
def test_tls_with_client_certificates(model, tmp_path):
    import ssl

    def make(name, *extra):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.pem"), *extra],
                       check=True, capture_output=True)

    make("server")
    make("client")
    node = Node(model, tmp_path / "spool", "--tls-cert", str(tmp_path / "server.pem"), "--tls-key",
                str(tmp_path / "server.key"), "--tls-ca", str(tmp_path / "client.pem"),
                "--series-timeout", "0.5").start()
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "server.pem"))
    client.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    assert echo(node.port, tls=(client, "127.0.0.1"))
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "server.pem"))
    assert not echo(node.port, tls=(anonymous, "127.0.0.1"))  # no client certificate
    assert not echo(node.port)  # plain DICOM on a TLS port
    assert node.status()["tls"] is True
    instances = series(2)
    assert send(instances, node.port, tls=(client, "127.0.0.1")) == [0, 0]
    results = node.spool / "results" / str(instances[0].SeriesInstanceUID)  # no destination: kept here
    seg = wait_for(lambda: sorted(results.glob("*.dcm")), DELIVERY, "the SEG in results/")
    import pydicom

    refs = {r.ReferencedSOPInstanceUID for s in pydicom.dcmread(seg[0]).ReferencedSeriesSequence
            for r in s.ReferencedInstanceSequence}
    assert refs == {str(ds.SOPInstanceUID) for ds in instances}
    node.stop()


def test_a_remote_model_is_identified_by_its_metadata(model):
    """triton://... has no local file: output UIDs derive from the metadata it is served with."""
    from espmed.runtimes import load

    meta = load(model).metadata
    remote = model_hash("demo-model", meta)  # what a TritonSegmenter's source is: the model name
    assert remote == model_hash("demo-model", meta) != model_hash(model, meta)
    meta.modality_index += 1
    assert model_hash("demo-model", meta) != remote
