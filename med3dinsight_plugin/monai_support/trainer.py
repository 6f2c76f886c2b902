"""``Med3DInsightSupervisedTrainer``: MONAI's SupervisedTrainer that starts from a pretrained encoder."""
from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Union

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch import nn

from ..checkpoint import Checkpoint
from ..finetune import default_warmup, finetune_optimizer, finetune_param_groups, freeze_dead_parameters
from ..loading import load_pretrained_encoder
from .handlers import FinetuneSchedule

__all__ = ["Med3DInsightSupervisedTrainer"]


class Med3DInsightSupervisedTrainer(SupervisedTrainer):
    """Fine-tune a network from a pretrained encoder with the schedule a pretrained encoder needs.

    Loads the encoder at construction (exact, or :class:`~med3dinsight_plugin.IncompatibleCheckpointError`), builds
    the optimizer with separate learning rates for the encoder and the new layers, warms up linearly, decays
    polynomially, optionally keeps the encoder frozen (learning rate 0) for the first epochs, and logs the load report
    when training starts and the learning rates after each epoch.

    Args:
        device, max_epochs, train_data_loader, network, loss_function: as ``SupervisedTrainer``.
        checkpoint: the pretrained weights (any format :func:`~med3dinsight_plugin.load_checkpoint` reads).
        lr: peak learning rate of the new layers (nnssl's transformer recipe: AdamW 1e-4).
        encoder_lr: peak learning rate of the encoder; default ``lr``.
        optimizer: ``"adamw"`` (betas 0.9, 0.98) or ``"sgd"`` (momentum 0.99, Nesterov; nnssl's CNN recipe, lr 1e-3).
        weight_decay: default 5e-2 (AdamW) as nnssl.
        warmup_epochs: linear warm-up; default 10 % of ``max_epochs`` (50 of 1000), at least 1.
        frozen_encoder_epochs: epochs with the encoder held at learning rate 0.
        strict_encoder, adapt_channels: as :func:`~med3dinsight_plugin.load_pretrained_encoder`.
        **kwargs: passed to ``SupervisedTrainer`` (inferer, amp, train_handlers, ...).

    Attributes:
        load_report: the :class:`~med3dinsight_plugin.LoadReport`.
        schedule: the :class:`FinetuneSchedule` attached to this engine.
    """

    def __init__(self, device: Union[str, torch.device], max_epochs: int, train_data_loader: Iterable,
                 network: nn.Module, loss_function: Callable, checkpoint: Union[str, os.PathLike, Checkpoint],
                 lr: float = 1e-4, encoder_lr: Optional[float] = None, optimizer: str = "adamw",
                 weight_decay: float = 5e-2, warmup_epochs: Optional[float] = None, frozen_encoder_epochs: int = 0,
                 strict_encoder: bool = True, adapt_channels: bool = True, **kwargs):
        report = load_pretrained_encoder(network, checkpoint, strict_encoder=strict_encoder,
                                         adapt_channels=adapt_channels)
        freeze_dead_parameters(network)  # unused parameters would stall DDP's gradient reduction
        opt = finetune_optimizer(finetune_param_groups(network, lr, encoder_lr), optimizer, lr, weight_decay)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network,
                         optimizer=opt, loss_function=loss_function, **kwargs)
        self.load_report = report
        warmup = default_warmup(max_epochs) if warmup_epochs is None else warmup_epochs
        self.schedule = FinetuneSchedule(opt, warmup, frozen_encoder_epochs)
        self.schedule.attach(self)
        self.add_event_handler(Events.STARTED, lambda engine: engine.logger.info("%s", report))
