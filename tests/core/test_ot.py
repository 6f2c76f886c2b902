"""The torch partial-OT solver against POT (the reference implementation), its constraints and its gradients."""
import numpy as np
import ot
import pytest
import torch

import med3dinsight_plugin.ot as torch_ot
from med3dinsight_plugin.errors import Med3DInsightError
from med3dinsight_plugin.ot import NonFiniteCostError, entropic_partial_wasserstein, log_entropic_partial_wasserstein


def _problem(rng, n, k):
    a = rng.random(n) + 0.05
    b = rng.random(k) + 0.05
    return a / a.sum(), b / b.sum(), rng.random((n, k))


@pytest.mark.parametrize("n,k,reg,m", [(5, 7, 0.1, 0.5), (16, 16, 0.03, 0.95), (40, 24, 0.05, 0.6),
                                       (32, 32, 0.5, 0.99), (12, 20, 0.03, None)])
def test_plan_equals_pot(n, k, reg, m):
    rng = np.random.default_rng(n * 100 + k)
    a, b, M = _problem(rng, n, k)
    expected = ot.partial.entropic_partial_wasserstein(a, b, M, reg, m)
    got = entropic_partial_wasserstein(torch.tensor(a), torch.tensor(b), torch.tensor(M), reg, m)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-14)


def test_uniform_marginals_from_empty_weights_and_log_dict_like_pot():
    rng = np.random.default_rng(3)
    M = rng.random((9, 6))
    expected, expected_log = ot.partial.entropic_partial_wasserstein([], [], M, 0.1, 0.4, log=True, stopThr=1e-12)
    got, log = entropic_partial_wasserstein(torch.tensor([]), torch.tensor([]), torch.tensor(M), 0.1, 0.4, log=True,
                                            stopThr=1e-12)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-14)
    assert len(log["err"]) == len(expected_log["err"])  # same stopping iteration
    np.testing.assert_allclose(log["err"], expected_log["err"], rtol=1e-6, atol=1e-15)
    assert float(log["partial_w_dist"]) == pytest.approx(float(expected_log["partial_w_dist"]), rel=1e-9)


# Dykstra converges slowly at tiny reg: the marginal constraints hold to what the iterations reach.
@pytest.mark.parametrize("reg,iters,tol", [(1e-3, 10000, 1e-4), (0.01, 3000, 1e-9), (0.03, 3000, 1e-9)])
def test_partial_transport_constraints_and_finite_at_small_reg(reg, iters, tol):
    torch.manual_seed(0)
    n = 48
    M = torch.rand(n, n, dtype=torch.float64)
    M = M / M.max()
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    log_plan = log_entropic_partial_wasserstein(a, a, M, reg, 0.95, numItermax=iters, stopThr=1e-12)
    plan = log_plan.exp()
    assert torch.isfinite(plan).all() and torch.isfinite(log_plan).all()
    assert (plan >= 0).all()
    assert float(plan.sum()) == pytest.approx(0.95, abs=1e-9)
    assert (plan.sum(1) <= a * (1 + tol)).all() and (plan.sum(0) <= a * (1 + tol)).all()


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_dominated_cost_does_not_stop_before_the_plan_moves(dtype, rtol):
    # One cheap entry holds nearly all the kernel's mass: the row projection scales it down to a_0 = 1/3, the
    # total-mass projection scales it straight back up to m, and the plan does not move at iteration 0 (its change is
    # ~1e-14) while the Dykstra corrections build up. A test on the plan's change alone stops there with the initial
    # plan (loss -mean log P_ii = 21.6 instead of 1.61). The solver must not stop before the marginals hold, so with
    # the loss's threshold it runs all 300 iterations here, as POT does with its default threshold.
    M = np.ones((3, 3))
    M[0, 0] = 0.0
    a = np.full(3, 1 / 3)
    expected = ot.partial.entropic_partial_wasserstein(a, a, M, 0.03, 0.95, numItermax=300)
    t = lambda x: torch.tensor(x, dtype=dtype)
    got, log = entropic_partial_wasserstein(t(a), t(a), t(M), 0.03, 0.95, numItermax=300, stopThr=1e-7, log=True)
    assert log["n_iter"] == 300
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=rtol, atol=1e-12)
    loss = -got.diagonal().log().mean()
    assert float(loss) == pytest.approx(-np.log(np.diag(expected)).mean(), rel=rtol)


