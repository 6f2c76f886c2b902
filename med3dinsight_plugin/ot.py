"""Entropic partial optimal transport in torch: log-domain, batched, differentiable.

Same problem, arguments and iterations as POT's ``ot.partial.entropic_partial_wasserstein`` (Dykstra's iterative
Bregman projections, Benamou et al. 2015, prop. 5), rewritten for training:

* **log domain** -- the kernel ``exp(-M / reg)`` underflows for small ``reg`` (POT issue #723); here the state is
  log-domain potentials, so the plan is finite for any ``reg > 0`` and ``log(plan)`` is exact (the alignment loss
  takes its log).
* **potentials, not matrices** -- POT keeps three full correction matrices ``q1, q2, q3`` and multiplies by
  ``diag(...)`` with a dense matmul (O(n^3) per iteration). Each correction is in fact the inverse of the last
  scaling of a row, a column or the total mass, so Dykstra's iteration collapses to three potentials, the plan is
  always ``exp(-M/reg + f_i + g_j + c)``, and an iteration costs two matrix-vector products with a stabilised kernel
  and a few vector operations (see :func:`_iterate`).
* **blocks without synchronisation** -- the iterations between two convergence checks (every 10, as POT) run as one
  block that never reads a value back to the host. On CUDA outside autograd the block is compiled with
  ``torch.compile`` when that works (eager otherwise). On CPU without autograd it runs in numpy on the tensors'
  memory (one thread, half torch's cost per operation on vectors of a few hundred entries; see ``_HOST_MAX``);
  with autograd, in torch.
* **batched** -- leading dimensions of ``M`` are independent problems solved together (e.g. image and text terms).
* **differentiable** -- autograd runs through the iterations (``grad_iters=None``), or, to bound memory on large
  batches, through only the last ``grad_iters`` iterations started from the converged potentials.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Union

import numpy as np
import torch

from .errors import Med3DInsightError

__all__ = ["NonFiniteCostError", "entropic_partial_wasserstein", "log_entropic_partial_wasserstein"]


class NonFiniteCostError(Med3DInsightError):
    """The cost matrix holds NaN or Inf: a bad argument, or a numerical failure upstream (e.g. a diverged model's
    embeddings). A :class:`Med3DInsightError` (so still a ``ValueError``): the command line reports it in one line
    wherever it surfaces; pretraining catches it first and explains it as the run's divergence."""

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
        stopThr: stop when ``||P_prev - P||_F <= stopThr`` for every problem (checked every 10 iterations, as POT)
            and no row or column sum of ``P`` exceeds its bound by more than 1e-4 (relative): POT's test alone can
            pass at iteration 0, before the plan has moved (see ``_MARGINAL_RTOL``).
        verbose: print the error every 10 iterations.
        log: also return a dict with ``err`` (list of floats), ``n_iter`` and ``partial_w_dist`` (``<P, M>``).
        grad_iters: ``None`` backpropagates through every iteration; an integer first converges without autograd,
            then runs that many differentiable iterations from the converged potentials (bounded memory).

    Returns:
        The plan ``P`` of shape ``(..., n, k)``, and the log dict if ``log`` is true.
    """
    out = log_entropic_partial_wasserstein(a, b, M, reg, m, numItermax, stopThr, verbose, log, grad_iters)
    log_plan, info = out if log else (out, None)
    plan = log_plan.exp() if log_plan.requires_grad else _exp_(log_plan)
    if log:
        info["partial_w_dist"] = (plan * M).sum((-2, -1))
        return plan, info
    return plan


def log_entropic_partial_wasserstein(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float,
                                     m: Optional[Scalar] = None, numItermax: int = 1000, stopThr: float = 1e-100,
                                     verbose: bool = False, log: bool = False, grad_iters: Optional[int] = None):
    """Like :func:`entropic_partial_wasserstein` but returns ``log(P)``, exact even where ``P`` underflows."""
    a, b, log_m = _check_inputs(a, b, M, reg, m)
    if numItermax < 0 or (grad_iters is not None and grad_iters < 0):
        raise Med3DInsightError(f"numItermax and grad_iters must be >= 0, got {numItermax} and {grad_iters}")
    n, k = M.shape[-2:]
    batch = M.shape[:-2]
    host = _host(M)
    L0 = torch.from_numpy(np.divide(host, -reg)) if host is not None else -M / reg
    # Internally the problems are flattened to one batch dimension: L (B, n, k), f (B, n), g (B, k), c (B,).
    L = L0.reshape(-1, n, k)
    log_a, log_b = _log(a).reshape(-1, n), _log(b).reshape(-1, k)
    log_m = log_m.reshape(-1)
    info = {"err": [], "n_iter": 0}
    if grad_iters is None:
        f, g, c = _iterate(L, log_a, log_b, log_m, None, numItermax, stopThr, verbose, info)
    else:
        with torch.no_grad():
            f, g, c = _iterate(L.detach(), log_a.detach(), log_b.detach(), log_m.detach(), None, numItermax,
                               stopThr, verbose, info)
        # Restart from the converged potentials with autograd: the value is unchanged (a fixed point) and the
        # gradient flows through the kernel and the last `grad_iters` projections.
        f, g, c = _iterate(L, log_a, log_b, log_m, (f, g, c), grad_iters, None, False, {"err": [], "n_iter": 0})
    log_plan = _log_plan(L0, f.reshape(*batch, n), g.reshape(*batch, k), c.reshape(batch))
    return (log_plan, info) if log else log_plan


def _check_inputs(a, b, M, reg, m):
    if not isinstance(M, torch.Tensor) or M.dim() < 2:
        raise Med3DInsightError(f"M must be a tensor of shape (..., n, k), got "
                                f"{tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__}")
    if not M.dtype.is_floating_point:
        raise Med3DInsightError(f"M must be a floating-point tensor, got {M.dtype}")
    host = _host(M.detach())
    if not (np.isfinite(host).all() if host is not None else bool(torch.isfinite(M).all())):
        raise NonFiniteCostError("the cost matrix M contains NaN or Inf")
    if not (isinstance(reg, (int, float)) and reg > 0):
        raise Med3DInsightError(f"reg must be a positive number, got {reg!r}")
    n, k = M.shape[-2:]
    batch = M.shape[:-2]
    a = _marginal(a, n, batch, M, "a")
    b = _marginal(b, k, batch, M, "b")
    max_mass = torch.minimum(a.sum(-1), b.sum(-1))
    if m is None:
        m = max_mass
    m = torch.as_tensor(m, dtype=M.dtype, device=M.device).expand(batch)
    if bool((m <= 0).any()):
        raise Med3DInsightError("Problem infeasible. Parameter m should be greater than 0.")
    # POT rejects m > min(|a|, |b|); allow float rounding so that m computed from the marginals is accepted.
    if bool((m > max_mass * (1 + 1e-6)).any()):
        raise Med3DInsightError("Problem infeasible. Parameter m should lower or equal than min(|a|_1, |b|_1).")
    return a, b, _log(m)


def _marginal(w, size, batch, M, name):
    w = torch.as_tensor(w, dtype=M.dtype, device=M.device)
    if w.numel() == 0:
        w = torch.full((size,), 1.0 / size, dtype=M.dtype, device=M.device)
    if w.shape[-1:] != (size,):
        raise Med3DInsightError(f"{name} must have shape (..., {size}) to match M of shape {tuple(M.shape)}, "
                                f"got {tuple(w.shape)}")
    if not bool((w > 0).all()):
        raise Med3DInsightError(f"{name} must be strictly positive (a zero weight makes the Bregman projections "
                                "undefined)")
    return w.expand(*batch, size)


def _log_plan(L0, f, g, c):
    hosts = [_host(t) for t in (L0, f, g, c)]
    if all(h is not None for h in hosts):  # see _HOST_MAX
        L0, f, g, c = hosts
        return torch.from_numpy(L0 + (f + c[..., None])[..., None] + g[..., None, :])
    return L0 + (f + c.unsqueeze(-1)).unsqueeze(-1) + g.unsqueeze(-2)


# Iterations between convergence checks, as in POT (it tests iterations 0, 10, 20, ...). The iterations between two
# checks run as one block that reads nothing back to the host.
_CHECK_EVERY = 10
# A block runs on a kernel that absorbed the potentials at its start; the potentials then drift from it by the
# |log| of the scalings (see _Kernel). Past _ABSORB_AT (log units) at a check the kernel is recomputed; a block that
# drifted past _REDO_AT, or produced a non-finite value, is discarded and redone exactly in the log domain. e^30
# keeps every product far from float32 overflow, and a kernel entry that underflowed (< 1e-38) stays negligible
# (< 1e-25).
_ABSORB_AT = 15.0
_REDO_AT = 30.0
# The stopping test also requires every row and column sum of the plan to be within this relative tolerance of its
# bound. POT's test alone (the plan moved by at most stopThr in the checked iteration) can pass at iteration 0 when
# the kernel's mass sits on entries whose row or column is over its bound: the row or column projection scales that
# mass down, the total-mass projection scales it straight back up, and the plan stays put while the Dykstra
# corrections build up over many iterations (see test_dominated_cost_does_not_stop_before_the_plan_moves).
_MARGINAL_RTOL = 1e-4


def _iterate(L, log_a, log_b, log_m, state, num_iter, stop_thr, verbose, info):
    """``num_iter`` iterations (fewer if the plan converges) from potentials ``state = (f, g, c)``, or from the
    initial plan (the kernel ``exp(L)`` scaled to mass ``m``) if ``state`` is None.

    Dykstra's corrections for these three projections are the inverses of the last scalings, so the iteration
    collapses to ``f = min(log a - LSE_j(L + g + c), 0)``, ``g = min(log b - LSE_i(L + f + c), 0)``,
    ``c = log m - LSE(L + f + g)``: POT's iterates, with no correction state. Blocks of iterations run these in the
    scaling domain on a stabilised kernel (:func:`_block_numpy`, :func:`_block`); ``stop_thr=None`` runs exactly
    ``num_iter`` iterations and never computes the plan's change.
    """
    kernel, scalings = (_Kernel.initial(L, log_m) if state is None else (None, None))
    f, g, c = state if state is not None else (None, None, None)
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (L, log_a, log_b, log_m))
    a_m = _exp(log_a - log_m.unsqueeze(-1))  # a / m, b / m: the iteration's constants (see _block)
    b_m = _exp(log_b - log_m.unsqueeze(-1))
    numpy_path = (not differentiable and L.device.type == "cpu" and L.dtype in (torch.float32, torch.float64)
                  and not _use_compile(L, False))
    a_np, b_np = (a_m.numpy(), b_m.numpy()) if numpy_path else (None, None)
    done = 0
    while done < num_iter:
        check_at = -(-done // _CHECK_EVERY) * _CHECK_EVERY  # POT checks iterations 0, 10, 20, ...
        n = min(check_at - done + 1, num_iter - done)
        checked = stop_thr is not None and done + n - 1 == check_at
        if kernel is None:
            kernel = _Kernel(L, f, g, c, log_m)
            scalings = kernel.identity()
        start = scalings
        if not numpy_path:
            before, scalings = _run_block(kernel, a_m, b_m, start, n, differentiable)
            stats = kernel.stats(before, scalings, checked)
        else:  # the scalings stay numpy arrays between blocks
            before, scalings, stats = _block_numpy(kernel, a_np, b_np, tuple(map(_numpy, start)), n, checked)
        drift, err = _read_stats(stats)  # the block's one synchronisation
        if not drift <= _REDO_AT:  # also NaN
            f, g, c = kernel.potentials(*start)
            before, (f, g, c) = _log_block(L, log_a, log_b, log_m, f, g, c, n)
            kernel = None
            if checked:
                err = float(_log_plan_change(L, before, (f, g, c)).max())
        done += n
        info["n_iter"] = done
        if checked:
            info["err"].append(err)
            if verbose:
                print(f"{done - 1:5d}|{err:8e}|")
            if err <= stop_thr:
                excess = (kernel.marginal_excess(a_m, b_m, scalings) if kernel is not None
                          else _marginal_excess(L, log_a, log_b, f, g, c))
                if excess <= _MARGINAL_RTOL:
                    break
        if kernel is not None and drift > _ABSORB_AT:
            f, g, c = kernel.potentials(*scalings)
            kernel = None
    if kernel is not None:
        f, g, c = kernel.potentials(*scalings)
    return f, g, c


class _Kernel:
    """The plan at potentials ``(F, G, C)``, ``K = exp(L + F + G + C)``: the stabilised kernel of a block.

    Potentials ``(f, g, c)`` are represented by scalings ``u = exp(f - F)``, ``v = exp(g - G)`` (shapes (B, n),
    (B, k)) and ``om = exp(c - C) / m`` (shape (B, 1)), so that the plan is ``K * u v^T * m om``.
    """

    def __init__(self, L, f, g, c, log_m, K=None):
        self.F, self.G, self.C, self.log_m = f, g, c, log_m
        self.m = _exp(log_m).unsqueeze(-1)
        if K is None:
            K = _log_plan(L, f, g, c)
            K = K.exp() if K.requires_grad else _exp_(K)
        self.K = K
        host = _host(K)  # contiguous transpose: a faster matrix-vector product on CPU
        self.KT = (torch.from_numpy(np.ascontiguousarray(host.transpose(0, 2, 1))) if host is not None
                   else K.transpose(-2, -1).contiguous())
        big = torch.finfo(L.dtype).max
        # f <= 0 and g <= 0 (the row and column projections only scale down): caps on u and v.
        self.cap_u = _exp(-f).clamp(max=big)
        self.cap_v = _exp(-g).clamp(max=big)
        self._numpy = None

    @classmethod
    def initial(cls, L, log_m):
        """The kernel ``exp(L - max L)`` (one exp), with the scalings of the initial plan: ``f = g = 0`` and
        ``c = log m - LSE(L)``. Returns the kernel and the scalings."""
        host = _host(L)
        if host is not None:
            shift = host.max(axis=(-2, -1), keepdims=True)
            K = np.exp(host - shift)
            total = torch.from_numpy(K.sum(axis=(-2, -1)))
            K, shift = torch.from_numpy(K), torch.from_numpy(shift)
        else:
            shift = L.detach().amax((-2, -1), keepdim=True)  # the plan does not depend on it: no gradient through it
            K = (L - shift).exp()
            total = K.sum((-2, -1))
        kernel = cls(L, L.new_zeros(L.shape[:-1]), L.new_zeros(L.shape[:-2] + L.shape[-1:]), -shift[:, 0, 0],
                     log_m, K)
        u, v, _ = kernel.identity()
        return kernel, (u, v, 1.0 / total.unsqueeze(-1))  # w = exp(c - C) = m / sum(K)

    def identity(self):
        """Scalings of the absorbed potentials themselves."""
        return torch.ones_like(self.F), torch.ones_like(self.G), 1.0 / self.m

    def potentials(self, u, v, om):
        u, v, om = map(_tensor, (u, v, om))
        return self.F + _log(u), self.G + _log(v), self.C + _log((om * self.m).squeeze(-1))

    def stats(self, before, after, checked):
        """What a check reads back, as one tensor: the smallest and largest scaling (``exp`` of how far the
        potentials moved from the kernel) and, if ``checked``, POT's stopping error, the largest Frobenius norm of
        ``P_before - P_after``. With ``x = u om``, ``P / m = K * x v^T`` and the difference is
        ``K * ((x - x') v^T + x' (v - v')^T)``: two rank-one terms, no difference of nearly equal plan entries."""
        (u_p, v_p, om_p), (u, v, om) = before, after
        with torch.no_grad():
            low, high = torch.aminmax(torch.cat((u.flatten(), v.flatten(), (om * self.m).flatten())))
            stats = [low, high]
            if checked:
                x, x_p = u * om, u_p * om_p
                diff = (x - x_p).unsqueeze(-1) * v.unsqueeze(-2)
                diff.addcmul_(x_p.unsqueeze(-1), (v - v_p).unsqueeze(-2)).mul_(self.K)
                stats.append((torch.linalg.vector_norm(diff.flatten(-2), dim=-1) * self.m.squeeze(-1)).max())
            return torch.stack(stats)

    def marginal_excess(self, a_m, b_m, scalings):
        """:func:`_marginal_excess` from the scalings: row sums ``u (K v) m om``, column sums ``v (K^T u) m om``."""
        u, v, om = map(_tensor, scalings)
        with torch.no_grad():
            rows = u * _matvec(self.K, v) * om / a_m  # (row sum / m) / (a / m)
            cols = v * _matvec(self.KT, u) * om / b_m
            return float(torch.maximum(rows.max(), cols.max()).clamp(min=1.0)) - 1.0

    def numpy_arrays(self):
        """Numpy views of ``(K, K^T, cap_u, cap_v, m)`` and a buffer of K's shape, for :func:`_block_numpy`."""
        if self._numpy is None:
            self._numpy = tuple(t.numpy() for t in (self.K, self.KT, self.cap_u, self.cap_v, self.m)) + (
                np.empty(self.K.shape, self.K.numpy().dtype),)
        return self._numpy


# Outside autograd, whole-matrix work on CPU tensors up to this size (exp, transposed copy, reductions) runs in
# numpy, on one thread, on the tensors' memory: torch parallelises exp from 2048 entries and reductions from 32768,
# and on a busy machine a parallel region of a few microseconds' work can wait milliseconds for its second thread
# (or leave it spinning against the main one). The blocks of iterations run in numpy at any size (_block_numpy).
_HOST_MAX = 1 << 22


def _host(t):
    """The numpy view of ``t`` if it is a CPU float32/float64 tensor outside autograd of at most _HOST_MAX
    entries, else None."""
    if (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad
            and t.numel() <= _HOST_MAX):
        return t.numpy()
    return None


def _numpy(t):
    return t if isinstance(t, np.ndarray) else t.numpy()


def _tensor(t):
    return torch.from_numpy(t) if isinstance(t, np.ndarray) else t


def _exp_(t):
    """``t.exp_()`` for a tensor outside autograd (in numpy if :func:`_host` allows)."""
    host = _host(t)
    if host is None:
        return t.exp_()
    np.exp(host, out=host)
    return t


def _exp(t):
    """``t.exp()`` (in numpy if :func:`_host` allows: on CPU torch's exp and log go through MKL, which opens a
    parallel region even for a few entries)."""
    host = _host(t)
    return t.exp() if host is None else torch.from_numpy(np.exp(host, out=np.empty(host.shape, host.dtype)))


def _log(t):
    """``t.log()`` (in numpy if :func:`_host` allows, as :func:`_exp`)."""
    host = _host(t)
    return t.log() if host is None else torch.from_numpy(np.log(host, out=np.empty(host.shape, host.dtype)))


def _read_stats(stats):
    """``(drift, err)`` from a block's statistics (one synchronisation): the largest |log| of a scaling (inf or NaN
    if one is not finite) and POT's stopping error (None if not checked)."""
    values = stats.tolist() if isinstance(stats, torch.Tensor) else stats
    low, high = values[0], values[1]
    if low != low or high != high:
        return float("nan"), None
    drift = max(_abs_log(low), _abs_log(high))
    return drift, (values[2] if len(values) > 2 else None)


def _abs_log(value):
    return float("inf") if value <= 0.0 or value == float("inf") else abs(math.log(value))


# Each iteration, in the kernel's scalings (u, v, om) with x = u om and y = K^T x:
#     x = min((a / m) / (K v), cap_u om),   v = min((b / m) / y, cap_v),   om = om / (y . v),   u = x / om_old
# which is f = min(log a - LSE_j(L + g + c), 0), g = min(log b - LSE_i(L + f + c), 0), c = log m - LSE(L + f + g).


def _block_numpy(kernel, a_m, b_m, scalings, n, checked):
    """``n`` iterations without autograd on CPU (float32/float64), on numpy views of the tensors' memory: on vectors
    of a few hundred entries numpy's cost per operation is about half of torch's, and its batched matrix-vector
    product several times faster than torch's ``bmm`` with vectors. Two matrix-vector products and five vector
    operations per iteration (``cap = cap_u om`` is divided in place by ``y . v``; ``om`` and ``u`` are formed for
    the last two iterations only). A single problem runs on 1-D arrays with ``ndarray.dot`` (a quarter less per
    iteration than the batched gufuncs). Takes and returns the scalings as numpy arrays, before and after the last
    iteration, and the statistics of :meth:`_Kernel.stats` as floats (nothing to synchronise on CPU)."""
    K, KT, cap_u, cap_v, m, diff = kernel.numpy_arrays()
    u, v, om = scalings
    single = K.shape[0] == 1
    if single:
        K, KT, cap_u, cap_v, a_m, b_m, u, v, om = (t[0] for t in (K, KT, cap_u, cap_v, a_m, b_m, u, v, om))
        matvec = vecdot = np.ndarray.dot  # the method: np.dot adds a Python-level dispatch
    else:
        matvec, vecdot = _np_matvec, (lambda x, y: _np_vecdot(x, y)[:, None])
    with np.errstate(all="ignore"):  # inf and NaN are caught by the drift test, as on the torch path
        cap = cap_u * om
        dots = []
        u_p, v_p, om_p = u, v, om
        for it in range(n):
            if it == n - 1:
                u_p, v_p, om_p = u, v, om
            elif it == n - 2 and it > 0:
                om = om / np.prod(dots, axis=0)
            x = np.minimum(a_m / matvec(K, v), cap)
            y = matvec(KT, x)
            v = np.minimum(b_m / y, cap_v)
            dot = vecdot(y, v)
            cap /= dot
            dots.append(dot)
            if it >= n - 2:
                u = x / om
                om = om / dot
        before, after = (u_p, v_p, om_p), (u, v, om)
        if single:
            before, after = tuple(t[None] for t in before), tuple(t[None] for t in after)
        return before, after, _stats_numpy(kernel.numpy_arrays()[0], m, diff, *before, *after, checked)


def _stats_numpy(K, m, diff, u_p, v_p, om_p, u, v, om, checked):
    """:meth:`_Kernel.stats` on numpy arrays, as floats. The plan's change is formed in the buffer ``diff`` as one
    rank-2 product per problem, ``[x - x', x'] @ [v; v - v']``, then scaled by ``K``."""
    scalings = np.concatenate((u.ravel(), v.ravel(), (om * m).ravel()))
    stats = [float(scalings.min()), float(scalings.max())]
    if checked:
        x, x_p = u * om, u_p * om_p
        left = np.empty(x.shape + (2,), x.dtype)
        left[..., 0], left[..., 1] = x - x_p, x_p
        right = np.empty(v.shape[:-1] + (2,) + v.shape[-1:], v.dtype)
        right[..., 0, :], right[..., 1, :] = v, v - v_p
        np.matmul(left, right, out=diff)
        np.multiply(diff, K, out=diff)
        # einsum, not a BLAS dot: OpenBLAS threads a long dot, and waking its threads costs more than the sum
        stats.append(float((np.sqrt(np.einsum("bij,bij->b", diff, diff)) * m[:, 0]).max()))
    return stats


if hasattr(np, "matvec"):  # numpy >= 2.2
    _np_matvec, _np_vecdot = np.matvec, np.vecdot
else:
    def _np_matvec(K, v):
        return np.matmul(K, v[..., None])[..., 0]

    def _np_vecdot(x, y):
        return np.einsum("...i,...i->...", x, y)


def _block(K, KT, cap_u, cap_v, a_m, b_m, u, v, om, n: int):
    """The same iterations out of place: differentiable, and compilable (``n`` is static)."""
    u_p, v_p, om_p = u, v, om
    for it in range(n):
        if it == n - 1:
            u_p, v_p, om_p = u, v, om
        x = torch.minimum(a_m / _matvec(K, v), cap_u * om)
        if it >= n - 2:
            u = x / om
        y = _matvec(KT, x)
        v = torch.minimum(b_m / y, cap_v)
        om = om / torch.linalg.vecdot(y, v).unsqueeze(-1)
    return u_p, v_p, om_p, u, v, om


def _matvec(K, v):
    """``K_i @ v_i`` for each problem i. On CPU one matrix-vector product each: torch's batched ``bmm`` with a vector
    is several times slower there than the products it batches."""
    if K.is_cuda:
        return (K @ v.unsqueeze(-1)).squeeze(-1)
    if K.shape[0] == 1:
        return torch.mv(K[0], v[0]).unsqueeze(0)
    return torch.stack([torch.mv(K_i, v_i) for K_i, v_i in zip(K.unbind(0), v.unbind(0))])


def _run_block(kernel, a_m, b_m, scalings, n, differentiable):
    block = _compiled_block() if n == _CHECK_EVERY and _use_compile(kernel.K, differentiable) else _block
    try:
        out = block(kernel.K, kernel.KT, kernel.cap_u, kernel.cap_v, a_m, b_m, *scalings, n)
    except Exception as error:  # noqa: BLE001 -- any failure to compile: fall back to eager, once
        if block is _block:
            raise
        _COMPILED["failed"] = f"{type(error).__name__}: {error}".splitlines()[0]
        warnings.warn(f"torch.compile of the partial-OT block failed ({_COMPILED['failed']}); running it eagerly",
                      RuntimeWarning, stacklevel=2)
        out = _block(kernel.K, kernel.KT, kernel.cap_u, kernel.cap_v, a_m, b_m, *scalings, n)
    return out[:3], out[3:]


# torch.compile of _block. "auto" compiles it on CUDA outside autograd (the convergence solve of grad_iters, eval),
# where the fused block saves ~10 kernel launches per iteration and a failure to compile surfaces at the call, into
# the eager fallback of _run_block. Not with autograd: the compiled backward is lowered at the first backward pass,
# out of the fallback's reach. Not on CPU: there the compiled block was slower than the numpy one (about as fast as
# torch's eager one in float64 and at B = 256), and compiling costs 10-50 s per shape.
# MED3DINSIGHT_OT_COMPILE=1 compiles everywhere (CPU and autograd included), 0 nowhere.
_COMPILED = {"fn": None, "failed": None}


def _use_compile(K, differentiable):
    setting = os.environ.get("MED3DINSIGHT_OT_COMPILE", "auto").strip().lower()
    if _COMPILED["failed"] is not None or setting in ("0", "false", "no", "off"):
        return False
    return (K.is_cuda and not differentiable) if setting == "auto" else True


def _compiled_block():
    if _COMPILED["fn"] is None:
        _COMPILED["fn"] = torch.compile(_block, dynamic=None)
    return _COMPILED["fn"]


def _log_block(L, log_a, log_b, log_m, f, g, c, n):
    """``n`` iterations exactly in the log domain (log-sum-exps over the matrix): the fallback of a block that
    drifted. Returns the potentials before and after the last iteration."""
    before = (f, g, c)
    for _ in range(n):
        before = (f, g, c)
        f = (log_a - torch.logsumexp(L + g.unsqueeze(-2), -1) - c.unsqueeze(-1)).clamp(max=0.0)
        g = (log_b - torch.logsumexp(L + f.unsqueeze(-1), -2) - c.unsqueeze(-1)).clamp(max=0.0)
        c = log_m - torch.logsumexp((L + f.unsqueeze(-1) + g.unsqueeze(-2)).flatten(-2), -1)
    return before, (f, g, c)


def _log_plan_change(L, before, after):
    with torch.no_grad():
        diff = _log_plan(L, *before).exp() - _log_plan(L, *after).exp()
        return torch.linalg.vector_norm(diff.flatten(-2), dim=-1)


def _marginal_excess(L, log_a, log_b, f, g, c):
    """Largest relative excess of a row sum over ``a`` or a column sum over ``b`` (0 if none), over the batch."""
    with torch.no_grad():
        log_plan = _log_plan(L, f, g, c)
        rows = (torch.logsumexp(log_plan, -1) - log_a).max()
        cols = (torch.logsumexp(log_plan, -2) - log_b).max()
        return float(torch.maximum(rows, cols).clamp(min=0.0).expm1())
