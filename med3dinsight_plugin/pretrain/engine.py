"""The pretraining loop: single process or torchrun DDP, resumable bit for bit, with logs, evaluation and plots.

Layout of a run folder ``OUTPUT``::

    config.yaml                 the configuration of the run
    checkpoints/last.pt         full training state (model, optimizer, scheduler, scaler, step, RNG, config)
    checkpoints/previous.pt     the state saved before it (resumed from, with a warning, if last.pt is unreadable)
    metrics.jsonl               one JSON line per log / eval step
    tensorboard/                TensorBoard scalars (when tensorboard is installed)
    med3dinsight.safetensors    the pretrained model, written at the end (``save_pretrained``)
    metrics.png                 losses and retrieval accuracy against the step
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..checkpoint import RESERVED_METADATA, CheckpointError, save_pretrained
from ..fileio import atomic_write, freeze
from ..distributed import DistributedContext, init_distributed
from ..errors import Med3DInsightError, first_line
from ..ot import NonFiniteCostError
from .config import (RESUMABLE_CHANGES, ConfigError, PretrainConfig, TrainConfig, check_backbone_kwargs,
                     diff_configs, save_config)
from .diagnostics import MetricsLog, evaluate, plot_metrics

__all__ = ["NonFiniteError", "build_model", "lr_factor", "pretrain", "STATE_FORMAT"]

STATE_FORMAT = "med3dinsight-pretrain-state"
# Metadata keys the checkpoint format and this loop write themselves: checked before training, not after it.
_RESERVED_METADATA = RESERVED_METADATA + ("pretraining",)
_STATE_KEYS = ("step", "model", "optimizer", "scheduler", "scaler", "rng", "config")


class NonFiniteError(Med3DInsightError):
    """Training diverged: a loss or a weight became NaN/Inf (nothing non-finite is ever saved)."""


def build_model(config: PretrainConfig, embed_dim: int):
    """The :class:`Med3DInsightModel` that ``config.model`` describes, initialised from ``config.train.seed``.

    Args:
        config: the run's configuration.
        embed_dim: the teacher's embedding width (PSAT's ``out_dim`` and the loss width).

    Returns:
        A fresh model (identical on every rank), with ``model.reconstruction`` / ``mask_ratio`` / ``mask_block``.

    Raises:
        ConfigError: a bad backbone argument, or ``model.mask_block`` leaving fewer than 2 mask blocks in the patch.
    """
    from ..alignment import Med3DInsightLoss
    from ..backbones import build_backbone
    from ..model import Med3DInsightModel
    from ..psat import PlaneSliceAwareTransformer

    m = config.model
    check_backbone_kwargs(m)
    torch.manual_seed(config.train.seed)
    backbone = build_backbone(m.backbone, in_channels=m.in_channels, patch_size=m.patch_size or None,
                              **m.backbone_kwargs)
    psat_kwargs = {"out_dim": embed_dim, **{k: v for k, v in m.psat_kwargs.items() if k != "in_dim"}}
    psat = PlaneSliceAwareTransformer.from_preset(m.psat, in_dim=backbone.token_dim, **psat_kwargs)
    w = m.loss_weights
    loss = Med3DInsightLoss(m.alignment, embed_dim=embed_dim, image_weight=w.image, text_weight=w.text,
                            reconstruction_weight=w.reconstruction)
    if m.reconstruction == "masked":
        grid = [-(-size // m.mask_block) for size in backbone.patch_size]
        if grid[0] * grid[1] * grid[2] < 2:
            raise ConfigError(f"model.mask_block={m.mask_block} leaves a single mask block in the "
                              f"{'x'.join(map(str, backbone.patch_size))} patch: masked reconstruction would hide "
                              f"the whole input; lower model.mask_block")
    return Med3DInsightModel(backbone, psat, loss, reconstruction=m.reconstruction, mask_ratio=m.mask_ratio,
                             mask_block=m.mask_block)


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

    def forward(self, volume, plane, position, image_emb=None, text_emb=None, mask=None) -> Dict[str, torch.Tensor]:
        z3d, reconstruction = self.model.encode(volume, plane, position)
        if self.world > 1:
            from torch.distributed.nn.functional import all_gather
            z3d = torch.cat(all_gather(z3d), 0)
            image_emb, text_emb = _gather_plain(image_emb, self.world), _gather_plain(text_emb, self.world)
            mask = None if mask is None else _gather_plain(mask.to(torch.uint8), self.world).bool()
        return self.model.compute_losses(z3d, reconstruction, volume, image_emb, text_emb, mask)


def _gather_plain(t: Optional[torch.Tensor], world: int) -> Optional[torch.Tensor]:
    """Concatenation of every rank's ``t`` in rank order, without gradient (teacher embeddings and masks)."""
    if t is None:
        return None
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def pretrain(config: PretrainConfig, model: nn.Module, train_set, eval_set=None, *, metadata: Optional[dict] = None,
             resume: bool = True, progress: bool = True,
             on_start: Optional[Callable[[nn.Module], Any]] = None,
             context: Optional[DistributedContext] = None) -> Dict[str, Any]:
    """Pretrain ``model`` on ``train_set`` as ``config`` says; runs alike alone and under ``torchrun``.

    Args:
        config: the run's :class:`PretrainConfig`; ``config.output`` is the run folder.
        model: a :class:`Med3DInsightModel` (e.g. from :func:`build_model`), trained in place.
        train_set: map-style dataset; ``train_set[i]`` for any sample number i >= 0 is deterministic and returns
            ``volume`` (C,D,H,W), ``plane`` (K,) long, ``position`` (K,), ``image_emb`` (K,E) and optionally
            ``text_emb`` (K,E) and ``mask`` (K,) bool (False: a padding slice, left out of the alignment).
        eval_set: finite map-style dataset of the same items for retrieval diagnostics, or ``None``.
        metadata: JSON-serialisable facts stored in the final checkpoint (intensity normalisation, teacher, ...).
        resume: continue from ``OUTPUT/checkpoints/last.pt`` when it exists (else start over).
        progress: show a progress bar (rank 0).
        on_start: called with the model on rank 0 before the first step (e.g. to test-load the downstream network);
            an exception there aborts the run before training.
        context: the :class:`~med3dinsight_plugin.distributed.DistributedContext` of a caller that already joined
            the process group (it stays the caller's to close); ``None``: joined (and left) here from torchrun's
            environment and ``train.device``.

    Batches are read through a DataLoader whose sampler gives step s, rank r the sample numbers s*W*b + r*b + j, so
    a run depends on neither the worker count nor where it was resumed. The full state is saved every
    ``train.checkpoint_every`` steps and at the end to ``OUTPUT/checkpoints/last.pt`` (the one before is kept as
    ``previous.pt``, resumed from with a warning when last.pt is unreadable); on CPU a run killed and resumed ends
    with the same weights, bit for bit, as one never interrupted. Losses and weights are checked to be finite at
    every log step and before every save, so a diverged run stops with :class:`NonFiniteError` and never saves a
    non-finite state.

    Returns:
        ``checkpoint`` (the final ``med3dinsight.safetensors``; ``None`` on ranks other than 0), ``state``
        (last.pt), ``output``, ``steps`` (the last step), ``start_step`` (where this call began), ``global_batch``,
        ``losses`` (the last logged means over the ranks) and ``eval`` (the last held-out metrics, rank 0).

    Raises:
        ConfigError: a bad configuration, or a resumption with a configuration other than the checkpoint's.
        CheckpointError: ``last.pt`` (and ``previous.pt``) cannot be resumed from.
        NonFiniteError: the loss or the weights became non-finite.
        ValueError: metadata that is not JSON-serialisable or uses a key the checkpoint format reserves.
    """
    if not config.output:
        raise ConfigError("'output' (the run folder) must be set")
    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & set(_RESERVED_METADATA))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by the checkpoint format; choose other names")
    try:
        json.dumps(metadata)
    except TypeError as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from None

    ctx = context if context is not None else init_distributed(config.train.device, option="train.device")
    try:
        return _run(config, model, train_set, eval_set, metadata, resume, progress, on_start, ctx)
    finally:
        if context is None:
            ctx.close()


