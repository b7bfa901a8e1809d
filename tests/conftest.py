"""Shared fixtures. The release golden set lives in ../shared beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ESPMED_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "reference" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "official_random_state_dict.pth").is_file():
        pytest.skip(f"release golden set not found at {GOLDEN} (set ESPMED_SHARED to the shared/ folder)")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """The tiny test model's ONNX artifact (tests/runtime_artifacts.py), built once per session."""
    from .runtime_artifacts import build_artifacts

    return build_artifacts(tmp_path_factory.getbasetemp() / "runtime-artifacts")["onnx"]


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """One intra-op thread for a test: on a shared 2-core machine two threads can be 10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
