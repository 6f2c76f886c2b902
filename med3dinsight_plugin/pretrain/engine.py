"""The pretraining loop: single process or torchrun DDP, resumable bit for bit, with logs, evaluation and plots.

Layout of a run folder ``OUTPUT``::

    config.yaml                 the configuration of the run
    checkpoints/last.pt         full training state (model, optimizer, scheduler, scaler, step, RNG, config)
    checkpoints/previous.pt     the state saved before it (resumed from, with a warning, if last.pt is unreadable)
    metrics.jsonl               one JSON line per log / eval step
    tensorboard/                TensorBoard scalars (when tensorboard is installed)
    med3dinsight.safetensors    the pretrained model, written at the end (``save_pretrained``)
    metrics.png                 losses and retrieval accuracy against the step

The loop's phases are here; the state files are :mod:`.state`'s, the optimizer and schedule :mod:`.optim`'s, and what
every rank does around a step (sampler, forward module, collectives) :mod:`.steps`'s.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..balance import balanced_weights, encoder_parameters, term_gradient_norms
from ..checkpoint import RESERVED_METADATA, save_pretrained
from ..distributed import DistributedContext, init_distributed
from ..fileio import freeze
from ..ot import NonFiniteCostError
from ..results import Result
from .config import ConfigError, PretrainConfig, TrainConfig, save_config
from .diagnostics import MetricsLog, evaluate, plot_metrics
from .optim import _optimizer, _regrouped, advance_schedule, lr_factor, lr_scheduler, warmup_note
from .state import STATE_FORMAT, _seed_all, _set_rng, _States
from .steps import (
    NonFiniteError,
    _amp_dtype,
    _call_on_start,
    _check_finite,
    _diverged,
    _grad_norm,
    _reduce_mean,
    _Step,
    _StepSampler,
)

__all__ = ["NonFiniteError", "PretrainResult", "lr_factor", "pretrain", "STATE_FORMAT"]

# Metadata keys the checkpoint format and this loop write themselves: checked before training, not after it.
_RESERVED_METADATA = RESERVED_METADATA + ("pretraining",)


@dataclass(frozen=True)
class PretrainResult(Result):
    """What :func:`pretrain` (and :func:`~med3dinsight_plugin.pretrain.run_pretraining`) returns, on every rank.

    Attributes:
        checkpoint: the final ``OUTPUT/med3dinsight.safetensors`` (``save_pretrained``); ``None`` on ranks other than 0.
        state: the full training state, ``OUTPUT/checkpoints/last.pt``.
        output: the run folder ``OUTPUT``.
        steps: the last optimizer step (``train.steps`` once the run is complete).
        start_step: the step this call began at (0 on a fresh start, else the resumed step).
        global_batch: samples per optimizer step over all ranks.
        losses: the last logged loss terms (and grad norm), means over the ranks; empty if nothing was logged.
        eval: the last held-out retrieval metrics (rank 0; empty without an evaluation set or evaluation step).
    """
    checkpoint: Optional[str]
    state: str
    output: str
    steps: int
    start_step: int
    global_batch: int
    losses: Dict[str, float] = field(default_factory=dict)
    eval: Dict[str, float] = field(default_factory=dict)


def pretrain(config: PretrainConfig, model: nn.Module, train_set, eval_set=None, *, metadata: Optional[dict] = None,
             resume: bool = True, progress: bool = True,
             on_start: Optional[Callable[[nn.Module], Any]] = None,
             context: Optional[DistributedContext] = None) -> PretrainResult:
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
        A :class:`PretrainResult`: ``checkpoint`` (the final ``med3dinsight.safetensors``; ``None`` on ranks other
        than 0), ``state`` (last.pt), ``output``, ``steps`` (the last step), ``start_step`` (where this call began),
        ``global_batch``, ``losses`` (the last logged means over the ranks) and ``eval`` (the last held-out metrics,
        rank 0).

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


@dataclass
class _Tally:
    """What the loop accumulates between two log steps (kept on the device: no host sync per step), and the last
    values it reported."""
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)  # each loss term and the grad norm, summed
    count: int = 0  # steps summed
    tick: float = field(default_factory=time.perf_counter)  # when the summing began
    window: List[torch.Tensor] = field(default_factory=list)  # each step's loss since the last finiteness check
    last_losses: Dict[str, float] = field(default_factory=dict)  # the last logged means over the ranks
    last_eval: Dict[str, float] = field(default_factory=dict)  # the last held-out metrics (rank 0)
    encoder_grad: Dict[str, torch.Tensor] = field(default_factory=dict)  # each weighted term's, at the log step


@dataclass
class _RunContext:
    """Everything one call of :func:`pretrain` shares between its seams, filled in the order :func:`_run` calls them:
    :func:`_open_run` (the resumed state), :func:`_prepare_model`, :func:`_prepare_optimization` (optimizer,
    schedule, loss scaler, random streams), :func:`_prepare_step_module` (compile, DDP), :func:`_loader`; then per
    batch :func:`_train_step` and :func:`_after_step` (tally, finiteness checks, logs, evaluation, checkpoints);
    finally :func:`_finish` and :func:`_summary`.

    A new mechanism hooks into one seam: gradient accumulation into :func:`_train_step`, an EMA of the weights into
    :func:`_after_optimizer_step`, another gather across ranks into :class:`_Step`.
    """
    config: PretrainConfig
    model: nn.Module
    ctx: DistributedContext
    states: "_States"
    state: Optional[Dict[str, Any]]  # the training state resumed from (None: a fresh start); dropped once applied
    start: int  # the step this call begins at
    step: int  # optimizer steps done so far (advanced by _train_step)
    eval_set: Any = None
    amp_dtype: Optional[torch.dtype] = None
    params: List[nn.Parameter] = field(default_factory=list)  # the trainable parameters
    encoder_params: List[nn.Parameter] = field(default_factory=list)  # those of the pretrained encoder
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    scaler: Optional[torch.amp.GradScaler] = None
    step_module: Optional[nn.Module] = None  # _Step around the model, DDP-wrapped with several processes
    log: Optional[MetricsLog] = None  # rank 0 only
    tally: _Tally = field(default_factory=_Tally)

    @property
    def tc(self) -> TrainConfig:
        return self.config.train

    @property
    def out(self) -> Path:
        return Path(self.config.output)

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world(self) -> int:
        return self.ctx.world_size

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def global_batch(self) -> int:
        return self.world * self.tc.batch_size

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return self.scheduler.get_last_lr()[0]


def _run(config: PretrainConfig, model: nn.Module, train_set, eval_set, metadata: Dict[str, Any], resume: bool,
         progress: bool, on_start: Optional[Callable[[nn.Module], Any]], ctx: DistributedContext) -> PretrainResult:
    """The body of :func:`pretrain` once its arguments are checked and the process group is joined.

    Args:
        config, model, train_set, eval_set, metadata, resume, progress, on_start: as in :func:`pretrain`.
        ctx: this process's place in the process group and its device.

    Returns:
        The :class:`PretrainResult` (:func:`_summary`).
    """
    run = _open_run(config, model, ctx, eval_set, resume)
    note = warmup_note(run.tc, run.start) if run.rank == 0 else None
    if note:
        print(note, file=sys.stderr, flush=True)
    _prepare_model(run, on_start)
    _prepare_optimization(run)
    balanced = _balance_loss_weights(run, train_set) if run.start == 0 else None
    _prepare_step_module(run)
    loader = _loader(run, train_set)
    run.log = MetricsLog(run.out, run.tc.steps, run.start, progress) if run.rank == 0 else None
    run.tally = _Tally()
    final = None
    try:
        if run.log and balanced:
            run.log.write({"step": 0, **balanced})
        if run.log and eval_set is not None and run.start == 0:  # the untrained baseline of the retrieval curves
            run.log.write({"step": 0, **_evaluate(run)})
        for batch in loader:
            losses, grad_norm, lr = _train_step(run, batch)
            _after_step(run, losses, grad_norm, lr)
        final = _finish(run, metadata)
    finally:
        if run.log:
            run.log.close()
    return _summary(run, final)


def _open_run(config: PretrainConfig, model: nn.Module, ctx: DistributedContext, eval_set, resume: bool
              ) -> _RunContext:
    """The run's context, with the state to resume from (``resume`` and a usable one on disk) or none.

    Args:
        config, model, eval_set, resume: as in :func:`pretrain`.
        ctx: this process's place in the process group and its device.

    Returns:
        The :class:`_RunContext`; ``start`` and ``step`` are the resumed step (0 on a fresh start).

    Raises:
        CheckpointError: there are states but none can be resumed from.
        ConfigError: the state was written with another configuration.
    """
    states = _States(Path(config.output) / "checkpoints", ctx.rank)
    state = states.resume(config, ctx.device) if resume else None
    if state is None:
        states.forget_previous()  # a fresh start: an older run's previous.pt must never be fallen back to
    start = int(state["step"]) if state else 0
    return _RunContext(config=config, model=model, ctx=ctx, states=states, state=state, start=start, step=start,
                       eval_set=eval_set)


def _prepare_model(run: _RunContext, on_start: Optional[Callable[[nn.Module], Any]]) -> None:
    """Freeze what pretraining gives no gradient, move the model to the device, load the resumed weights, write
    ``config.yaml`` and run the caller's ``on_start`` check (rank 0; every rank stops if it fails).

    Args:
        run: the run's context.
        on_start: the caller's check, called with the model (see :func:`pretrain`), or ``None``.
    """
    model = run.model
    # Parameters pretraining gives no gradient (segmentation head, dead weights) are frozen, so DDP can run without
    # find_unused_parameters (which costs a graph traversal per step).
    freeze(model.backbone.network, model.backbone.unused_in_pretraining())
    model.to(run.device)
    if run.state:
        model.load_state_dict(run.state["model"])
        if isinstance(run.state.get("loss_weights"), dict):  # set by model.loss_balance at the run's start
            model.loss.weights.update({k: float(v) for k, v in run.state["loss_weights"].items()})
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(run.config, run.out / "config.yaml")
    _call_on_start(on_start, model, run.rank, run.world, run.device)
    if run.rank == 0:
        run.states.last.parent.mkdir(exist_ok=True)


def _prepare_optimization(run: _RunContext) -> None:
    """Precision, optimizer, learning-rate schedule and loss scaler, restored from the resumed state with the
    random streams (or the streams seeded for a fresh start); the resumed state is then released."""
    tc, state = run.tc, run.state
    run.amp_dtype = _amp_dtype(tc.amp, run.device)
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    run.encoder_params = encoder_parameters(run.model)
    run.optimizer = _optimizer(run.model.param_groups(), tc)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
    if state:
        run.optimizer.load_state_dict(_regrouped(state["optimizer"], run.optimizer, run.params))
        run.scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == run.world:
            _set_rng(state["rng"][run.rank], run.device)
        else:
            warnings.warn(f"{run.states.last} was written by {len(state['rng'])} processes, this run has "
                          f"{run.world}: the global batch and the random streams change", stacklevel=4)
            _seed_all(tc.seed + run.rank + run.start)
    else:
        _seed_all(tc.seed + run.rank)  # + rank: dropout differs between ranks, as it would between samples
    # Built from the configuration and advanced to the resumed step, never loaded from the state: the same learning
    # rates as an uninterrupted run, the new schedule after a changed train.steps, and old (LambdaLR) states resume.
    run.scheduler = lr_scheduler(run.optimizer, tc, run.start)
    run.state = None  # applied: nothing reads it again


def _prepare_step_module(run: _RunContext) -> None:
    """``torch.compile`` (``train.compile``, not on CPU) and the :class:`_Step` module the loop calls, DDP-wrapped
    when there are several processes."""
    model = run.model
    if run.tc.compile:
        if run.device.type == "cpu":
            warnings.warn("train.compile is ignored on CPU", stacklevel=4)
        else:  # in place: state_dict keys stay the model's own
            model.backbone.compile()
            model.psat.compile()
    run.step_module = _Step(model, run.world)
    if run.world > 1:
        # Ablations with a zero loss weight leave whole parts without gradient: only then pay for the search.
        run.step_module = nn.parallel.DistributedDataParallel(
            run.step_module, device_ids=[run.device] if run.device.type == "cuda" else None,
            find_unused_parameters=not all(model.loss.weights.values()))


def _balance_loss_weights(run: _RunContext, train_set) -> Optional[Dict[str, float]]:
    """``model.loss_balance``: set the balanced terms' weights from the encoder-gradient norms of step 0's batch
    (the same on every rank: the norms are averaged over the ranks), before DDP wraps the model.

    Returns:
        ``{"loss_weight/<term>": weight, "encoder_grad_unweighted/<term>": norm}`` for the log, or ``None`` when no
        term is balanced.

    Raises:
        Med3DInsightError: no reconstruction term, or a balanced term that does not reach the encoder.
    """
    ratios = {k: v for k, v in dataclasses.asdict(run.config.model.loss_balance).items() if v is not None}
    if not ratios:
        return None
    from torch.utils.data import default_collate

    weights = run.model.loss.weights
    saved = dict(weights)
    weights.update({k: 1.0 for k in ratios})  # computed at weight 1 whatever loss_weights says
    first = run.rank * run.tc.batch_size  # step 0's samples of this rank (as _StepSampler gives them)
    batch = default_collate([train_set[i] for i in range(first, first + run.tc.batch_size)])
    batch = {k: v.to(run.device) for k, v in batch.items()}
    run.model.train()
    try:
        with torch.autocast(run.device.type, dtype=run.amp_dtype) if run.amp_dtype else nullcontext():
            losses = _Step(run.model, run.world)(**batch)
        norms = _reduce_mean(term_gradient_norms(losses, weights, run.encoder_params, weighted=False), 1, run.world)
    finally:
        weights.clear()
        weights.update(saved)
    weights.update(balanced_weights(norms, weights, ratios))
    return {**{f"loss_weight/{k}": v for k, v in weights.items()},
            **{f"encoder_grad_unweighted/{k}": v for k, v in norms.items()}}


def _loader(run: _RunContext, train_set) -> DataLoader:
    """This rank's batches from ``run.start`` to ``train.steps`` (see :class:`_StepSampler`)."""
    tc, workers = run.tc, run.config.data.num_workers
    return DataLoader(train_set, batch_size=tc.batch_size,
                      sampler=_StepSampler(run.start, tc.steps, tc.batch_size, run.rank, run.world),
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=run.device.type == "cuda",
                      generator=torch.Generator().manual_seed(tc.seed))


