"""The optimizer ``train.optimizer`` names, the learning-rate schedule (torch's schedulers; :func:`lr_factor` is its
closed form), and old saved optimizer states mapped onto today's parameter groups."""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    PolynomialLR,
    SequentialLR,
)

from .config import TrainConfig

# Warnings torch gives for a schedule stepped without an optimizer step (a resumed run catching up; a step the fp16
# loss scaler skipped is still a step of the schedule), and for SequentialLR's switch at the end of the warm-up
# (torch < 2.7 steps the next scheduler with the deprecated epoch argument).
SCHEDULE_WARNINGS = ("Detected call of `lr_scheduler.step", "The epoch parameter in `scheduler.step")


def lr_factor(step: int, train: TrainConfig) -> float:
    """Fraction of ``train.lr`` used by 0-based optimizer step ``step``: the closed form of :func:`lr_scheduler`.

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


def lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, step: int = 0) -> LRScheduler:
    """The learning-rate schedule of ``train`` on ``optimizer``, built from torch's schedulers and advanced to ``step``.

    ``LinearLR`` from 1/warmup_steps to 1 over the warm-up (step k uses (k+1)/warmup_steps), then, from step
    ``warmup_steps``, ``CosineAnnealingLR`` or ``PolynomialLR`` (power 0.9) reaching ``min_lr_ratio`` x the base
    learning rate at ``train.steps``, or ``ConstantLR`` (factor 1); chained with ``SequentialLR``. Step k's learning
    rate is ``lr * lr_factor(k, train)`` up to rounding (the schedulers compute it recursively, step by step).

    ``eta_min`` is absolute: every parameter group must start from the same learning rate (they do:
    ``Med3DInsightModel.param_groups()`` sets none of its own, so all take ``train.lr``).

    The scheduler's saved state is never loaded: a resumed run builds the schedule from its configuration and steps it
    ``step`` times. The learning rates are then those of the uninterrupted run bit for bit (the same arithmetic in
    the same order), a resumed run with another ``train.steps`` follows the new schedule, and states written by
    older versions (a ``LambdaLR``) resume as well.

    Args:
        optimizer: the run's optimizer; each group's ``initial_lr`` (set by an earlier scheduler and saved with the
            optimizer's state), or else its ``lr``, is its base learning rate.
        train: the ``train`` section: ``warmup_steps``, ``schedule``, ``min_lr_ratio``, ``steps``.
        step: optimizer steps already done (the resumed step).

    Returns:
        The scheduler; ``get_last_lr()`` is the learning rate of step ``step``.

    Raises:
        ValueError: the parameter groups have different base learning rates.
    """
    bases = []
    for group in optimizer.param_groups:
        group["lr"] = group.pop("initial_lr", group["lr"])  # a fresh schedule starts from the base learning rate
        bases.append(group["lr"])
    if len(set(bases)) > 1:
        raise ValueError(f"the learning-rate schedule needs one base learning rate for every parameter group "
                         f"(its minimum is absolute), got {bases}")
    floor, warmup = train.min_lr_ratio * bases[0], train.warmup_steps
    decay_steps = max(1, train.steps - warmup)
    if train.schedule == "constant":
        decay: LRScheduler = ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif train.schedule == "poly":
        decay = _PolynomialLR(optimizer, total_iters=decay_steps, power=0.9, eta_min=floor)
    else:
        decay = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=floor)
    scheduler = decay
    if warmup > 0:  # (k+1)/warmup: linear from 1/warmup at step 0 to 1 at step warmup-1
        ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
        scheduler = SequentialLR(optimizer, [ramp, decay], milestones=[warmup])
    advance_schedule(scheduler, step)
    return scheduler


def advance_schedule(scheduler: LRScheduler, steps: int = 1) -> None:
    """Step ``scheduler`` ``steps`` times without torch's warnings about a schedule stepped without an optimizer step
    (a resumed run catching up; an fp16 step the loss scaler skipped is still a step of the schedule) or about
    SequentialLR's switch (:data:`SCHEDULE_WARNINGS`)."""
    with warnings.catch_warnings():
        for message in SCHEDULE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        for _ in range(steps):
            scheduler.step()


class _PolynomialLR(PolynomialLR):
    """``PolynomialLR`` that decays to ``eta_min`` instead of 0, as ``CosineAnnealingLR`` does: ``lr - eta_min``
    follows ``PolynomialLR`` (torch's has no minimum). With ``eta_min=0`` it computes what ``PolynomialLR`` does."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_iters: int, power: float, eta_min: float = 0.0):
        self.eta_min = eta_min
        super().__init__(optimizer, total_iters=total_iters, power=power)

    def get_lr(self) -> List[float]:
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        if self.last_epoch == 0 or self.last_epoch > self.total_iters:
            return lrs
        decay = ((1.0 - self.last_epoch / self.total_iters) / (1.0 - (self.last_epoch - 1) / self.total_iters)) \
            ** self.power
        return [self.eta_min + (lr - self.eta_min) * decay for lr in lrs]

    def _get_closed_form_lr(self) -> List[float]:
        shape = (1.0 - min(self.total_iters, self.last_epoch) / self.total_iters) ** self.power
        return [self.eta_min + (base - self.eta_min) * shape for base in self.base_lrs]


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


def _regrouped(optimizer_state: Dict[str, Any], optimizer: torch.optim.Optimizer,
               params: List[nn.Parameter]) -> Dict[str, Any]:
    """A saved optimizer state in the layout of ``optimizer``'s parameter groups.

    States written before CLIP's temperature had a group of its own (one group, ``params`` in model order) are
    split like ``optimizer``'s groups, each parameter keeping its moments, and the new groups keep their own
    ``weight_decay``; states already in the current layout are returned as they are. (The schedule's saved state is
    not needed: :func:`lr_scheduler` rebuilds it.)

    Args:
        optimizer_state: the saved ``state_dict()`` of the optimizer.
        optimizer: the run's optimizer, built from ``Med3DInsightModel.param_groups()``.
        params: the trainable parameters in model order (the saved single group's order).

    Returns:
        The state, ready for ``optimizer.load_state_dict``.
    """
    saved_groups, groups = optimizer_state["param_groups"], optimizer.param_groups
    if len(saved_groups) != 1 or len(groups) == 1 or len(saved_groups[0]["params"]) != len(params):
        return optimizer_state  # the current layout (or a foreign one: load_state_dict says so)
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
    return {"state": state, "param_groups": new_groups}
