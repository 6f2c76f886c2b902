"""Ignite handlers: load a pretrained encoder when an engine starts; warm-up / poly / frozen-encoder schedule."""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Tuple, Union

import torch
from ignite.engine import Engine, Events

from ..errors import Med3DInsightError
from ..finetune import apply_finetune_lr, finetune_lr_factor
from ..loading import LoadReport, load_pretrained_encoder

__all__ = ["FinetuneSchedule", "PretrainedEncoderLoader"]


class PretrainedEncoderLoader:
    """Load pretrained encoder weights into ``network`` when the engine starts, and log the load report.

    The replacement for ``CheckpointLoader(strict_shape=False)``, which loads nothing without an error: loading is
    exact or it raises :class:`~med3dinsight_plugin.IncompatibleCheckpointError` before the first iteration.

    Args:
        checkpoint: a med3dinsight ``.safetensors``, MONAI ``model_swinvit.pt``, nnU-Net / nnssl checkpoint or state
            dict file, or ``hf-hub:ORG/REPO[@REVISION]`` (resolved through huggingface_hub's cache when the engine
            starts; offline, a file missing from the cache fails there with one line).
        network: the model to load into (SwinUNETR, UNETR, an nnU-Net network, a classifier, a bare encoder).
        strict_encoder, adapt_channels, scope: as :func:`~med3dinsight_plugin.load_pretrained_encoder`.
        name: logger name; default the engine's logger.

    In a MONAI bundle config::

        {"_target_": "med3dinsight_plugin.monai_support.PretrainedEncoderLoader",
         "checkpoint": "$@bundle_root + '/models/med3dinsight.safetensors'", "network": "@network"}

    or ``"checkpoint": "hf-hub:ORG/REPO"`` for weights published with ``med3dinsight push``.
    """

    def __init__(self, checkpoint: Union[str, os.PathLike], network: torch.nn.Module, strict_encoder: bool = True,
                 adapt_channels: bool = True, scope: str = "encoder", name: Optional[str] = None):
        self.checkpoint, self.network = checkpoint, network
        self.kwargs = dict(strict_encoder=strict_encoder, adapt_channels=adapt_channels, scope=scope)
        self.logger = logging.getLogger(name) if name else None
        self.report: Optional[LoadReport] = None

    def attach(self, engine: Engine) -> None:
        if self.logger is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.report = load_pretrained_encoder(self.network, self.checkpoint, **self.kwargs)
        (self.logger or engine.logger).info("%s", self.report)


class FinetuneSchedule:
    """Per-iteration learning rates for fine-tuning a pretrained encoder
    (:func:`~med3dinsight_plugin.finetune.finetune_lr_factor`).

    Every parameter group warms up linearly from 0 over ``warmup_epochs``, then decays polynomially (nnU-Net's poly,
    exponent 0.9) from its peak to 0 at the last iteration. Groups marked ``"encoder": True`` are held at learning
    rate 0 for the first ``frozen_encoder_epochs`` (frozen by learning rate, not ``requires_grad``, which is safe
    under DDP) and then get their own warm-up. Each group's peak rate is its ``"lr"`` when the schedule is created.

    Args:
        optimizer: the optimizer whose groups to drive.
        warmup_epochs: length of the linear warm-up.
        frozen_encoder_epochs: epochs during which encoder groups do not move.

    ``history`` holds ``(epoch, [lr per group])`` at the end of each epoch; each is also logged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_epochs: float = 0, frozen_encoder_epochs: int = 0):
        if warmup_epochs < 0 or frozen_encoder_epochs < 0:
            raise Med3DInsightError("warmup_epochs and frozen_encoder_epochs must be >= 0")
        self.optimizer, self.warmup_epochs, self.frozen = optimizer, warmup_epochs, frozen_encoder_epochs
        for group in optimizer.param_groups:
            group.setdefault("peak_lr", group["lr"])
        self.history: List[Tuple[int, List[float]]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log)

    def factor(self, iteration: int, epoch_length: int, max_epochs: int, encoder: bool) -> float:
        """Fraction of the peak rate at a 0-based iteration."""
        return finetune_lr_factor(iteration, epoch_length * max_epochs, self.warmup_epochs * epoch_length,
                                  self.frozen * epoch_length, encoder)

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        apply_finetune_lr(self.optimizer, state.iteration - 1, state.epoch_length * state.max_epochs,
                          self.warmup_epochs * state.epoch_length, self.frozen * state.epoch_length)

    def _log(self, engine: Engine) -> None:
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.history.append((engine.state.epoch, lrs))
        engine.logger.info("epoch %d learning rates: %s", engine.state.epoch, ", ".join(f"{lr:.3g}" for lr in lrs))
