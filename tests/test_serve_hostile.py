"""`espmed serve` against hostile and broken peers (issue 27): a real node subprocess on loopback and
a pynetdicom peer that sends what a scanner never would. Each refusal must be a failure status whose
ErrorComment leads with the reason, and nothing refused may reach the spool."""

from __future__ import annotations

import copy

import pytest

from .serve_node import HOST, Node, series

pytest.importorskip("pynetdicom")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from .runtime_artifacts import build_artifacts

    model = build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")["onnx"]
    spool = tmp_path_factory.mktemp("hostile") / "spool"
    n = Node(model, spool, "--series-timeout", "600").start()
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