def _run(config, model, train_set, eval_set, metadata, resume, progress, on_start, ctx: DistributedContext):
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    tc, out = config.train, Path(config.output)
    states = _States(out / "checkpoints", rank)
    state_path = states.last
    state = states.resume(config, device) if resume else None
    if state is None:
        states.forget_previous()  # a fresh start: an older run's previous.pt must never be fallen back to
    start = int(state["step"]) if state else 0

    # Parameters pretraining gives no gradient (segmentation head, dead weights) are frozen, so DDP can run without
    # find_unused_parameters (which costs a graph traversal per step).
    freeze(model.backbone.network, model.backbone.unused_in_pretraining())
    model.to(device)
    if state:
        model.load_state_dict(state["model"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    _call_on_start(on_start, model, rank, world, device)
    if rank == 0:
        state_path.parent.mkdir(exist_ok=True)

    amp_dtype = _amp_dtype(tc.amp, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, tc)
    # A plain function (not a picklable object) so the scheduler's state holds no callable, and a resumed run with a
    # changed train.steps follows the new schedule.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))
    lr_now = lambda: scheduler.get_last_lr()[0]  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == world:
            _set_rng(state["rng"][rank], device)
        else:
            warnings.warn(f"{state_path} was written by {len(state['rng'])} processes, this run has {world}: the "
                          f"global batch and the random streams change", stacklevel=3)
            _seed_all(tc.seed + rank + start)
    else:
        _seed_all(tc.seed + rank)  # + rank: dropout differs between ranks, as it would between samples

    if tc.compile:
        if device.type == "cpu":
            warnings.warn("train.compile is ignored on CPU", stacklevel=3)
        else:  # in place: state_dict keys stay the model's own
            model.backbone.compile()
            model.psat.compile()
    step_module: nn.Module = _Step(model, world)
    if world > 1:
        # Ablations with a zero loss weight leave whole parts without gradient: only then pay for the search.
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=not all(model.loss.weights.values()))
    loader = DataLoader(train_set, batch_size=tc.batch_size,
                        sampler=_StepSampler(start, tc.steps, tc.batch_size, rank, world),
                        num_workers=config.data.num_workers, persistent_workers=config.data.num_workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(tc.seed))

    log = MetricsLog(out, tc.steps, start, progress) if rank == 0 else None
    global_batch = world * tc.batch_size
    sums: Dict[str, torch.Tensor] = {}
    last_losses: Dict[str, float] = {}
    last_eval: Dict[str, float] = {}
    step, count, tick, final = start, 0, time.perf_counter(), None
    window = []  # each step's loss since the last finiteness check (kept on the device: no sync per step)
    try:
        if log and eval_set is not None and start == 0:  # the untrained baseline of the retrieval curves
            last_eval = evaluate(model, eval_set, tc.batch_size, device, amp_dtype=amp_dtype)
            log.write({"step": 0, **{f"eval/{k}": v for k, v in last_eval.items()}})
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            model.train()
            optimizer.zero_grad(set_to_none=True)
            try:
                with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                    losses = step_module(**batch)
            except NonFiniteCostError:
                # A diverged model (the same on every rank: the OT inputs are gathered) can make the OT solver refuse
                # its cost matrix (non-finite weights, or finite ones whose predictions or learned metric overflow)
                # before there is a loss to check: say what happened, not where it surfaced.
                if not all(bool(torch.isfinite(p.detach()).all()) for p in params):
                    raise _diverged("weights", step, lr_now(), states.saved_step) from None
                raise _diverged("loss", step + 1, lr_now(), states.saved_step) from None
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip > 0 \
                else _grad_norm(params)
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # fp16: a step the scaler skipped is still a step of the schedule
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                scheduler.step()
            step, count = step + 1, count + 1
            for k, v in {**losses, "grad_norm": grad_norm}.items():  # summed on device: no sync per step
                sums[k] = sums.get(k, 0) + v.detach().float()
            window.append(losses["loss"].detach())

            record: Dict[str, Any] = {}
            save = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.steps
            if save or step % tc.log_every == 0:
                # fp16 gradients may overflow (the scaler then skips the step); a non-finite loss is a real failure
                _check_finite(window, params, step, lr, states.saved_step, world, device)
                window = []
            if step % tc.log_every == 0 or step == tc.steps:
                last_losses = _reduce_mean(sums, count, world)
                now = time.perf_counter()
                record = {"step": step, "lr": lr, **last_losses, "samples_per_s": global_batch * count / (now - tick)}
                sums, count, tick = {}, 0, now
            if log and eval_set is not None and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps):
                last_eval = evaluate(model, eval_set, tc.batch_size, device, amp_dtype=amp_dtype)
                record.update({"step": step, **{f"eval/{k}": v for k, v in last_eval.items()}})
            if log:
                log.advance(step, record)
            if save:
                states.save(model, optimizer, scheduler, scaler, step, config, world, device)
        if rank == 0:
            pretraining = {"steps": step, "global_batch": global_batch, "world_size": world,
                           "config": config.to_dict()}
            final = save_pretrained(model, out / "med3dinsight.safetensors", **metadata, pretraining=pretraining)
            if log.path.is_file():
                plot_metrics(log.path, out / "metrics.png")
        if world > 1:
            dist.barrier()
    finally:
        if log:
            log.close()
    return {"checkpoint": str(final) if final else None, "state": str(state_path), "output": str(out),
            "steps": step, "start_step": start, "global_batch": global_batch, "losses": last_losses,
            "eval": last_eval}


