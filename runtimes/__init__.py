"""espmed.runtimes: run exported artifacts with numpy + a backend (no torch).

    from espmed.runtimes import load
    seg = load("model.onnx")            # or model.xml (OpenVINO), model.engine, a checkpoint
    result = seg.predict(image)         # result.mask: bool, the image's own H x W

Backends are imported only when an artifact of their kind is loaded; torch only for a checkpoint.
"""

from .base import Prediction, Segmenter
from .loader import load

__all__ = ["Prediction", "Segmenter", "load"]
