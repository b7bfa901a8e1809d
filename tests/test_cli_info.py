"""`espmed --version`, `espmed info`, `espmed convert` through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from espmed import __version__


def _espmed(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from espmed.cli import run; sys.argv[0] = 'espmed'; run()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_version():
    r = _espmed("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"espmed {__version__}"


def test_info_on_release_checkpoint(golden_dir):
    r = _espmed("info", "--checkpoint", str(golden_dir / "official_random_state_dict.pth"), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["parameters"]["total"] == 12_461_727
    assert abs(data["gflops"] - 113.4) < 0.1
    assert data["input_size"] == 1024
    assert data["modalities"][3] == "fundus"
    assert data["preprocessing"]["std"] == [123.675, 116.28, 103.53]


def test_convert_then_info_on_native(golden_dir, tmp_path):
    out = tmp_path / "fundus.safetensors"
    release = f"fundus={golden_dir / 'official_random_state_dict.pth'}"
    r = _espmed("convert", "--release", release, "--out", str(out), "--imgsz", "512")
    assert r.returncode == 0, r.stderr
    data = json.loads(_espmed("info", "--checkpoint", str(out), "--json").stdout)
    assert data["modalities_with_controller"] == ["fundus"]
    assert data["input_size"] == 512
    assert data["parameters"]["total"] == 12_461_727


def test_bad_checkpoint_is_one_line_error(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\x00" * 100)
    r = _espmed("info", "--checkpoint", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a PyTorch checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


def test_atomic_writes_get_the_umask_mode_not_0600(tmp_path):
    import os

    from espmed.atomic import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