def test_small_reg_equals_pot_log_domain_solver_including_redone_blocks(monkeypatch):
    # At reg 1e-4 some blocks of iterations drift too far from their kernel and are redone in the log domain
    # (_log_block); the plan must still equal POT's log-domain solver after the same iterations.
    redone = []
    log_block = torch_ot._log_block
    monkeypatch.setattr(torch_ot, "_log_block", lambda *args: redone.append(1) or log_block(*args))
    rng = np.random.default_rng(0)
    n = 24
    M, a = rng.random((n, n)), np.full(n, 1 / n)
    expected = ot.partial.entropic_partial_wasserstein_logscale(a, a, M, 1e-4, 0.95, numItermax=300)
    got = entropic_partial_wasserstein(torch.tensor(a), torch.tensor(a), torch.tensor(M), 1e-4, 0.95, numItermax=300)
    assert redone
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-13)


def test_float32_small_reg_no_nan_where_pot_classic_fails():
    torch.manual_seed(1)
    M = torch.rand(64, 64)
    a = torch.full((64,), 1 / 64)
    with np.errstate(all="ignore"):
        pot = ot.partial.entropic_partial_wasserstein(a.double().numpy(), a.double().numpy(), M.double().numpy(),
                                                      1e-3, 0.95, numItermax=50)
    assert not np.isfinite(pot).all() or pot.sum() < 0.9  # the multiplicative kernel underflows
    log_plan = log_entropic_partial_wasserstein(a, a, M, 1e-3, 0.95)
    assert torch.isfinite(log_plan).all()
    assert float(log_plan.exp().sum()) == pytest.approx(0.95, rel=1e-4)


def test_batched_equals_one_by_one():
    torch.manual_seed(2)
    M = torch.rand(3, 10, 8, dtype=torch.float64)
    a, b = torch.full((10,), 0.1, dtype=torch.float64), torch.full((8,), 0.125, dtype=torch.float64)
    m = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    batched = entropic_partial_wasserstein(a, b, M, 0.05, m, numItermax=200)
    for i in range(3):
        single = entropic_partial_wasserstein(a, b, M[i], 0.05, float(m[i]), numItermax=200)
        torch.testing.assert_close(batched[i], single, rtol=1e-10, atol=1e-14)


def test_batched_differentiable_path_equals_one_by_one():
    torch.manual_seed(5)
    M = torch.rand(2, 3, 12, 9, dtype=torch.float64, requires_grad=True)
    a, b = torch.full((12,), 1 / 12, dtype=torch.float64), torch.full((9,), 1 / 9, dtype=torch.float64)
    batched = log_entropic_partial_wasserstein(a, b, M, 0.05, 0.7, stopThr=1e-12)
    (grad,) = torch.autograd.grad(batched.diagonal(dim1=-2, dim2=-1).sum(), M)
    for i, j in np.ndindex(2, 3):
        M_ij = M[i, j].detach().requires_grad_()
        single = log_entropic_partial_wasserstein(a, b, M_ij, 0.05, 0.7, stopThr=1e-12)
        (grad_ij,) = torch.autograd.grad(single.diagonal().sum(), M_ij)
        torch.testing.assert_close(batched[i, j], single, rtol=1e-10, atol=1e-12)
        # the batch stops when its last problem converges, so the gradients went through more iterations
        torch.testing.assert_close(grad[i, j], grad_ij, rtol=1e-6, atol=1e-9)