class _Unusable(Exception):
    """A state file that cannot be resumed from (unreadable, foreign, incomplete, non-finite); the reason."""


class _States:
    """``checkpoints/last.pt`` and the state saved before it, ``previous.pt``.

    Saving moves a good ``last.pt`` (one this run wrote or resumed from) to ``previous.pt`` and writes the new state
    atomically; resuming falls back to ``previous.pt``, with a warning, when ``last.pt`` is missing or unusable
    (truncated by a full disk, replaced by a foreign file).
    """

    def __init__(self, folder: Path, rank: int):
        self.folder, self.rank = folder, rank
        self.last, self.previous = folder / "last.pt", folder / "previous.pt"
        self.rotate = False  # last.pt is known good: keep it as previous.pt when writing the next one
        self.saved_step: Optional[int] = None  # the step of the newest good state on disk

    def resume(self, config: PretrainConfig, device: torch.device) -> Optional[Dict[str, Any]]:
        """The newest usable state, or ``None`` when there is none to resume."""
        candidates = [p for p in (self.last, self.previous) if p.is_file()]
        if not candidates:
            return None
        problems = [] if self.last.is_file() else [f"{self.last} is missing"]
        for path in candidates:
            try:
                state = _load_state(path, config, device)
            except _Unusable as e:
                problems.append(f"{path} {e}")
                continue
            if problems and self.rank == 0:
                warnings.warn(f"{'; '.join(problems)}: resuming from {path} (step {int(state['step'])}) instead",
                              stacklevel=4)
            self.rotate = path == self.last
            self.saved_step = int(state["step"])
            return state
        raise CheckpointError(f"{'; '.join(problems)}: cannot resume the run in {self.folder.parent}; move "
                              f"{self.folder} out of the way, or pass --no-resume (resume=False) to start over")

    def forget_previous(self) -> None:
        """A fresh start: drop an older run's previous.pt, so no later fallback resumes another run."""
        if self.rank == 0 and self.previous.is_file():
            self.previous.unlink()

    def save(self, model, optimizer, scheduler, scaler, step, config, world, device) -> None:
        """All ranks' RNG states gathered; rank 0 writes atomically; the others wait so nobody runs ahead."""
        rng = _get_rng(device)
        rngs = [rng]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng)
        if self.rank == 0:
            state = {"format": STATE_FORMAT, "version": 1, "step": step, "world_size": world,
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                     "config": config.to_dict()}
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.rotate and self.last.is_file():
                self._keep_last_as_previous()
            atomic_write(self.last, lambda tmp: torch.save(state, tmp))
        self.rotate, self.saved_step = True, step
        if world > 1:
            dist.barrier()

    def _keep_last_as_previous(self) -> None:
        """previous.pt := last.pt, atomically, and last.pt stays in place (a hard link: no copy) until the new
        state replaces it; where hard links are unsupported, last.pt is moved (a crash before the new one is
        written then leaves previous.pt, which resuming falls back to)."""
        tmp = self.folder / f".previous.pt.{os.getpid()}.tmp"
        try:
            if tmp.exists():
                tmp.unlink()
            os.link(self.last, tmp)
            os.replace(tmp, self.previous)
        except OSError:
            if tmp.exists():
                tmp.unlink()
            os.replace(self.last, self.previous)


