"""Training core: MMDKD distillation (stages 1-2), segmentation training (stage 3), evaluation."""

from .config import RunConfig, load_config, parse_config
from .engine import build_model, set_trainable, train
from .evaluate import evaluate, mean_dice_by_modality, predict_logits

__all__ = [
    "RunConfig",
    "build_model",
    "evaluate",
    "load_config",
    "mean_dice_by_modality",
    "parse_config",
    "predict_logits",
    "set_trainable",
    "train",
]