def test_numpy_block_without_matvec_gufuncs_and_torch_block_give_the_same_plan(monkeypatch):
    # Without autograd on CPU the blocks run in numpy (np.matvec/np.vecdot from numpy 2.2, matmul/einsum before);
    # with autograd, in torch. All three give the same iterates.
    torch.manual_seed(7)
    M = torch.rand(2, 20, 16, dtype=torch.float64)
    a, b = torch.full((20,), 1 / 20, dtype=torch.float64), torch.full((16,), 1 / 16, dtype=torch.float64)
    solve = lambda M: log_entropic_partial_wasserstein(a, b, M, 0.03, 0.8, numItermax=150)
    numpy_plan = solve(M)
    torch_plan = solve(M.clone().requires_grad_()).detach()
    monkeypatch.setattr(torch_ot, "_np_matvec", lambda K, v: np.matmul(K, v[..., None])[..., 0])
    monkeypatch.setattr(torch_ot, "_np_vecdot", lambda x, y: np.einsum("...i,...i->...", x, y))
    old_numpy_plan = solve(M)
    torch.testing.assert_close(torch_plan, numpy_plan, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(old_numpy_plan, numpy_plan, rtol=1e-10, atol=1e-10)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def failing_compile():
        def block(*args):
            raise RuntimeError("no C++ compiler")
        return block

    torch.manual_seed(6)
    M = torch.rand(8, 8, dtype=torch.float64, requires_grad=True)  # both runs on the torch block (no numpy path)
    a = torch.full((8,), 1 / 8, dtype=torch.float64)
    monkeypatch.setenv("MED3DINSIGHT_OT_COMPILE", "0")
    eager = log_entropic_partial_wasserstein(a, a, M, 0.1, 0.9, numItermax=50)
    monkeypatch.setenv("MED3DINSIGHT_OT_COMPILE", "1")
    monkeypatch.setattr(torch_ot, "_compiled_block", failing_compile)
    monkeypatch.setitem(torch_ot._COMPILED, "failed", None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        fallback = log_entropic_partial_wasserstein(a, a, M, 0.1, 0.9, numItermax=50)
    torch.testing.assert_close(fallback, eager, rtol=0, atol=0)
    assert torch_ot._COMPILED["failed"] is not None  # later calls do not try again


def test_gradient_matches_finite_differences():
    torch.manual_seed(3)
    M = torch.rand(5, 5, dtype=torch.float64, requires_grad=True)
    a = torch.full((5,), 0.2, dtype=torch.float64)
    loss = lambda M: -log_entropic_partial_wasserstein(a, a, M, 0.1, 0.8, numItermax=60).diagonal().mean()
    assert torch.autograd.gradcheck(loss, (M,), eps=1e-6, atol=1e-5)


def test_truncated_backprop_keeps_value_and_approximates_gradient():
    torch.manual_seed(4)
    M = torch.rand(16, 16, dtype=torch.float64, requires_grad=True)
    a = torch.full((16,), 1 / 16, dtype=torch.float64)
    full = log_entropic_partial_wasserstein(a, a, M, 0.05, 0.9, numItermax=2000, stopThr=1e-14)
    (g_full,) = torch.autograd.grad(-full.diagonal().mean(), M)
    short = log_entropic_partial_wasserstein(a, a, M, 0.05, 0.9, numItermax=2000, stopThr=1e-14, grad_iters=50)
    (g_short,) = torch.autograd.grad(-short.diagonal().mean(), M)
    torch.testing.assert_close(short, full, rtol=1e-8, atol=1e-8)
    assert torch.nn.functional.cosine_similarity(g_full.flatten(), g_short.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("kwargs,match", [
    (dict(m=1.5), "m should lower or equal"),
    (dict(m=-0.1), "greater than 0"),
    (dict(reg=0.0), "reg must be a positive"),
])
def test_infeasible_arguments_raise(kwargs, match):
    a = torch.full((4,), 0.25)
    args = dict(reg=0.1, m=0.5) | kwargs
    with pytest.raises(Med3DInsightError, match=match):
        entropic_partial_wasserstein(a, a, torch.rand(4, 4), args["reg"], args["m"])


def test_shape_mismatch_and_zero_weights_raise():
    with pytest.raises(Med3DInsightError, match=r"a must have shape \(\.\.\., 4\)"):
        entropic_partial_wasserstein(torch.full((3,), 1 / 3), torch.full((4,), 0.25), torch.rand(4, 4), 0.1, 0.5)
    with pytest.raises(Med3DInsightError, match="strictly positive"):
        entropic_partial_wasserstein(torch.tensor([0.5, 0.5, 0.0]), torch.full((3,), 1 / 3), torch.rand(3, 3), 0.1,
                                     0.5)
    with pytest.raises(NonFiniteCostError, match="contains NaN or Inf"):
        entropic_partial_wasserstein(torch.ones(2) / 2, torch.ones(2) / 2, torch.tensor([[0.0, 1], [float("nan"), 0]]),
                                     0.1, 0.5)
    with pytest.raises(Med3DInsightError, match="M must be a tensor of shape"):
        entropic_partial_wasserstein(torch.ones(3), torch.ones(3), torch.rand(3), 0.1, 0.5)
    with pytest.raises(Med3DInsightError, match="numItermax and grad_iters must be >= 0"):
        entropic_partial_wasserstein(torch.ones(3) / 3, torch.ones(3) / 3, torch.rand(3, 3), 0.1, 0.5, numItermax=-1)
