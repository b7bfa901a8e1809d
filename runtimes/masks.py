"""The mask rule, defined once: a pixel is foreground when its logit is `>= threshold`
(`mask_threshold` in the metadata). The runtimes, the export gate, the benchmark and evaluation all
call it; mask agreement (Dice, IoU) is `espmed.metrics`'. Torch-free.
"""

from __future__ import annotations

import numpy as np


def mask_from_logits(logits: np.ndarray, threshold: float) -> np.ndarray:
    """bool mask (same shape as `logits`): logit >= threshold."""
    return np.asarray(logits) >= threshold
