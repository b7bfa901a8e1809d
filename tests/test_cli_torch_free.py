"""On a device install (no torch), the commands that need torch say which extra to install, in one
line with exit 2; the ones that do not need it still work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .test_runtime import TORCH_BLOCKER

CLI = TORCH_BLOCKER + "from espmed.cli import run; sys.argv[0] = 'espmed'; run()"


def espmed_without_torch(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize(
    "args, extra",
    [
        (["info"], "torch"),
        (["convert", "--release", "x.pth", "--out", "x.safetensors"], "torch"),
        (["export", "--target", "openvino"], "export"),
        (["bench", "--targets", "onnx"], "export"),
        (["train", "--config", "configs/tiny.toml"], "train"),
        (["distill", "--config", "configs/tiny.toml"], "train"),
        (["eval", "--checkpoint", "x.safetensors", "--config", "configs/tiny.toml"], "train"),
        (["predict", "image.png", "--model", "model.safetensors", "--out", "out"], "torch"),
    ],
)
def test_commands_that_need_torch_name_the_extra(args, extra, tmp_path):
    (tmp_path / "image.png").write_bytes(b"")
    (tmp_path / "model.safetensors").write_bytes(b"")
    proc = espmed_without_torch(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: torch is not installed (pip install 'espmed[{extra}]')"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.safetensors").exists()


def test_commands_that_do_not_need_torch_still_run(tmp_path):
    assert espmed_without_torch("--version").stdout.startswith("espmed ")
    status = espmed_without_torch("serve", "--status", "--spool", str(tmp_path / "spool"))
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
