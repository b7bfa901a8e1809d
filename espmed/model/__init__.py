"""ESP-MedSAM in plain PyTorch: `ESPMedSAM(config)` and `load_checkpoint(path)`."""

from .checkpoint import (
    default_checkpoint,
    load_checkpoint,
    load_release_checkpoint,
    merge_release_checkpoints,
    save_checkpoint,
)
from .config import PRESETS, RELEASE_MODALITIES, ModelConfig, Preprocessing, get_preset
from .esp_medsam import ESPMedSAM, SegmentationOutput

__all__ = [
    "ESPMedSAM",
    "ModelConfig",
    "PRESETS",
    "Preprocessing",
    "RELEASE_MODALITIES",
    "SegmentationOutput",
    "default_checkpoint",
    "get_preset",
    "load_checkpoint",
    "load_release_checkpoint",
    "merge_release_checkpoints",
    "save_checkpoint",
]
