"""Fine-tuning a pretrained encoder: parameter groups and the learning-rate schedule, shared by the nnU-Net trainers
(per epoch) and the MONAI trainer (per iteration).

nnssl's recipe for a pretrained encoder: a linear warm-up to the peak rate, then nnU-Net's polynomial decay over the
remaining steps, restarted from the peak (nnssl's ``Lin_incr_LRScheduler`` then ``PolyLRScheduler_offset``). An
optional frozen-encoder start holds the encoder at rate 0 -- frozen by learning rate, which is DDP-safe, unlike
toggling ``requires_grad`` -- and then gives it its own warm-up.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from .backbones import network_spec
from .errors import Med3DInsightError
from .fileio import freeze, unwrap
from .loading import target_network

__all__ = ["apply_finetune_lr", "default_warmup", "finetune_lr_factor", "finetune_optimizer", "finetune_param_groups",
           "freeze_dead_parameters"]


def freeze_dead_parameters(network: nn.Module) -> List[str]:
    """Set ``requires_grad=False`` on parameters the network never uses (MONAI UNETR's ``norm_cross_attn``), so that
    DDP does not wait for their gradients; returns their names. Call before wrapping in DDP."""

    target = target_network(network)
    spec = network_spec(target)
    return freeze(target, spec.dead_parameters if spec else ())


def finetune_param_groups(network: nn.Module, lr: float, encoder_lr: Optional[float] = None) -> List[dict]:
    """Two optimizer groups: the pretrained encoder (``encoder_lr``, default ``lr``, marked ``"encoder": True``) and
    everything else (``lr``).

    The encoder is what :func:`~med3dinsight_plugin.backbones.network_spec` names for the network (or the network
    inside a classifier / Backbone; DDP and compile wrappers are looked through); parameters with
    ``requires_grad=False`` are left out.
    """

    target = target_network(network)
    spec = network_spec(target)
    if spec is None:
        raise ValueError(f"cannot tell the encoder of a {type(target).__name__}; pass your own parameter groups")
    encoder_ids = {id(p) for n, p in target.named_parameters() if n.startswith(spec.encoder_prefixes)}
    params = [p for p in unwrap(network).parameters() if p.requires_grad]
    encoder = [p for p in params if id(p) in encoder_ids]
    other = [p for p in params if id(p) not in encoder_ids]
    groups = [{"params": encoder, "lr": encoder_lr if encoder_lr is not None else lr, "encoder": True}]
    return groups + ([{"params": other, "lr": lr, "encoder": False}] if other else [])


def finetune_lr_factor(step: int, total: int, warmup: float, frozen: int = 0, encoder: bool = False,
                       exponent: float = 0.9) -> float:
    """Fraction of its peak learning rate a parameter group uses at 0-based ``step`` of ``total``.

    Args:
        step: current step (epoch or iteration), counted from 0.
        total: number of steps in the run.
        warmup: steps of linear warm-up (0: none).
        frozen: steps during which encoder groups stay at 0.
        encoder: whether the group is the pretrained encoder.
        exponent: poly decay exponent (nnU-Net: 0.9).
    """
    start = frozen if encoder else 0
    if step < start:
        return 0.0
    t = step - start
    if t < warmup:
        return min(1.0, (t + 1) / warmup)  # a fractional warm-up ends at the peak, never above it
    remaining = max(1.0, total - start - warmup)
    return max(0.0, 1.0 - (t - warmup) / remaining) ** exponent


def default_warmup(epochs: int) -> int:
    """nnssl's warm-up length: 50 epochs of 1000, otherwise 10 % of the epochs (at least 1)."""
    return 50 if epochs >= 1000 else max(1, round(0.1 * epochs))


def finetune_optimizer(groups: List[dict], name: str, lr: float, weight_decay: float):
    """nnssl's optimizers: ``"adamw"`` (betas 0.9, 0.98; transformers) or ``"sgd"`` (momentum 0.99, Nesterov; CNNs)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=0.99, nesterov=True)
    raise Med3DInsightError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")


def apply_finetune_lr(optimizer, step: int, total: int, warmup: float, frozen: int = 0) -> None:
    """Set every group's learning rate to its peak (its ``lr`` the first time this is called) times
    :func:`finetune_lr_factor`; groups marked ``"encoder": True`` honour ``frozen``."""
    for group in optimizer.param_groups:
        peak = group.setdefault("peak_lr", group["lr"])
        group["lr"] = peak * finetune_lr_factor(step, total, warmup, frozen, bool(group.get("encoder")))