def _train_step(run: _RunContext, batch: Dict[str, torch.Tensor]
                ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, float]:
    """One optimizer step on ``batch``: forward, backward, gradient clipping, the (scaled) step, the schedule.

    Returns:
        The step's losses (on the device), the gradient norm before clipping and the learning rate it used;
        ``run.step`` is advanced.

    Raises:
        NonFiniteError: the OT solver refused a non-finite cost matrix (a diverged model).
    """
    tc, optimizer, scaler = run.tc, run.optimizer, run.scaler
    batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
    run.model.train()
    optimizer.zero_grad(set_to_none=True)
    losses = _forward(run, batch)
    if (run.step + 1) % tc.log_every == 0 or run.step + 1 == tc.steps:  # where each term's gradient goes
        run.tally.encoder_grad = term_gradient_norms(losses, run.model.loss.weights, run.encoder_params)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, tc.grad_clip) if tc.grad_clip > 0 \
        else _grad_norm(run.params)
    scaler.step(optimizer)
    scaler.update()
    _after_optimizer_step(run)
    lr = run.lr()
    advance_schedule(run.scheduler)  # fp16: a step the scaler skipped is still a step of the schedule
    run.step += 1
    return losses, grad_norm, lr


def _forward(run: _RunContext, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The losses of ``batch`` (gathered over the ranks, under autocast when AMP is on)."""
    try:
        with torch.autocast(run.device.type, dtype=run.amp_dtype) if run.amp_dtype else nullcontext():
            return run.step_module(**batch)
    except NonFiniteCostError:
        # A diverged model (the same on every rank: the OT inputs are gathered) can make the OT solver refuse its
        # cost matrix (non-finite weights, or finite ones whose predictions or learned metric overflow) before there
        # is a loss to check: say what happened, not where it surfaced.
        if not all(bool(torch.isfinite(p.detach()).all()) for p in run.params):
            raise _diverged("weights", run.step, run.lr(), run.states.saved_step) from None
        raise _diverged("loss", run.step + 1, run.lr(), run.states.saved_step) from None


def _after_optimizer_step(run: _RunContext) -> None:
    """What follows every optimizer step (also one the fp16 scaler skipped): parameters back into their bounds
    (CLIP's logit scale clamped to at most 100, as CLIP does after its optimizer step)."""
    run.model.after_optimizer_step()


def _after_step(run: _RunContext, losses: Dict[str, torch.Tensor], grad_norm: torch.Tensor, lr: float) -> None:
    """Tally the step; at a log or save step check that the losses and weights are finite; log, evaluate and save
    the training state when their step has come.

    Args:
        run: the run's context, ``run.step`` already counting this step.
        losses, grad_norm, lr: what :func:`_train_step` returned.

    Raises:
        NonFiniteError: a loss of the steps since the last check, or a weight, is non-finite (on any rank).
    """
    tc, tally, step = run.tc, run.tally, run.step
    tally.count += 1
    for k, v in {**losses, "grad_norm": grad_norm}.items():  # summed on device: no sync per step
        tally.sums[k] = tally.sums.get(k, 0) + v.detach().float()
    tally.window.append(losses["loss"].detach())

    record: Dict[str, Any] = {}
    save = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.steps
    if save or step % tc.log_every == 0:
        # fp16 gradients may overflow (the scaler then skips the step); a non-finite loss is a real failure
        _check_finite(tally.window, run.params, step, lr, run.states.saved_step, run.world, run.device)
        tally.window = []
    if step % tc.log_every == 0 or step == tc.steps:
        tally.last_losses = _reduce_mean(tally.sums, tally.count, run.world)
        grads = {f"encoder_grad/{k}": v for k, v in _reduce_mean(tally.encoder_grad, 1, run.world).items()} \
            if tally.encoder_grad else {}
        tally.encoder_grad = {}
        now = time.perf_counter()
        record = {"step": step, "lr": lr, **tally.last_losses, **grads,
                  "samples_per_s": run.global_batch * tally.count / (now - tally.tick)}
        tally.sums, tally.count, tally.tick = {}, 0, now
    if run.log and run.eval_set is not None and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps):
        record.update({"step": step, **_evaluate(run)})
    if run.log:
        run.log.advance(step, record)
    if save:
        run.states.save(run.model, run.optimizer, run.scheduler, run.scaler, step, run.config, run.world, run.device)


def _evaluate(run: _RunContext) -> Dict[str, float]:
    """Held-out retrieval metrics (rank 0), kept as ``tally.last_eval``; returned with ``eval/`` keys."""
    run.tally.last_eval = evaluate(run.model, run.eval_set, run.tc.batch_size, run.device, amp_dtype=run.amp_dtype)
    return {f"eval/{k}": v for k, v in run.tally.last_eval.items()}


def _finish(run: _RunContext, metadata: Dict[str, Any]) -> Optional[Path]:
    """Write the pretrained model (``med3dinsight.safetensors``) and ``metrics.png`` on rank 0; all ranks wait.

    Returns:
        The checkpoint's path on rank 0, ``None`` on the others.
    """
    final = None
    if run.rank == 0:
        pretraining = {"steps": run.step, "global_batch": run.global_batch, "world_size": run.world,
                       "config": run.config.to_dict()}
        final = save_pretrained(run.model, run.out / "med3dinsight.safetensors", **metadata, pretraining=pretraining)
        if run.log.path.is_file():
            plot_metrics(run.log.path, run.out / "metrics.png")
    if run.world > 1:
        dist.barrier()
    return final


def _summary(run: _RunContext, final: Optional[Path]) -> PretrainResult:
    """What :func:`pretrain` returns (see there)."""
    return PretrainResult(checkpoint=str(final) if final else None, state=str(run.states.last), output=str(run.out),
                          steps=run.step, start_step=run.start, global_batch=run.global_batch,
                          losses=dict(run.tally.last_losses), eval=dict(run.tally.last_eval))


# ----------------------------------------------------------------------------------------------------- helpers











