"""Routing: [[route]] matching on real headers (pydicom's CT and MR samples), each (model, modality)
loaded once, the calling AE title kept in the spool, and the node end to end: a CT series to one model,
an MR series to another, a series no route takes neither segmented nor kept past unrouted_keep_hours.

`pytest -s tests/test_serve_routing.py` prints the routing table of the README."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.data import get_testdata_file

from espmed.errors import ConfigError
from espmed.io.dicom_seg import derived_uid
from espmed.pipeline import model_hash
from espmed.serve.routing import Router, describe, parse_routes
from espmed.serve.spool import Spool

from .serve_node import HOST, Node, Receiver, send, series, wait_for

pytest.importorskip("pynetdicom")

ROUTES = [
    {"name": "ct-lung", "model": "ct.onnx", "match": {"Modality": "ct", "SeriesDescription": "(?i)lung|chest"}},
    {"name": "mr-brain", "model": "mr.xml", "modality": "brain",
     "match": {"Modality": "MR", "BodyPartExamined": "brain"}},
    {"name": "from-er", "model": "ct.onnx", "match": {"calling_ae": "ER_CT"}},
    {"name": "any", "model": "ct.onnx", "destinations": ["ARCHIVE@10.0.0.9:104"]},
]


def header(name: str, **attributes):
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def first_match(routes, ds, calling: str | None) -> str | None:
    return next((r.name for r in routes if r.matches(ds, calling)), None)


def test_first_matching_route_wins_on_real_headers(tmp_path):
    routes = parse_routes(ROUTES, base=tmp_path, where="node.toml")
    assert routes[0].model == str(tmp_path / "ct.onnx") and routes[3].destinations[0].port == 104
    cases = [  # (sample, attributes, calling AE, route)
        ("CT_small.dcm", {"SeriesDescription": "Thorax CHEST 1.25 mm"}, "SCANNER", "ct-lung"),
        ("CT_small.dcm", {"SeriesDescription": "Scout"}, "SCANNER", "any"),
        ("CT_small.dcm", {"SeriesDescription": "Scout"}, "ER_CT", "from-er"),
        ("CT_small.dcm", {}, "SCANNER", "any"),  # no SeriesDescription: the regex sees ""
        ("MR_small.dcm", {"BodyPartExamined": "BRAIN "}, "SCANNER", "mr-brain"),  # exact, case-insensitive
        ("MR_small.dcm", {"BodyPartExamined": "BRAINSTEM"}, "SCANNER", "any"),
        ("MR_small.dcm", {"BodyPartExamined": "BRAIN"}, "ER_CT", "mr-brain"),  # first match, not most specific
    ]
    for name, attributes, calling, expected in cases:
        assert first_match(routes, header(name, **attributes), calling) == expected, (name, attributes, calling)
    assert first_match(routes[:2], header("CT_small.dcm"), None) is None  # no default: unrouted
    assert describe(header("CT_small.dcm", SeriesDescription="Scout"), "SCANNER") == \
        "Modality 'CT', BodyPartExamined '', SeriesDescription 'Scout', calling AE 'SCANNER'"


def test_route_errors_name_the_file_and_route(tmp_path):
    for table, message in (
        ({"model": "a.onnx", "match": {"SeriesDescription": "[lung"}}, "[[route]] 1: match.SeriesDescription '[lung'"),
        ({"name": "x", "model": "a.onnx", "match": {"Modality": ["CT", "MR"]}}, "[[route]] 'x': match.Modality must"),
        ({"model": "a.onnx", "matches": {}}, "[[route]] 1: unknown key 'matches'"),
        ({"model": "a.onnx", "destinations": "PACS@h:104"}, "destinations must be a list of strings"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_routes([table], base=tmp_path, where="node.toml")
        assert str(info.value).startswith("node.toml: ") and message in str(info.value)
    with pytest.raises(ConfigError, match="route names must differ: a"):
        parse_routes([{"name": "a", "model": "m"}, {"name": "a", "model": "n"}], base=None, where="node.toml")


def test_each_model_and_modality_is_loaded_once(tmp_path, monkeypatch):
    import espmed.runtimes

    loads = []

    def fake_load(model, *, device, threads, modality):
        loads.append((Path(model).name, modality))
        meta = SimpleNamespace(to_json=lambda: json.dumps([model, modality]))
        return SimpleNamespace(source=model, metadata=meta)

    monkeypatch.setattr(espmed.runtimes, "load", fake_load)
    router = Router(parse_routes(ROUTES, base=tmp_path, where="t"), device="CPU", threads=1)
    assert loads == [("ct.onnx", None), ("mr.xml", "brain")] and router.models == 2
    assert router.routes[0].segmenter is router.routes[2].segmenter is router.routes[3].segmenter
    assert router.choose(header("MR_small.dcm", BodyPartExamined="BRAIN"), None).route.name == "mr-brain"


def test_spool_keeps_the_caller_and_expires_unrouted_series_on_their_own_clock(tmp_path):
    spool = Spool(tmp_path, series_bytes=1 << 20, spool_bytes=1 << 30, min_free_bytes=0)
    for series_uid in ("1.1", "1.2"):
        spool.store_instance(series_uid, f"{series_uid}.1", b"x")
    spool.note_caller("1.1", "CT_SCANNER")
    spool.note_caller("1.1", "OTHER")  # the first sender's stays
    assert spool.caller("1.1") == "CT_SCANNER" and spool.caller("1.2") is None
    spool.mark_done("1.1", {"1.1.1"}, ["2.25.1"], "ok", route="ct-lung")
    spool.mark_done("1.2", {"1.2.1"}, [], "no route", unrouted=True)
    assert spool.expire(3600, unrouted_seconds=0) == 1
    assert (tmp_path / "instances" / "1.1").is_dir() and not (tmp_path / "instances" / "1.2").exists()


# -- the node end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from .runtime_artifacts import build_artifacts

    paths = build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")
    return paths["onnx"], paths["openvino"]  # two artifacts, two model hashes


def test_two_routes_and_an_unrouted_series(models, tmp_path):
    ct_model, mr_model = models
    keep_s = 2.0
    config = tmp_path / "node.toml"
    config.write_text(f"""
