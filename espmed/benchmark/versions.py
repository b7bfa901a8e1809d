"""The library versions a benchmark records: they decide what it measures, and a cached export made
under other versions is not reused."""

from __future__ import annotations

import platform

#: Distributions whose versions decide what a benchmark measures.
LIBRARIES = (
    "espmed",
    "numpy",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnxsim",
    "onnxslim",
    "openvino",
    "nncf",
    "tensorrt",
    "safetensors",
    "pillow",
    "matplotlib",
    "psutil",
)


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions of `names` (absent ones omitted), plus Python's."""
    from espmed.export.manifest import library_versions as installed

    return {"python": platform.python_version(), **installed(names)}