def _load_state(path: Path, config: PretrainConfig, device: torch.device) -> Dict[str, Any]:
    """The saved training state; :class:`_Unusable` if it cannot be resumed from, :class:`ConfigError` when it was
    written with another configuration."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated zip, foreign pickle, ...: torch raises assorted types
        raise _Unusable(f"is unreadable ({type(e).__name__}: {first_line(e)[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise _Unusable("is not a med3dinsight pretraining state")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing or not isinstance(state["model"], dict) or not isinstance(state["config"], dict):
        raise _Unusable(f"is incomplete (no {', '.join(missing) or 'model/config mapping'})")
    if not all(torch.isfinite(v).all() for v in state["model"].values()
               if isinstance(v, torch.Tensor) and v.is_floating_point()):
        raise _Unusable("holds non-finite weights")
    changed = diff_configs(_with_defaults(state["config"]), config.to_dict())
    if changed:
        raise ConfigError(f"{path} was written with a different configuration ({', '.join(changed)} differ); use a "
                          f"new output folder, or resume with the same configuration (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change)")
    return state


def _with_defaults(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A saved configuration with the keys added since it was written at their defaults (which behave as before)."""
    try:
        return PretrainConfig.from_dict(saved).to_dict()
    except ConfigError:
        return saved  # a key since removed: the comparison names it


def _optimizer(params, tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "sgd":  # nnU-Net's: SGD, Nesterov momentum 0.99, L2 weight decay
        return torch.optim.SGD(params, lr=tc.lr, momentum=0.99, nesterov=True, weight_decay=tc.weight_decay)
    # Weight decay on every trainable tensor, as the authors' AdamW does.
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas))


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


# ----------------------------------------------------------------------------------------------------- helpers

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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng(device: torch.device) -> Dict[str, Any]:
    """RNG states as tensors / ints / lists, so that ``torch.load(weights_only=True)`` reads them back."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(py_state), "gauss": gauss}}


def _set_rng(rng: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
