"""med3dinsight_plugin.stats: known answers for every method (scipy only as an oracle here; the package has none)."""
import ast
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from med3dinsight_plugin import stats
from med3dinsight_plugin.stats import (
    MIN_UNITS,
    Estimate,
    hierarchical_bootstrap,
    holm,
    paired_differences,
    sign_flip_p,
    t_cdf,
    t_interval,
    t_quantile,
)


def test_the_module_imports_only_numpy_and_the_standard_library():
    tree = ast.parse(Path(stats.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "math", "dataclasses", "typing", "numpy"}


@pytest.mark.parametrize("p, df, expected", [  # printed tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
    (0.975, 7, 2.364624), (0.975, 1, 12.706205), (0.95, 10, 1.812461), (0.995, 30, 2.749996),
    (0.975, 4, 2.776445), (0.99, 2, 6.964557), (0.9, 100, 1.290075)])
def test_t_quantile_textbook_values(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-6)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-6)


def test_t_quantile_and_cdf_against_scipy():
    scipy_t = pytest.importorskip("scipy.stats").t
    for df in (0.5, 1, 2, 3, 4, 7, 10, 29.5, 100, 1000):
        for p in (1e-12, 1e-5, 0.01, 0.025, 0.1, 0.3, 0.49, 0.6, 0.75, 0.76, 0.975, 0.995, 1 - 1e-7):
            assert t_quantile(p, df) == pytest.approx(scipy_t.ppf(p, df), rel=1e-11), (p, df)
            x = scipy_t.ppf(p, df)
            assert t_cdf(x, df) == pytest.approx(p, rel=1e-9), (p, df)
    # near the centre P(0 < T < t) ~ f(0) t: Gamma(2.5) / (sqrt(4 pi) Gamma(2)) = 0.375 for df = 4
    assert t_quantile(0.5 + 1e-7, 4) == pytest.approx(1e-7 / 0.375, rel=1e-6)
    assert t_quantile(0.5, 3) == 0.0 and t_quantile(1.0, 3) == math.inf and t_cdf(math.inf, 2) == 1.0
    with pytest.raises(ValueError):
        t_quantile(0.5, 0)


def test_t_interval_of_a_known_sample():
    est = t_interval([1, 2, 3, 4, 5], unit="pretraining runs")
    # mean 3, sd sqrt(2.5), se sqrt(0.5), t_{0.975,4} = 2.776445: 3 -+ 1.963243
    assert (est.mean, est.n, est.unit, est.valid) == (3.0, 5, "pretraining runs", True)
    assert est.low == pytest.approx(1.036757, abs=1e-6) and est.high == pytest.approx(4.963243, abs=1e-6)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert (est.low, est.high) == pytest.approx(scipy_stats.t.interval(0.95, 4, loc=3, scale=math.sqrt(0.5)))
    assert est.label == "95 % t interval, n = 5 pretraining runs"
    assert str(est) == "+3.0000 [1.0368, 4.9632] (95 % t interval, n = 5 pretraining runs)"
    assert est.excludes(0.0) is True and est.excludes(3.0) is False
    ninety = t_interval([1, 2, 3, 4, 5, None, math.nan], confidence=0.9)  # None and NaN are dropped
    assert ninety.n == 5 and ninety.high - ninety.low < est.high - est.low and ninety.unit == "units"


def test_too_few_units_get_no_interval_and_say_so():
    est = t_interval([0.1, 0.2, 0.4], unit="seeds")
    assert not est.valid and est.low is None and est.high is None and est.mean == pytest.approx(0.7 / 3)
    assert est.label == "n = 3 seeds: too few for a 95 % interval"
    assert est.bounds() == "too few for a 95 % interval (needs 5)" and est.excludes(0.0) is None
    assert str(est) == "+0.2333 (n = 3 seeds: too few for a 95 % interval)"
    assert t_interval([0.5], unit="seeds").label == "n = 1 seed: too few for a 95 % interval"
    assert math.isnan(t_interval([]).mean) and not t_interval([]).valid
    assert t_interval([1, 2, 3], min_n=3).valid  # the threshold is a parameter (at least 2)
    with pytest.raises(ValueError):
        t_interval([1, 2], min_n=1)
    assert MIN_UNITS == 5 and t_interval([1, 2, 3, 4]).valid is False and t_interval([1, 2, 3, 4, 5]).valid
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.low = 0.0


