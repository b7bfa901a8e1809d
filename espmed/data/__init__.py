"""Segmentation data: readers for the release/folder/CSV/volume layouts, the reference task's real
data, MONAI augmentation and the training dataset (shared numpy preprocessing)."""

from .dataset import EpochSampler, SegmentationDataset, TrainItem, letterbox_mask
from .sources import Sample, read_image, read_mask
from .specs import DatasetSpecError, load_samples, train_items

__all__ = [
    "DatasetSpecError",
    "EpochSampler",
    "Sample",
    "SegmentationDataset",
    "TrainItem",
    "letterbox_mask",
    "load_samples",
    "read_image",
    "read_mask",
    "train_items",
]
