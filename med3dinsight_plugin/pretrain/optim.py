"""The optimizer ``train.optimizer`` names and the learning-rate schedule, and old saved states mapped onto today's
parameter groups."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import TrainConfig


def lr_factor(step: int, train: TrainConfig) -> float:
    """Fraction of ``train.lr`` used by 0-based optimizer step ``step``.

    Linear warm-up over ``warmup_steps`` (the first step already uses 1/warmup, never 0), then cosine or poly (0.9)
    decay reaching ``min_lr_ratio`` at ``train.steps``, or constant.
    """
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if train.schedule == "cosine" else (1 - progress) ** 0.9
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * shape


def warmup_note(train: TrainConfig, start: int = 0) -> Optional[str]:
    """A ``note:`` line when the warm-up takes at least half of the run (``2 * warmup_steps >= steps``) and the run
    starts inside it, else ``None``: a short run with the default 500 warm-up steps trains at a tiny learning rate
    (4 steps: 8e-08) and its losses barely move."""
    w, n = train.warmup_steps, train.steps
    if n <= 0 or w <= 0 or 2 * w < n or start >= min(w, n):
        return None
    fix = f"set train.warmup_steps to about a tenth of train.steps (train.warmup_steps={n // 10})"
    if n < w:
        return (f"note: train.steps={n} < train.warmup_steps={w}: the run never leaves its warm-up and its learning "
                f"rate reaches only {train.lr * lr_factor(n - 1, train):.2g} (train.lr {train.lr:g} x {n}/{w}); "
                f"{fix}")
    return (f"note: the warm-up takes {w} of the run's {n} steps (train.warmup_steps={w}, train.steps={n}): half "
            f"of the run or more trains below train.lr; {fix}")


def _optimizer(groups: List[Dict[str, Any]], tc: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names, over ``groups`` (``Med3DInsightModel.param_groups()``: weight decay on
    every trainable tensor but CLIP's temperature).

    Args:
        groups: optimizer parameter groups; a group without ``weight_decay`` takes ``train.weight_decay``.
        tc: the ``train`` section: ``optimizer``, ``lr``, ``weight_decay``, ``betas``.

    Returns:
        ``adamw``: AdamW (decoupled weight decay; the package's default). ``adam_l2``: Adam with the weight decay
        added to the gradient (coupled L2), as the authors train (``torch.optim.Adam(lr=1e-5, weight_decay=1e-5)``).
        ``sgd``: nnU-Net's SGD, Nesterov momentum 0.99, L2 weight decay.
    """
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=0.99, nesterov=True, weight_decay=tc.weight_decay)
    if tc.optimizer == "adam_l2":
        return torch.optim.Adam(groups, lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas))
    return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas))


def _regrouped(optimizer_state: Dict[str, Any], scheduler_state: Dict[str, Any], optimizer: torch.optim.Optimizer,
               params: List[nn.Parameter]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Saved optimizer and scheduler states in the layout of ``optimizer``'s parameter groups.

    States written before CLIP's temperature had a group of its own (one group, ``params`` in model order) are
    split like ``optimizer``'s groups, each parameter keeping its moments, and the new groups keep their own
    ``weight_decay``; states already in the current layout are returned as they are.

    Args:
        optimizer_state, scheduler_state: the saved ``state_dict()`` of the optimizer and the LambdaLR schedule.
        optimizer: the run's optimizer, built from ``Med3DInsightModel.param_groups()``.
        params: the trainable parameters in model order (the saved single group's order).

    Returns:
        ``(optimizer_state, scheduler_state)`` ready for ``load_state_dict``.
    """
    saved_groups, groups = optimizer_state["param_groups"], optimizer.param_groups
    if len(saved_groups) != 1 or len(groups) == 1 or len(saved_groups[0]["params"]) != len(params):
        return optimizer_state, scheduler_state  # the current layout (or a foreign one: load_state_dict says so)
    position = {id(p): i for i, p in enumerate(params)}
    order = [position[id(p)] for group in groups for p in group["params"]]  # new index -> old index
    saved_ids = saved_groups[0]["params"]
    state = {new: optimizer_state["state"][saved_ids[old]] for new, old in enumerate(order)
             if saved_ids[old] in optimizer_state["state"]}
    new_groups, first = [], 0
    for group in groups:
        count = len(group["params"])
        new_groups.append({**saved_groups[0], "weight_decay": group["weight_decay"],
                           "params": list(range(first, first + count))})
        first += count
    scheduler_state = dict(scheduler_state)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):  # one entry per group, all alike
        if len(scheduler_state.get(key) or ()) == 1:
            scheduler_state[key] = list(scheduler_state[key]) * len(groups)
    return {"state": state, "param_groups": new_groups}, scheduler_state
