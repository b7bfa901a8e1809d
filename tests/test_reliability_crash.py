"""Crash safety: SIGKILL a writer mid-write; nothing broken is left under the final name.

Covers the atomic-write helper itself (a slow large write), a checkpoint save and a whole
`espmed export`, plus a scan of the code base for writes that bypass `espmed.atomic`.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .runtime_artifacts import write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            stderr = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"writer exited early ({proc.returncode}): {stderr}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("writer never reached the point to kill it at")
        time.sleep(0.02)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


SLOW_WRITER = """
import sys, time
from espmed.atomic import atomic_open
with atomic_open(sys.argv[1], "wb") as fh:
    for i in range(4096):
        fh.write(bytes([i % 251]) * 65536)
        fh.flush()
        if i == 64:
            print("halfway", flush=True)
        time.sleep(0.002)
"""


def test_sigkill_during_atomic_write_keeps_the_old_file(tmp_path):
    final = tmp_path / "result.bin"
    final.write_bytes(b"previous complete result")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(final)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "halfway"
    temps = list(tmp_path.glob(".result.bin.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size >= 64 * 65536  # really mid-write
    kill(proc)
    assert final.read_bytes() == b"previous complete result"
    # A rerun succeeds and replaces the file whole; the killed run's hidden temp file is inert.
    from espmed.atomic import write_bytes

    write_bytes(final, b"new result")
    assert final.read_bytes() == b"new result"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["result.bin"]


SAVE_LOOP = """
import sys
from espmed.model import load_checkpoint, save_checkpoint
model = load_checkpoint(sys.argv[1])
print("loaded", flush=True)
while True:
    save_checkpoint(model, sys.argv[2])
"""


def test_sigkill_during_checkpoint_saves_leaves_a_loadable_checkpoint(tmp_path):
    from espmed.model import load_checkpoint

    source = write_checkpoint(tmp_path / "source.safetensors")
    final = tmp_path / "model.safetensors"
    for delay in (0.05, 0.3, 0.9):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(source), str(final)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stdout.readline().strip() == "loaded"
        wait_for(lambda: any(tmp_path.glob(".model.safetensors.*.tmp")), 60, proc)
        time.sleep(delay)
        kill(proc)
        if final.exists():  # whatever is under the final name is a whole checkpoint
            load_checkpoint(final)
    assert final.exists()
    load_checkpoint(final)


def test_sigkill_during_export_leaves_no_artifact_and_a_rerun_succeeds(tmp_path):
    from espmed.runtimes import load

    checkpoint = write_checkpoint(tmp_path / "tiny.safetensors", modalities=("brain",))
    out = tmp_path / "out"
    artifact = out / "model.onnx"
    args = [sys.executable, "-c", "from espmed.cli import run; run()", "export", "-c", str(checkpoint),
            "-t", "onnx", "--simplify", "none", "-o", str(artifact)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Kill once the exporter has started writing into its staging folder.
    wait_for(lambda: any(f.is_file() for d in out.glob(".model.onnx.*") for f in d.rglob("*")), 240, proc)
    kill(proc)
    assert not artifact.exists() and not artifact.with_name("model.onnx.manifest.json").exists()
    assert [p for p in out.iterdir() if not p.name.startswith(".")] == []

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert artifact.is_file() and artifact.with_name("model.onnx.manifest.json").is_file()
    seg = load(artifact)  # the manifest hashes verify
    assert seg.metadata.modality == "brain"


#: Calls that write a file by themselves. Every hit outside espmed/atomic.py must be in ALLOWED.
DIRECT_WRITE = re.compile(
    r"(?<![\w.])open\([^)]*['\"][wax]b?\+?['\"]|\.write_text\(|\.write_bytes\(|np\.save|\.savez|\bnib\.save\(|torch\.save\(|"
    r"save_file\(|onnx\.save|save_model\(|dcmwrite\(|\.save_as\(|\.to_csv\(|savefig\(|\.save\("
)
#: (path, fragment of the line) -> why it is safe.
ALLOWED = {
    ("espmed/model/checkpoint.py", "save_file(tensors, str(tmp)"): "inside atomic_path",
    ("espmed/train/teacher.py", "save_file({\"embedding\""): "inside atomic_path",
    ("espmed/train/engine.py", "torch.save("): "inside atomic_path",
    ("espmed/train/engine.py", 'open(self.path, "a")'): "append-only JSON-lines training log",
    ("espmed/benchmark/worker.py", "np.savez(fh"): "into an atomic_open handle",
    ("espmed/io/npz.py", "np.savez_compressed(fh"): "into an atomic_open handle",
    ("espmed/benchmark/report.py", "fig.savefig(tmp"): "inside atomic_path",
    ("espmed/io/dicom_seg.py", "seg.save_as(fh)"): "into an atomic_open handle",
    ("espmed/serve/spool.py", 'open(tmp, "wb")'): "inside atomic_path (checked before it is published)",
    ("espmed/io/writers.py", ".save(buf"): "into a BytesIO, then espmed.atomic.write_bytes",
    ("espmed/train/evaluate.py", ".save(buf"): "into a BytesIO",
    ("export/onnx_export.py", "onnx.save_model("): "into the export staging folder, published by export/manifest.py",
    ("export/openvino_export.py", "ov.save_model("): "into the export staging folder, published by export/manifest.py",
    ("runtimes/triton_server.py", 'open(self.log_path, "ab")'): "the local server's own log, appended by the child",
}


def test_no_direct_writes_outside_the_atomic_helper():
    hits = []
    for root in ("espmed", "export", "runtimes"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel == "espmed/atomic.py":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if DIRECT_WRITE.search(code) and not any(p == rel and frag in code for p, frag in ALLOWED):
                    hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "writes that bypass espmed.atomic:\n" + "\n".join(hits)
