"""espmed.runtimes: run exported artifacts with numpy + a backend (no torch).

    from espmed.runtimes import load
    seg = load("model.onnx")            # or model.xml (OpenVINO), model.engine, a checkpoint
    result = seg.predict(image)         # result.mask: bool, the image's own H x W
    # a box-prompted pair (espmed export --prompt box): embed once, decode any number of boxes
    embedding = seg.embed(image)
    boxes = seg.decode(embedding, [[x0, y0, x1, y1]])  # boxes.masks (N, H, W), boxes.iou (N,)

Backends are imported only when an artifact of their kind is loaded; torch only for a checkpoint.
"""

from .base import BoxPrediction, ImageEmbedding, Prediction, Segmenter
from .loader import load

__all__ = ["BoxPrediction", "ImageEmbedding", "Prediction", "Segmenter", "load"]
