"""Import Meta's `segment_anything` as a test oracle.

The package imports torchvision at import time (for its predictor and mask generator utilities),
and PyPI's torchvision does not load beside the CPU torch we pin. The modules compared here never
use torchvision, so when it is missing the tests install inert stand-ins for the few names the
package imports, and nothing else.
"""

from __future__ import annotations

import importlib
import sys
import types


def import_segment_anything():
    try:
        import torchvision  # noqa: F401
    except Exception:
        def _unavailable(*_a, **_k):
            raise RuntimeError("torchvision stand-in: not available in tests")

        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                     "torchvision.ops", "torchvision.ops.boxes"):
            sys.modules[name] = types.ModuleType(name)
        tf = sys.modules["torchvision.transforms.functional"]
        tf.resize = tf.to_pil_image = _unavailable
        boxes = sys.modules["torchvision.ops.boxes"]
        boxes.batched_nms = boxes.box_area = _unavailable
        sys.modules["torchvision.ops"].batched_nms = _unavailable
    return importlib.import_module("segment_anything")
