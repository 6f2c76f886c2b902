"""3D classification on a pretrained encoder: bottleneck tokens -> pooling -> linear head."""
from __future__ import annotations

import os
from typing import Union

import torch
from torch import nn

from .backbones import Backbone, build_backbone
from .checkpoint import load_checkpoint
from .errors import Med3DInsightError
from .export import rebuild_backbone
from .fileio import freeze
from .loading import load_pretrained_encoder

__all__ = ["Med3DInsightClassifier"]


class Med3DInsightClassifier(nn.Module):
    """Classify volumes from the encoder of any backbone (SwinUNETR, UNETR, PlainConvUNet, ResEncUNet).

    Args:
        backbone: a :class:`Backbone`, or a backbone name for ``build_backbone`` (then ``**backbone_kwargs``).
        num_classes: output logits.
        pooling: ``"avg"``, ``"max"`` or ``"attention"`` (a learned query attends over the tokens).
        dropout: before the linear head.

    Only the path to the bottleneck runs; the other parameters (decoder, skip-connection blocks, parameters the
    network never uses) are frozen (``requires_grad=False``) so DDP needs no ``find_unused_parameters``.
    ``load_pretrained_encoder(classifier, checkpoint)`` loads into its network.
    """

    def __init__(self, backbone: Union[Backbone, str], num_classes: int, pooling: str = "avg", dropout: float = 0.0,
                 **backbone_kwargs):
        super().__init__()
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, **backbone_kwargs)
        if pooling not in ("avg", "max", "attention"):
            raise ValueError(f"pooling must be 'avg', 'max' or 'attention', got {pooling!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.backbone, self.pooling = backbone, pooling
        width = backbone.token_dim
        if pooling == "attention":
            self.query = nn.Parameter(torch.zeros(1, 1, width))
            self.attention = nn.MultiheadAttention(width, num_heads=max(1, width // 64), batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Dropout(dropout), nn.Linear(width, num_classes))
        used = tuple(f"network.{q}" for q in backbone.bottleneck_prefixes)
        dead = {f"network.{n}" for n in backbone.dead_parameters()}
        freeze(backbone, [n for n, _ in backbone.named_parameters() if not n.startswith(used) or n in dead])

    @classmethod
    def from_pretrained(cls, checkpoint: Union[str, os.PathLike], num_classes: int, in_channels: int = None,
                        **kwargs) -> "Med3DInsightClassifier":
        """Build the checkpoint's backbone (optionally for another channel count) and load its encoder.

        The :class:`~med3dinsight_plugin.LoadReport` is kept as ``.load_report``."""

        ckpt = load_checkpoint(checkpoint)
        if ckpt.source_format != "med3dinsight":
            raise Med3DInsightError(f"{ckpt.path} has no med3dinsight metadata; build the classifier with its backbone "
                             f"name and load the weights with load_pretrained_encoder")
        # built under the checkpoint's allocation guard; the encoder is loaded (and its input layer adapted) below
        backbone = rebuild_backbone(ckpt, in_channels=in_channels, load_weights=False)
        model = cls(backbone, num_classes, **kwargs)
        model.load_report = load_pretrained_encoder(model, ckpt)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.tokens(x)  # (B, N, C)
        if self.pooling == "avg":
            pooled = tokens.mean(1)
        elif self.pooling == "max":
            pooled = tokens.amax(1)
        else:
            pooled = self.attention(self.query.expand(len(tokens), -1, -1), tokens, tokens, need_weights=False)[0][:, 0]
        return self.head(pooled)