def test_paired_differences_pair_by_key():
    a = {("s0", "c1"): 0.7, ("s0", "c2"): 0.5, ("s1", "c1"): math.nan, ("s1", "c2"): 0.9}
    b = {("s0", "c2"): 0.4, ("s0", "c1"): 0.6, ("s1", "c1"): 0.3, ("s1", "c2"): None}
    assert paired_differences(a, b) == pytest.approx({("s0", "c1"): 0.1, ("s0", "c2"): 0.1})
    assert list(paired_differences(a, b)) == [("s0", "c1"), ("s0", "c2")]  # a's order


def test_sign_flip_p_by_hand():
    assert sign_flip_p([0.1, 0.2, 0.05, 0.3, 0.01]) == 2 / 32  # all 5 positive: only all-plus and all-minus tie
    assert sign_flip_p([3, 2, 1]) == 2 / 8  # the smallest p at n = 3: never below 0.05
    # [3, -1, 2]: |sum| = 4; the 8 patterns give |sums| 6, 2, 4, 0 twice each: 4 of 8 reach 4
    assert sign_flip_p([3, -1, 2]) == 4 / 8
    assert sign_flip_p([0.1, 0.2, 0.3]) == sign_flip_p([-0.1, -0.2, -0.3])  # two-sided
    assert sign_flip_p([0.0, 0.0]) == 1.0 and sign_flip_p([1, -1]) == 1.0 and math.isnan(sign_flip_p([]))
    assert sign_flip_p([0.1 + 0.2, -0.3]) == 1.0  # a rounding-level difference is a tie, not a smaller sum


def test_sign_flip_p_monte_carlo_beyond_the_exact_limit():
    d = np.random.default_rng(5).normal(0.3, 1.0, size=17)
    exact = sign_flip_p(d, exact_max=17)  # 131072 patterns
    mc = sign_flip_p(d, seed=1)  # 17 > 16: 100000 random patterns
    assert mc == sign_flip_p(d, seed=1) and mc != sign_flip_p(d, seed=2)
    assert mc == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 100000))
    assert sign_flip_p(np.ones(40), n_resamples=999) == pytest.approx(1 / 1000)  # (1 + 0 hits) / (1 + 999)


def test_sign_flip_p_is_calibrated_under_the_null():
    rng = np.random.default_rng(0)
    p = np.array([sign_flip_p(rng.normal(0, 1, size=8)) for _ in range(2000)])
    assert 0.035 < (p <= 0.05).mean() <= 0.06  # exact at 5 %: 6/256 + ... patterns; never liberal


def test_holm_textbook_example():
    # Holm (1979) step-down, 4 tests at alpha 0.05: sorted 0.005 0.01 0.03 0.04 -> 0.02 0.03 0.06 0.06
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [a <= 0.05 for a in adjusted] == [True, False, False, True]
    # sorted 0.3 0.5 0.9 -> 3 x 0.3, 2 x 0.5 = 1.0, then 0.9 raised to 1.0 (monotone), capped at 1
    assert holm([0.5, 0.3, 0.9]) == pytest.approx([1.0, 0.9, 1.0])
    out = holm([0.01, None, math.nan, 0.02])  # missing p-values stay NaN and do not count in m
    assert out[0] == pytest.approx(0.02) and out[3] == pytest.approx(0.02) and all(map(math.isnan, out[1:3]))
    assert holm([]) == []
    with pytest.raises(ValueError):
        holm([1.5])


def _simulate(S, C, crossed, shared, n=120, mu=0.05, sd_seed=0.03, sd_case=0.08, sd_noise=0.05, expand=True):
    """Coverage of the known mean and the mean width relative to 2 x 1.96 x the true standard error."""
    rng = np.random.default_rng(123)
    hits, widths = 0, []
    for i in range(n):
        seed_effect = rng.normal(0, sd_seed, (S, 1))
        if crossed:  # the same cases in every seed: a case's effect is shared
            d = mu + seed_effect + rng.normal(0, sd_case, (1, C)) + rng.normal(0, sd_noise, (S, C))
        else:
            d = mu + seed_effect + rng.normal(0, sd_case, (S, C))
        est = hierarchical_bootstrap(d, n_boot=600, seed=i, shared_inner=shared, expand=expand)
        hits += est.low <= mu <= est.high
        widths.append(est.high - est.low)
    se = math.sqrt(sd_seed ** 2 / S + sd_case ** 2 / C + sd_noise ** 2 / (S * C)) if crossed else \
        math.sqrt(sd_seed ** 2 / S + sd_case ** 2 / (S * C))
    return hits / n, float(np.mean(widths)) / (2 * 1.96 * se)


