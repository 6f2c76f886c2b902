"""What every rank does around a training step: the step-keyed sampler, the forward module DDP wraps, collectives
(gather, mean, finiteness), precision, the gradient norm, and the error a diverged run stops with."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from ..dense import real_slice_points
from ..errors import Med3DInsightError
from ..model import SliceOutputs


class NonFiniteError(Med3DInsightError):
    """Training diverged: a loss or a weight became NaN/Inf (nothing non-finite is ever saved)."""


class _StepSampler(Sampler):
    """Sample numbers of one rank from ``start`` to ``steps``: step s, rank r, j-th of b is s*W*b + r*b + j, so the
    batches depend only on the step (not on the worker count or on where a resumed run starts)."""

    def __init__(self, start: int, steps: int, batch: int, rank: int, world: int):
        self.start, self.steps, self.batch, self.rank, self.world = start, steps, batch, rank, world

    def __iter__(self):
        for s in range(self.start, self.steps):
            first = (s * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.batch


class _Step(nn.Module):
    """One training forward (encode, gather across ranks, losses) inside one module, so that DDP's hooks see it.

    The alignment losses are contrastive / OT over all pairs, so every rank gathers all predictions (with gradient:
    the backward sums each rank's copy, and DDP's averaging then gives exactly the gradient of one process holding
    the global batch) and all teacher embeddings. The reconstruction MSE stays a per-rank mean, which DDP averages.
    """

    def __init__(self, model: nn.Module, world: int):
        super().__init__()
        self.model, self.world = model, world

    def forward(self, volume, plane, position, image_emb=None, text_emb=None, mask=None, map_target=None,
                map_valid=None) -> Dict[str, torch.Tensor]:
        z3d, reconstruction = self.model.encode(volume, plane, position)
        map_valid = real_slice_points(map_valid, mask)  # dense distillation stays per rank, like reconstruction
        map_count = None
        if self.world > 1 and map_valid is not None:  # ... averaged over the global batch's valid locations
            map_count = map_valid.sum().float()
            dist.all_reduce(map_count)
            map_count = map_count / self.world
        if self.world > 1:
            from torch.distributed.nn.functional import all_gather

            def gather(t):
                return None if t is None else torch.cat(all_gather(t), 0)
            z3d = z3d._replace(image=gather(z3d.image), text=gather(z3d.text)) if isinstance(z3d, SliceOutputs) \
                else gather(z3d)
            image_emb, text_emb = _gather_plain(image_emb, self.world), _gather_plain(text_emb, self.world)
            mask = None if mask is None else _gather_plain(mask.to(torch.uint8), self.world).bool()
        return self.model.compute_losses(z3d, reconstruction, volume, image_emb, text_emb, mask, map_target,
                                          map_valid, map_count)


def _gather_plain(t: Optional[torch.Tensor], world: int) -> Optional[torch.Tensor]:
    """Concatenation of every rank's ``t`` in rank order, without gradient (teacher embeddings and masks)."""
    if t is None:
        return None
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def _check_finite(window, params, step: int, lr: float, saved_step: Optional[int], world: int,
                  device: torch.device) -> None:
    """Raise :class:`NonFiniteError` on every rank if a loss of the last ``len(window)`` steps (on any rank) or a
    weight is non-finite; one small collective."""
    flags = [torch.isfinite(torch.stack([w.float() for w in window])).float() if window else
             torch.zeros(0, device=device),
             torch.stack([torch.isfinite(p.detach()).all() for p in params]).all().float()[None] if params else
             torch.ones(1, device=device)]
    flags = torch.cat([f.to(device) for f in flags])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    ok = flags.tolist()
    if all(ok):
        return
    bad_losses = [i for i, v in enumerate(ok[:-1]) if not v]
    what, at = ("loss", step - len(window) + 1 + bad_losses[0]) if bad_losses else ("weights", step)
    raise _diverged(what, at, lr, saved_step)


def _diverged(what: str, step: int, lr: float, saved_step: Optional[int]) -> NonFiniteError:
    kept = f"the last saved state is step {saved_step}" if saved_step is not None else "no state was saved"
    return NonFiniteError(f"the {what} became non-finite at step {step} (lr {lr:.3g}); {kept}, nothing non-finite "
                          f"was written: lower train.lr or raise train.warmup_steps, and start over (--no-resume "
                          f"or a new output folder)")


def _call_on_start(on_start, model, rank: int, world: int, device: torch.device) -> None:
    """Run the caller's check on rank 0; every rank stops if it failed (instead of waiting in a collective)."""
    ok, error = True, None
    if rank == 0 and on_start is not None:
        try:
            on_start(model)
        except Exception as e:  # noqa: BLE001 -- re-raised below, after telling the other ranks
            ok, error = False, e
    if world > 1:
        flag = torch.tensor([1.0 if ok else 0.0], device=device)
        dist.broadcast(flag, 0)
        ok = bool(flag.item())
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError("pretraining aborted: the on_start check failed on rank 0")


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "auto":  # bf16 needs no loss scaling; fp16 only when asked
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def _reduce_mean(sums: Dict[str, torch.Tensor], count: int, world: int) -> Dict[str, float]:
    """Mean of each summed term over the steps since the last log and over the ranks (one collective)."""
    keys = sorted(sums)
    vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys]) / max(count, 1)
    if world > 1:
        dist.all_reduce(vec)
        vec /= world
    return dict(zip(keys, vec.tolist()))