[serve]
series_timeout = 1.0
unrouted_keep_hours = {keep_s / 3600}

[[route]]
name = "ct-chest"
model = "{ct_model}"
match = {{ Modality = "CT", SeriesDescription = "(?i)chest" }}

[[route]]
name = "mr"
model = "{mr_model}"
match = {{ Modality = "MR" }}
""")
    receiver = Receiver().start()
    node = Node(None, tmp_path / "spool", "--config", str(config), "--destination",
                f"DEST@{HOST}:{receiver.port}").start()
    ct, mr, scout = series(2), series(2, "MR_small.dcm"), series(2)
    for ds in ct:
        ds.SeriesDescription = "CHEST 5mm"
    for ds in scout:
        ds.SeriesDescription = "Scout"
    try:
        for batch in (ct, mr, scout):
            assert send(batch, node.port) == [0, 0]
        sops = {name: sorted(str(ds.SOPInstanceUID) for ds in batch) for name, batch in
                (("ct", ct), ("mr", mr), ("scout", scout))}
        for name, model in (("ct", ct_model), ("mr", mr_model)):
            got = wait_for(lambda s=sops[name]: receiver.covering(s), 60, f"the {name} SEG")
            assert [r["sop"] for r in got] == [derived_uid(model_hash(model), *sops[name])]  # that model's UIDs
        wait_for(lambda: node.status().get("counts", {}).get("series_unrouted") == 1, 30, "the unrouted series")
        status = node.status()
        assert status["series_by_route"] == {"ct-chest": 1, "mr": 1}
        assert [r["route"] for r in status["routes"]] == ["ct-chest", "mr"]
        unrouted = [line for line in node.log().splitlines() if "matched no route" in line]
        assert len(unrouted) == 1 and str(scout[0].SeriesInstanceUID) in unrouted[0]
        assert "SeriesDescription 'Scout', calling AE 'SCANNER'" in unrouted[0]
        assert not receiver.covering(sops["scout"])
        folder = node.spool / "instances" / str(scout[0].SeriesInstanceUID)
        assert len(list(folder.glob("*.dcm"))) == 2  # kept for unrouted_keep_hours

        late = series(1, like=scout[0], start=2)  # a late instance routes the series again: still no route
        late[0].SeriesDescription = "Scout"
        assert send(late, node.port) == [0]
        wait_for(lambda: node.status()["counts"]["series_unrouted"] == 2, 30, "the late instance routed")
        node.stop()
        done = json.loads((node.spool / "done" / f"{folder.name}.json").read_text())
        assert done["unrouted"] is True and len(done["instances"]) == 3
        time.sleep(max(0.0, done["time"] + keep_s - time.time()))
        node.start()  # expired at the first sweep; not routed again
        wait_for(lambda: not folder.exists(), 30, "the unrouted series removed")
        assert "0 pending series resumed" in node.logs[-1].read_text()
        assert node.status()["counts"]["series_unrouted"] == 0
        time.sleep(0.5)
        assert len(receiver.records) == 2  # one SEG per routed series, nothing re-sent
    finally:
        node.stop()
        receiver.stop()
    print("\n| series | Modality | route matched | model used | SEG count |\n|---|---|---|---|---|")
    for name, modality, route, model, key in (("CT, 'CHEST 5mm'", "CT", "ct-chest", ct_model.name, "ct"),
                                              ("MR", "MR", "mr", mr_model.name, "mr"),
                                              ("CT, 'Scout' (+1 late)", "CT", "none", "none", "scout")):
        print(f"| {name} | {modality} | {route} | {model} | {len(receiver.covering(sops[key]))} |")
