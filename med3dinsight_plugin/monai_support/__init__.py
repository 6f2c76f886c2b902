"""MONAI / Ignite integration: a weight-loading handler, a fine-tuning schedule, a fine-tuning trainer.

Importing this package imports MONAI's engines and pytorch-ignite; the core package never does.
"""
from ..classifier import Med3DInsightClassifier
from ..finetune import finetune_param_groups
from .handlers import FinetuneSchedule, PretrainedEncoderLoader
from .trainer import Med3DInsightSupervisedTrainer

__all__ = ["FinetuneSchedule", "Med3DInsightClassifier", "Med3DInsightSupervisedTrainer", "PretrainedEncoderLoader",
           "finetune_param_groups"]
