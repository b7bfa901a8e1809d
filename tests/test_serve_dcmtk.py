"""`espmed serve` with a real external DICOM toolkit on both sides: dcmtk's echoscu and storescu send
(a CT series, a JPEG-LS compressed MR), dcmtk's storescp is the destination, and the SEGs it
stores are read back with highdicom and reference the sources."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .serve_node import HOST, Node, free_port, series, wait_for


def dcmtk_tool(name: str) -> str | None:
    """dcmtk's `name` on PATH; pynetdicom installs apps of the same names, which are not it."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which(name, path=folder)
        if candidate:
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30)
            if "dcmtk" in (version.stdout + version.stderr).lower():
                return candidate
    return None


TOOLS = {name: dcmtk_tool(name) for name in ("echoscu", "storescu", "storescp")}
pytestmark = pytest.mark.skipif(
    None in TOOLS.values(),
    reason="dcmtk not installed (apt-get install dcmtk; .ci/run installs it where apt can reach its registry)",
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from .runtime_artifacts import build_artifacts

    return build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")["onnx"]


def dcmtk(tool: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([TOOLS[tool], *map(str, args)], capture_output=True, text=True, timeout=120)


def test_storescu_to_espmed_serve_to_storescp(model, tmp_path):
    import highdicom as hd
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import SegmentationStorage

    received = tmp_path / "received"
    received.mkdir()
    dest_port = free_port()
    storescp = subprocess.Popen([TOOLS["storescp"], "--aetitle", "PACS", "--output-directory", str(received),
                                 str(dest_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = Node(model, tmp_path / "spool", "--destination", f"PACS@{HOST}:{dest_port}", "--series-timeout", "1",
                "--allow", "CT_SCANNER").start()
    try:
        assert dcmtk("echoscu", "-aet", "CT_SCANNER", "-aec", "ESPMED", HOST, node.port).returncode == 0
        refused = dcmtk("echoscu", "-aet", "SOMEONE", "-aec", "ESPMED", HOST, node.port)
        assert refused.returncode != 0 and "Rejected" in refused.stdout + refused.stderr

        ct = tmp_path / "ct"
        ct.mkdir()
        sources = series(5)
        for i, ds in enumerate(sources):
            ds.save_as(ct / f"IM{i:04d}", enforce_file_format=True)
        sent = dcmtk("storescu", "-aet", "CT_SCANNER", "-aec", "ESPMED", HOST, node.port, *sorted(ct.iterdir()))
        assert sent.returncode == 0 and "Failed" not in sent.stdout + sent.stderr, sent.stdout + sent.stderr
        compressed = Path(get_testdata_file("MR_small_jp2klossless.dcm"))  # sent as is: JPEG 2000 lossless
        sent = dcmtk("storescu", "--propose-j2k-lossless", "-aet", "CT_SCANNER", "-aec", "ESPMED", HOST, node.port,
                     compressed)
        assert sent.returncode == 0 and "Failed" not in sent.stdout + sent.stderr, sent.stdout + sent.stderr

        files = wait_for(lambda: len(list(received.iterdir())) >= 2 and sorted(received.iterdir()), 60,
                         "two SEGs at storescp")
        by_source = {}
        for path in files:
            seg = hd.seg.segread(path)
            assert seg.SOPClassUID == SegmentationStorage
            refs = {r.ReferencedSOPInstanceUID
                    for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
            by_source[frozenset(refs)] = seg
        ct_seg = by_source[frozenset(str(ds.SOPInstanceUID) for ds in sources)]
        assert ct_seg.StudyInstanceUID == sources[0].StudyInstanceUID
        pixels = ct_seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources], segment_numbers=[1])
        assert pixels.shape == (5, 128, 128, 1)
        mr = pydicom.dcmread(compressed)
        assert frozenset({str(mr.SOPInstanceUID)}) in by_source  # the compressed instance was decoded and segmented
    finally:
        node.stop()
        storescp.terminate()
        storescp.wait(timeout=30)
    assert "series " in node.log() and "ok" in node.log()
