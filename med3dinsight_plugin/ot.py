"""Entropic partial optimal transport in torch: log-domain, batched, differentiable.

Same problem, arguments and iterations as POT's ``ot.partial.entropic_partial_wasserstein`` (Dykstra's iterative
Bregman projections, Benamou et al. 2015, prop. 5), rewritten for training:

* **log domain** -- the kernel ``exp(-M / reg)`` underflows for small ``reg`` (POT issue #723); here the state is
  log-domain potentials, so the plan is finite for any ``reg > 0`` and ``log(plan)`` is exact (the alignment loss
  takes its log).
* **potentials, not matrices** -- POT keeps three full correction matrices ``q1, q2, q3`` and multiplies by
  ``diag(...)`` with a dense matmul (O(n^3) per iteration). Each correction is in fact a row vector, a column vector
  and a scalar (``q1 = 1 / min(a / rowsum, 1)`` etc.), so the plan is always ``exp(-M/reg + f_i + g_j + c)`` and an
  iteration costs two matrix-vector products with a stabilised kernel (see :func:`_iterate`).
* **batched** -- leading dimensions of ``M`` are independent problems solved together (e.g. image and text terms).
* **differentiable** -- autograd runs through the iterations (``grad_iters=None``), or, to bound memory on large
  batches, through only the last ``grad_iters`` iterations started from the converged potentials.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["entropic_partial_wasserstein", "log_entropic_partial_wasserstein"]

Scalar = Union[float, torch.Tensor]


def entropic_partial_wasserstein(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float,
                                 m: Optional[Scalar] = None, numItermax: int = 1000, stopThr: float = 1e-100,
                                 verbose: bool = False, log: bool = False, grad_iters: Optional[int] = None):
    """Entropic partial-OT plan, with POT's argument meanings (``ot.partial.entropic_partial_wasserstein``).

    Solves ``min <P, M> + reg * sum P log P`` s.t. ``P 1 <= a``, ``P^T 1 <= b``, ``P >= 0``, ``1^T P 1 = m``.

    Args:
        a: source weights, shape ``(..., n)``; empty means uniform ``1/n`` as in POT.
        b: target weights, shape ``(..., k)``; empty means uniform ``1/k``.
        M: cost matrices, shape ``(..., n, k)``; leading dimensions are independent problems.
        reg: entropic regularisation (> 0).
        m: mass to transport, a scalar or one per problem; default ``min(|a|_1, |b|_1)``.
        numItermax: maximum number of iterations.
        stopThr: stop when ``||P_prev - P||_F <= stopThr`` for every problem (checked every 10 iterations, as POT).
        verbose: print the error every 10 iterations.
        log: also return a dict with ``err`` (list of floats), ``n_iter`` and ``partial_w_dist`` (``<P, M>``).
        grad_iters: ``None`` backpropagates through every iteration; an integer first converges without autograd,
            then runs that many differentiable iterations from the converged potentials (bounded memory).

    Returns:
        The plan ``P`` of shape ``(..., n, k)``, and the log dict if ``log`` is true.
    """
    out = log_entropic_partial_wasserstein(a, b, M, reg, m, numItermax, stopThr, verbose, log, grad_iters)
    if log:
        log_plan, info = out
        plan = log_plan.exp()
        info["partial_w_dist"] = (plan * M).sum((-2, -1))
        return plan, info
    return out.exp()


def log_entropic_partial_wasserstein(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float,
                                     m: Optional[Scalar] = None, numItermax: int = 1000, stopThr: float = 1e-100,
                                     verbose: bool = False, log: bool = False, grad_iters: Optional[int] = None):
    """Like :func:`entropic_partial_wasserstein` but returns ``log(P)``, exact even where ``P`` underflows."""
    a, b, log_m = _check_inputs(a, b, M, reg, m)
    if numItermax < 0 or (grad_iters is not None and grad_iters < 0):
        raise ValueError(f"numItermax and grad_iters must be >= 0, got {numItermax} and {grad_iters}")
    log_a, log_b = a.log(), b.log()
    L0 = -M / reg
    state = _init_state(L0, log_m)
    info = {"err": [], "n_iter": 0}
    if grad_iters is None:
        state = _iterate(L0, log_a, log_b, log_m, state, numItermax, stopThr, verbose, info)
    else:
        with torch.no_grad():
            detached = tuple(s.detach() for s in state)
            state = _iterate(L0.detach(), log_a.detach(), log_b.detach(), log_m.detach(), detached,
                             numItermax, stopThr, verbose, info)
        # Restart from the converged potentials with autograd: the value is unchanged (a fixed point) and the
        # gradient flows through the kernel and the last `grad_iters` projections.
        state = _iterate(L0, log_a, log_b, log_m, state, grad_iters, None, False, {"err": [], "n_iter": 0})
    log_plan = _log_plan(L0, state)
    return (log_plan, info) if log else log_plan


def _check_inputs(a, b, M, reg, m):
    if not isinstance(M, torch.Tensor) or M.dim() < 2:
        raise ValueError(f"M must be a tensor of shape (..., n, k), got "
                         f"{tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__}")
    if not M.dtype.is_floating_point:
        raise ValueError(f"M must be a floating-point tensor, got {M.dtype}")
    if not bool(torch.isfinite(M).all()):
        raise ValueError("the cost matrix M contains NaN or Inf")
    if not (isinstance(reg, (int, float)) and reg > 0):
        raise ValueError(f"reg must be a positive number, got {reg!r}")
    n, k = M.shape[-2:]
    batch = M.shape[:-2]
    a = _marginal(a, n, batch, M, "a")
    b = _marginal(b, k, batch, M, "b")
    max_mass = torch.minimum(a.sum(-1), b.sum(-1))
    if m is None:
        m = max_mass
    m = torch.as_tensor(m, dtype=M.dtype, device=M.device).expand(batch)
    if bool((m <= 0).any()):
        raise ValueError("Problem infeasible. Parameter m should be greater than 0.")
    # POT rejects m > min(|a|, |b|); allow float rounding so that m computed from the marginals is accepted.
    if bool((m > max_mass * (1 + 1e-6)).any()):
        raise ValueError("Problem infeasible. Parameter m should lower or equal than min(|a|_1, |b|_1).")
    return a, b, m.log()


def _marginal(w, size, batch, M, name):
    w = torch.as_tensor(w, dtype=M.dtype, device=M.device)
    if w.numel() == 0:
        w = torch.full((size,), 1.0 / size, dtype=M.dtype, device=M.device)
    if w.shape[-1:] != (size,):
        raise ValueError(f"{name} must have shape (..., {size}) to match M of shape {tuple(M.shape)}, "
                         f"got {tuple(w.shape)}")
    if not bool((w > 0).all()):
        raise ValueError(f"{name} must be strictly positive (a zero weight makes the Bregman projections undefined)")
    return w.expand(*batch, size)


def _init_state(L0, log_m):
    """Potentials (f, g, c) and Dykstra corrections (q1, q2, q3) of the mass-normalised kernel."""
    f = L0.new_zeros(L0.shape[:-1])
    g = L0.new_zeros(L0.shape[:-2] + L0.shape[-1:])
    c = log_m - torch.logsumexp(L0.flatten(-2), -1)
    return f, g, c, torch.zeros_like(f), torch.zeros_like(g), torch.zeros_like(c)


def _log_plan(L0, state):
    f, g, c = state[:3]  # the corrections do not enter the plan
    return L0 + f.unsqueeze(-1) + g.unsqueeze(-2) + c[..., None, None]


# Potentials may drift this far (in log units) from the kernel they were absorbed into before it is recomputed:
# e^30 keeps every product far from float32 overflow, and a kernel entry that underflowed (< 1e-38) stays
# negligible (< 1e-25) until the next absorption recomputes it exactly from the log-domain potentials.
_ABSORB_AT = 30.0


def _iterate(L0, log_a, log_b, log_m, state, num_iter, stop_thr, verbose, info):
    """Dykstra iterations on the potentials; ``stop_thr=None`` runs exactly ``num_iter`` without error checks.

    Row and column sums are matrix-vector products with a stabilised kernel ``K = exp(L0 + F + G + C)`` (the
    plan at the last absorption), scaled by ``exp(f - F)``, ``exp(g - G)``, ``exp(c - C)``: two matvecs per
    iteration instead of log-sum-exps over the matrix, with log-domain accuracy because the kernel is
    re-absorbed whenever the potentials drift by more than ``_ABSORB_AT``.
    """
    f, g, c, q1, q2, q3 = state
    tiny = torch.finfo(L0.dtype).tiny
    kernel = None
    for it in range(num_iter):
        if kernel is None or _drift(f, F, g, G, c, C) > _ABSORB_AT:
            F, G, C = f, g, c
            kernel = _log_plan(L0, (F, G, C)).exp()
        prev = (f, g, c) if stop_thr is not None and it % 10 == 0 else None
        # Row projection: scale each row by min(a_i / rowsum_i, 1), after re-applying its correction.
        f = f + q1
        row_sum = _matvec(kernel, (g - G).exp()).clamp_min(tiny)  # clamp: an empty row has log-sum -inf
        rows = row_sum.log() + (f - F) + (c - C).unsqueeze(-1)
        s = (log_a - rows).clamp(max=0.0)  # log min(a_i / rowsum_i, 1)
        f, q1 = f + s, -s
        # Column projection.
        g = g + q2
        col_sum = _matvec(kernel.transpose(-2, -1), (f - F).exp()).clamp_min(tiny)  # reused for the mass below
        cols = col_sum.log() + (g - G) + (c - C).unsqueeze(-1)
        t = (log_b - cols).clamp(max=0.0)
        g, q2 = g + t, -t
        # Total-mass projection: rescale to mass m.
        c = c + q3
        total = ((g - G).exp() * col_sum).sum(-1).clamp_min(tiny).log() + (c - C)
        c, q3 = c + log_m - total, total - log_m
        info["n_iter"] = it + 1
        if prev is not None:
            err = _plan_change(L0, prev, (f, g, c))
            info["err"].append(err)
            if verbose:
                print(f"{it:5d}|{err:8e}|")
            if err <= stop_thr:
                break
    return f, g, c, q1, q2, q3


def _matvec(matrix, vector):
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _drift(f, F, g, G, c, C):
    with torch.no_grad():
        return float(torch.stack([(f - F).abs().max(), (g - G).abs().max(), (c - C).abs().max()]).max())


def _plan_change(L0, prev, cur):
    """Largest Frobenius norm over the batch of ``P_prev - P`` (POT's stopping error)."""
    with torch.no_grad():
        diff = _log_plan(L0, prev).exp() - _log_plan(L0, cur).exp()
        return float(torch.linalg.vector_norm(diff.flatten(-2), dim=-1).max())
