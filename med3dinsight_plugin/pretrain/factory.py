"""The model factory: the :class:`~med3dinsight_plugin.model.Med3DInsightModel` a pretraining config describes."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..alignment import Med3DInsightLoss
from ..backbones import build_backbone
from ..dense import DenseHead
from ..model import Med3DInsightModel
from ..psat import PlaneSliceAwareTransformer
from .config import ConfigError, PretrainConfig, check_backbone_kwargs

__all__ = ["build_model"]


def build_model(config: PretrainConfig, embed_dim: int = 512, text_dim: Optional[int] = None,
                map_shape: Optional[Sequence[int]] = None) -> Med3DInsightModel:
    """The :class:`Med3DInsightModel` that ``config.model`` describes, initialised from ``config.train.seed``.

    The one place where backbone, PSAT, dense head and loss are put together: pretraining, ``med3dinsight models``
    and the examples all build their model here.

    Args:
        config: a :class:`~.config.PretrainConfig`; its ``model`` section says what to
            build, ``train.seed`` seeds ``torch`` before the weights are drawn.
        embed_dim: the image teacher's embedding width (PSAT's ``out_dim`` and the loss width; BiomedCLIP: 512).
        text_dim: ``None`` when the text targets share the image space (open_clip), else their width: PSAT gets a
            text head and the loss a text alignment of their own (the teacher cache's ``text_dim`` when its
            ``shared_space`` is False).
        map_shape: the cached teacher maps' (C, S, S) (the cache's ``map_shape``), needed for dense distillation
            (``model.loss_weights.dense`` or ``model.loss_balance.dense``); ``None``: the cache has none.

    Returns:
        A fresh model (identical on every rank), with ``model.reconstruction`` / ``mask_ratio`` / ``mask_block``.

    Raises:
        ConfigError: a bad backbone argument, ``model.mask_block`` leaving fewer than 2 mask blocks in the patch, or
            dense distillation asked for without teacher maps.
    """
    m = config.model
    check_backbone_kwargs(m)
    torch.manual_seed(config.train.seed)
    backbone = build_backbone(m.backbone, in_channels=m.in_channels, patch_size=m.patch_size or None,
                              **m.backbone_kwargs)
    psat_kwargs = {"out_dim": embed_dim, **{k: v for k, v in m.psat_kwargs.items() if k not in ("in_dim", "text_dim")}}
    psat = PlaneSliceAwareTransformer.from_preset(m.psat, in_dim=backbone.token_dim, text_dim=text_dim,
                                                  **psat_kwargs)
    w = m.loss_weights
    dense_on = bool(w.dense) or m.loss_balance.dense is not None
    dense_head = None
    if dense_on:
        if map_shape is None:
            raise ConfigError("dense distillation (model.loss_balance.dense, on by default, or "
                              "model.loss_weights.dense) needs a teacher cache with feature maps: rerun med3dinsight "
                              "embed with --feature-maps 7 into a new folder, or train the paper's recipe instead: "
                              "--set model.loss_balance.dense=null --set model.loss_weights.image=1 --set "
                              "model.loss_weights.text=1")
        channels, size, _ = (int(v) for v in map_shape)
        dense_head = DenseHead(backbone.token_dim, channels, size)
    loss = Med3DInsightLoss(m.alignment, embed_dim=embed_dim, image_weight=w.image, text_weight=w.text,
                            reconstruction_weight=w.reconstruction, text_dim=text_dim,
                            dense_weight=w.dense if dense_on else 0.0, dense_loss=m.dense_loss)
    if m.reconstruction == "masked":
        grid = [-(-size // m.mask_block) for size in backbone.patch_size]
        if grid[0] * grid[1] * grid[2] < 2:
            raise ConfigError(f"model.mask_block={m.mask_block} leaves a single mask block in the "
                              f"{'x'.join(map(str, backbone.patch_size))} patch: masked reconstruction would hide "
                              f"the whole input; lower model.mask_block")
    return Med3DInsightModel(backbone, psat, loss, reconstruction=m.reconstruction, mask_ratio=m.mask_ratio,
                             mask_block=m.mask_block, dense_head=dense_head)
