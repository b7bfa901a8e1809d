"""Segmentation data: the release/folder/CSV/volume layouts (files read by `espmed.io`), the reference
task's real data, MONAI augmentation and the training dataset (shared numpy preprocessing)."""

from .dataset import EpochSampler, SegmentationDataset, TrainItem, letterbox_mask
from .sources import Sample
from .specs import load_samples, train_items

__all__ = [
    "EpochSampler",
    "Sample",
    "SegmentationDataset",
    "TrainItem",
    "letterbox_mask",
    "load_samples",
    "train_items",
]
