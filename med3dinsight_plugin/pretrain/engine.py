"""The pretraining loop: single process or torchrun DDP, resumable bit for bit, with logs, evaluation and plots.

Layout of a run folder ``OUTPUT``::

    config.yaml                 the configuration of the run
    checkpoints/last.pt         full training state (model, optimizer, scheduler, scaler, step, RNG, config)
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

from ..checkpoint import atomic_write, save_pretrained
from .config import RESUMABLE_CHANGES, ConfigError, PretrainConfig, TrainConfig, diff_configs, save_config
from .diagnostics import MetricsLog, evaluate, plot_metrics

__all__ = ["build_model", "lr_factor", "pretrain", "STATE_FORMAT"]

STATE_FORMAT = "med3dinsight-pretrain-state"
# Metadata keys save_pretrained writes itself (it refuses them from callers); checked before training, not after it.
_RESERVED_METADATA = ("format", "format_version", "package_version", "backbone", "network_class", "in_channels",
                      "patch_size", "encoder_prefixes", "adaptation_plan", "aliases", "psat", "alignment",
                      "pretraining")


def build_model(config: PretrainConfig, embed_dim: int):
    """The :class:`Med3DInsightModel` that ``config.model`` describes, initialised from ``config.train.seed``.

    Args:
        config: the run's configuration.
        embed_dim: the teacher's embedding width (PSAT's ``out_dim`` and the loss width).

    Returns:
        A fresh model (identical on every rank).
    """
    from ..alignment import Med3DInsightLoss
    from ..backbones import build_backbone
    from ..model import Med3DInsightModel
    from ..psat import PlaneSliceAwareTransformer

    m = config.model
    torch.manual_seed(config.train.seed)
    backbone = build_backbone(m.backbone, in_channels=m.in_channels, patch_size=m.patch_size or None,
                              **m.backbone_kwargs)
    psat_kwargs = {"out_dim": embed_dim, **{k: v for k, v in m.psat_kwargs.items() if k != "in_dim"}}
    psat = PlaneSliceAwareTransformer.from_preset(m.psat, in_dim=backbone.token_dim, **psat_kwargs)
    w = m.loss_weights
    loss = Med3DInsightLoss(m.alignment, embed_dim=embed_dim, image_weight=w.image, text_weight=w.text,
                            reconstruction_weight=w.reconstruction)
    return Med3DInsightModel(backbone, psat, loss)


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
             on_start: Optional[Callable[[nn.Module], Any]] = None) -> Dict[str, Any]:
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

    Batches are read through a DataLoader whose sampler gives step s, rank r the sample numbers s*W*b + r*b + j, so
    a run depends on neither the worker count nor where it was resumed. The full state is saved every
    ``train.checkpoint_every`` steps and at the end to ``OUTPUT/checkpoints/last.pt``; on CPU a run killed and
    resumed ends with the same weights, bit for bit, as one never interrupted.

    Returns:
        ``checkpoint`` (the final ``med3dinsight.safetensors``; ``None`` on ranks other than 0), ``state``
        (last.pt), ``output``, ``steps`` (the last step), ``start_step`` (where this call began), ``global_batch``,
        ``losses`` (the last logged means over the ranks) and ``eval`` (the last held-out metrics, rank 0).

    Raises:
        ConfigError: a bad configuration, or a resumption with a configuration other than the checkpoint's.
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

    rank, world, device, own_group = _init_distributed(config.train.device)
    try:
        return _run(config, model, train_set, eval_set, metadata, resume, progress, on_start, rank, world, device)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(config, model, train_set, eval_set, metadata, resume, progress, on_start, rank, world, device):
    tc, out = config.train, Path(config.output)
    state_path = out / "checkpoints" / "last.pt"
    state = _load_state(state_path, config, device) if resume and state_path.is_file() else None
    start = int(state["step"]) if state else 0

    # Parameters pretraining gives no gradient (segmentation head, dead weights) are frozen, so DDP can run without
    # find_unused_parameters (which costs a graph traversal per step).
    frozen = set(model.backbone.unused_in_pretraining())
    for name, p in model.backbone.network.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
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
    # Weight decay on every trainable tensor, as the authors' AdamW does.
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas))
    # A plain function (not a picklable object) so the scheduler's state holds no callable, and a resumed run with a
    # changed train.steps follows the new schedule.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))
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
    try:
        if log and eval_set is not None and start == 0:  # the untrained baseline of the retrieval curves
            last_eval = evaluate(model, eval_set, tc.batch_size, device, amp_dtype=amp_dtype)
            log.write({"step": 0, **{f"eval/{k}": v for k, v in last_eval.items()}})
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                losses = step_module(**batch)
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

            record: Dict[str, Any] = {}
            if step % tc.log_every == 0 or step == tc.steps:
                last_losses = _reduce_mean(sums, count, world)
                # fp16 gradients may overflow (the scaler then skips the step); a non-finite loss is a real failure
                if not all(math.isfinite(v) for k, v in last_losses.items() if k != "grad_norm"):
                    raise FloatingPointError(f"the loss became non-finite at step {step} ({last_losses}); lower "
                                             f"train.lr or raise train.warmup_steps")
                now = time.perf_counter()
                record = {"step": step, "lr": lr, **last_losses, "samples_per_s": global_batch * count / (now - tick)}
                sums, count, tick = {}, 0, now
            if log and eval_set is not None and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps):
                last_eval = evaluate(model, eval_set, tc.batch_size, device, amp_dtype=amp_dtype)
                record.update({"step": step, **{f"eval/{k}": v for k, v in last_eval.items()}})
            if log:
                log.advance(step, record)
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.steps:
                _save_state(state_path, model, optimizer, scheduler, scaler, step, config, rank, world, device)
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


def _load_state(path: Path, config: PretrainConfig, device: torch.device) -> Dict[str, Any]:
    """The saved training state, refused when it was written with another configuration."""
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConfigError(f"{path} is not a med3dinsight pretraining state; use a new output folder")
    changed = diff_configs(state["config"], config.to_dict())
    if changed:
        raise ConfigError(f"{path} was written with a different configuration ({', '.join(changed)} differ); use a "
                          f"new output folder, or resume with the same configuration (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change)")
    return state


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

def _init_distributed(device_name: str):
    """(rank, world, device, created_group) from torchrun's environment; a single process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():  # the caller set up the group
        world, rank = dist.get_world_size(), dist.get_rank()
    try:
        if device_name == "auto":
            device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(device_name)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", local_rank)
    except RuntimeError as e:
        raise ConfigError(f"'train.device' must be auto, cpu, cuda or cuda:N, got {device_name!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"'train.device' is {device_name!r} but CUDA is not available; use auto or cpu")
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return rank, world, device, created


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


def _save_state(path: Path, model, optimizer, scheduler, scaler, step, config, rank, world, device) -> None:
    """All ranks' RNG states gathered; rank 0 writes atomically; the others wait so nobody runs ahead of the file."""
    rng = _get_rng(device)
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    if rank == 0:
        state = {"format": STATE_FORMAT, "version": 1, "step": step, "world_size": world,
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                 "config": config.to_dict()}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    if world > 1:
        dist.barrier()
