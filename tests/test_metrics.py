"""Metrics: known values, empty-mask rules, and agreement with direct numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from espmed.metrics import dice, iou, segmentation_metrics
from espmed.runtimes.masks import mask_from_logits


def _square(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def test_shifted_square_known_values():
    a = _square((64, 64), 10, 30, 10, 30)
    b = _square((64, 64), 12, 32, 10, 30)  # 2 px shift: overlap 18 x 20
    m = segmentation_metrics(a, b)
    assert m["dice"] == pytest.approx(2 * 360 / 800, abs=1e-6)
    assert m["iou"] == pytest.approx(360 / 440, abs=1e-6)
    assert m["hd95"] == pytest.approx(2.0)
    assert m["nsd"] == pytest.approx(1.0)  # every boundary point within the 2 px tolerance
    assert segmentation_metrics(a, b, nsd_tolerance=1.0)["nsd"] < 1.0
    assert dice(a, b) == pytest.approx(m["dice"], abs=1e-6) and iou(a, b) == pytest.approx(m["iou"], abs=1e-6)


def test_hd95_matches_a_distance_transform():
    rng = np.random.default_rng(0)
    a = ndimage.binary_dilation(rng.random((48, 48)) > 0.97, iterations=3)
    b = ndimage.binary_dilation(rng.random((48, 48)) > 0.97, iterations=3)

    def surface(m):
        return m & ~ndimage.binary_erosion(m)

    def directed(x, y):
        dist = ndimage.distance_transform_edt(~surface(y))
        return dist[surface(x)]

    expected = max(np.percentile(directed(a, b), 95), np.percentile(directed(b, a), 95))
    assert segmentation_metrics(a, b)["hd95"] == pytest.approx(expected, rel=1e-4)


def test_empty_masks():
    empty = np.zeros((30, 40), bool)
    full = _square((30, 40), 5, 10, 5, 10)
    assert segmentation_metrics(empty, empty) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    for pred, truth in ((empty, full), (full, empty)):
        m = segmentation_metrics(pred, truth)
        assert m["dice"] == 0.0 and m["iou"] == 0.0 and m["nsd"] == 0.0
        assert m["hd95"] == pytest.approx(math.hypot(30, 40))  # the image diagonal: worst finite value
    assert dice(empty, empty) == iou(empty, empty) == 1.0 and dice(empty, full) == iou(full, empty) == 0.0
    assert segmentation_metrics(full, empty, spacing=(2.0, 0.5))["hd95"] == pytest.approx(math.hypot(60, 20))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        segmentation_metrics(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_mask_rule_counts_a_logit_at_the_threshold_as_foreground():
    logits = np.array([[-0.5, 0.0], [0.25, 1.0]], np.float32)
    assert mask_from_logits(logits, 0.0).tolist() == [[False, True], [True, True]]
    assert mask_from_logits(logits, 0.25).tolist() == [[False, False], [True, True]]


def test_dice_refuses_masks_of_different_shapes():
    with pytest.raises(ValueError, match="mask shapes differ"):
        dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