def test_hierarchical_bootstrap_covers_a_known_mean():
    # 8 seeds x 15 cases; width relative to 2 x 1.96 x the true standard error. The expansion for 8 seeds widens the
    # interval by about t_{0.975,7} sqrt(8/7) / 1.96 = 1.29
    coverage, width = _simulate(8, 15, crossed=False, shared=False)
    assert coverage >= 0.92 and 0.9 < width < 1.6
    coverage, width = _simulate(8, 15, crossed=True, shared=True)
    assert coverage >= 0.92 and 0.9 < width < 1.6
    plain_coverage, plain_width = _simulate(8, 15, crossed=True, shared=True, expand=False)
    assert plain_coverage < coverage and plain_width == pytest.approx(width / 1.29, rel=0.1)
    # resampling the cases independently per seed when they are shared counts one case's effect 8 times: too narrow
    coverage, width = _simulate(8, 15, crossed=True, shared=False)
    assert coverage < 0.88 and width < 0.8


def test_hierarchical_bootstrap_width_shrinks_with_units():
    rng = np.random.default_rng(2)
    small = hierarchical_bootstrap(rng.normal(0.05, 0.1, (6, 10)) + rng.normal(0, 0.05, (6, 1)), seed=1)
    large = hierarchical_bootstrap(rng.normal(0.05, 0.1, (24, 40)) + rng.normal(0, 0.05, (24, 1)), seed=1)
    ratio = (small.high - small.low) / (large.high - large.low)
    assert 1.4 < ratio < 3.0  # 4x the seeds and 4x the cases per seed: about half the width


def test_hierarchical_bootstrap_details():
    d = np.random.default_rng(3).normal(0.1, 0.1, (6, 12))
    est = hierarchical_bootstrap(d, seed=7)
    assert est == hierarchical_bootstrap(d, seed=7) and est != hierarchical_bootstrap(d, seed=8)
    assert est.mean == pytest.approx(d.mean()) and est.low < est.mean < est.high
    assert (est.n, est.unit, est.inner_n, est.inner_unit) == (6, "seeds", 12, "cases")
    assert est.label == ("95 % expanded hierarchical bootstrap (seeds, then cases within each), "
                         "n = 6 seeds x 12 cases")
    # ragged groups (nested): the mean is the mean of the seeds' means (3, 2, 3, 4, 5), not of the 28 values
    ragged = hierarchical_bootstrap([[1.0, 2.0, 3.0, 4.0, 5.0], [2.0] * 6, [3.0] * 5, [4.0] * 7, [5.0] * 5])
    assert ragged.mean == pytest.approx(3.4) and ragged.inner_n == 5 and ragged.valid
    # missing cells of a shared table are left out; a case missing everywhere is no case
    table = d.copy()
    table[0, 0], table[:, 11] = np.nan, np.nan
    shared = hierarchical_bootstrap(table, shared_inner=True)
    assert shared.inner_n == 11 and shared.valid and shared.mean == pytest.approx(
        np.mean([np.nanmean(row) for row in table]))
    assert shared.method == "expanded bootstrap over seeds and shared cases"
    plain = hierarchical_bootstrap(table, shared_inner=True, expand=False)
    assert plain.method == "bootstrap over seeds and shared cases" and plain.high - plain.low < shared.high - shared.low


def test_hierarchical_bootstrap_too_few_at_either_level():
    rng = np.random.default_rng(4)
    seeds = hierarchical_bootstrap(rng.normal(size=(3, 20)), shared_inner=True)
    assert not seeds.valid and seeds.low is None and seeds.high is None
    assert seeds.label == "n = 3 seeds x 20 cases: too few seeds for a 95 % interval"
    cases = hierarchical_bootstrap(rng.normal(size=(8, 3)))
    assert cases.label == "n = 8 seeds x 3 cases: too few cases for a 95 % interval" and cases.excludes() is None
    one = hierarchical_bootstrap([[0.1, 0.2]], unit="seeds", inner_unit="cases")
    assert one.label == "n = 1 seed x 2 cases: too few seeds for a 95 % interval"
    empty = hierarchical_bootstrap([])
    assert empty.n == 0 and math.isnan(empty.mean) and not empty.valid
    assert isinstance(empty, Estimate)
