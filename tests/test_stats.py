"""Tests for jaxbandit.stats against independent references.

References: closed forms, scipy.stats, numpy.polyfit and statsmodels OLS;
the module under test is never its own reference. Tolerances: 1e-10 for
direct float64 arithmetic, 1e-8 for least squares against a different
solver; Monte Carlo checks state their error rates next to the assertion.
"""

import ast
import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest
import statsmodels.api as sm
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats
from statsmodels.stats.weightstats import DescrStatsW

from jaxbandit import stats

# --------------------------------------------------------------------------
# Synthetic seed batches of known growth. Rounds are t = 1..T.
# --------------------------------------------------------------------------


def _rounds(n_rounds):
  return np.arange(1, n_rounds + 1, dtype=np.float64)


def bounded_batch(rng, n_seeds, n_rounds, amplitude=10.0, tau=100.0, noise=0.2):
  """a_s (1 - exp(-t / tau_s)) + iid noise; per-seed amplitude and tau."""
  t = _rounds(n_rounds)
  amplitudes = amplitude * np.exp(0.2 * rng.standard_normal((n_seeds, 1)))
  taus = tau * np.exp(0.3 * rng.standard_normal((n_seeds, 1)))
  return amplitudes * (1.0 - np.exp(-t / taus)) + noise * rng.standard_normal((n_seeds, n_rounds))


def log_batch(rng, n_seeds, n_rounds, rate=2.0, noise=0.5, offset=3.0):
  """offset_s + b_s log t + iid noise, with E[b_s] = rate."""
  t = _rounds(n_rounds)
  rates = rate * (1.0 + 0.25 * rng.standard_normal((n_seeds, 1)))
  offsets = offset + rng.standard_normal((n_seeds, 1))
  return offsets + rates * np.log(t) + noise * rng.standard_normal((n_seeds, n_rounds))


def sqrt_batch(rng, n_seeds, n_rounds, rate=0.5, noise=0.5, offset=3.0):
  """offset_s + c_s sqrt t + iid noise, with E[c_s] = rate."""
  t = _rounds(n_rounds)
  rates = rate * (1.0 + 0.25 * rng.standard_normal((n_seeds, 1)))
  offsets = offset + rng.standard_normal((n_seeds, 1))
  return offsets + rates * np.sqrt(t) + noise * rng.standard_normal((n_seeds, n_rounds))


def monotone_batch(rng, n_seeds, n_rounds, kind, scale=1.0, burn_in=0.0, tau=300.0):
  """Cumulative sums of non-negative per-round regret, as a simulator makes.

  Per-round mean: scale/tau exp(-t/tau) (bounded), scale/t (log) or
  scale/(2 sqrt t) (sqrt), plus an optional burn-in burn_in/50 exp(-t/50);
  a per-seed lognormal rate and per-round lognormal noise (mean 1).
  """
  t = _rounds(n_rounds)
  mean = {
    "bounded": scale / tau * np.exp(-t / tau),
    "log": scale / t,
    "sqrt": scale / (2.0 * np.sqrt(t)),
  }[kind] + burn_in / 50.0 * np.exp(-t / 50.0)
  seed_rates = np.exp(0.3 * rng.standard_normal((n_seeds, 1)))
  round_noise = np.exp(0.7 * rng.standard_normal((n_seeds, n_rounds)) - 0.245)
  per_round = mean * seed_rates * round_noise
  return np.cumsum(per_round, axis=1), per_round


def late_window(n_rounds, start_fraction):
  """1-based rounds t with start_fraction * T <= t <= T (t >= 1)."""
  t = _rounds(n_rounds)
  return t[t >= max(1.0, start_fraction * n_rounds)]


# --------------------------------------------------------------------------
# Independence of the module.
# --------------------------------------------------------------------------


def test_module_imports_nothing_from_the_package():
  source = pathlib.Path(stats.__file__).read_text()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom):
      assert node.level == 0, "relative import in stats.py"
      assert not (node.module or "").startswith("jaxbandit")
    elif isinstance(node, ast.Import):
      for alias in node.names:
        assert not alias.name.startswith(("jaxbandit", "jax"))


# --------------------------------------------------------------------------
# mean_confidence_band
# --------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("n_seeds", [2, 3, 20, 101])
def test_band_matches_scipy_t_interval(level, n_seeds):
  rng = np.random.default_rng(n_seeds)
  curves = rng.gamma(2.0, 3.0, size=(n_seeds, 37)).cumsum(axis=1)
  band = stats.mean_confidence_band(curves, level=level)
  mean = curves.mean(axis=0)
  lower, upper = scipy_stats.t.interval(
    level, df=n_seeds - 1, loc=mean, scale=scipy_stats.sem(curves, axis=0)
  )
  np.testing.assert_allclose(band.mean, mean, rtol=1e-12)
  np.testing.assert_allclose(band.lower, lower, rtol=1e-10)
  np.testing.assert_allclose(band.upper, upper, rtol=1e-10)
  assert band.n_seeds == n_seeds and band.level == level
  assert band.mean.shape == band.lower.shape == band.upper.shape == (37,)


def test_band_matches_statsmodels_per_round():
  rng = np.random.default_rng(7)
  curves = rng.normal(5.0, 2.0, size=(12, 5))
  band = stats.mean_confidence_band(curves, level=0.9)
  for round_index in range(5):
    lower, upper = DescrStatsW(curves[:, round_index]).tconfint_mean(alpha=0.1)
    assert band.lower[round_index] == pytest.approx(lower, rel=1e-10)
    assert band.upper[round_index] == pytest.approx(upper, rel=1e-10)


def test_band_closed_form_two_seeds():
  # n = 2: sd = |x1 - x2| / sqrt 2, sem = |x1 - x2| / 2, t_{0.975,1} = 12.7062...
  band = stats.mean_confidence_band([[0.0, 1.0], [2.0, 1.0]], level=0.95)
  t_quantile = np.tan(np.pi * 0.475)  # Student t with 1 dof is Cauchy: exact quantile
  np.testing.assert_allclose(band.mean, [1.0, 1.0])
  np.testing.assert_allclose(band.lower, [1.0 - t_quantile, 1.0], rtol=1e-10)
  np.testing.assert_allclose(band.upper, [1.0 + t_quantile, 1.0], rtol=1e-10)


def test_band_single_seed_collapses_to_mean():
  curve = np.array([[0.5, 1.5, 2.0, 2.25]])
  band = stats.mean_confidence_band(curve)
  np.testing.assert_array_equal(band.mean, curve[0])
  np.testing.assert_array_equal(band.lower, curve[0])
  np.testing.assert_array_equal(band.upper, curve[0])


def test_band_is_immutable():
  band = stats.mean_confidence_band(np.ones((3, 4)))
  with pytest.raises(dataclasses.FrozenInstanceError):
    band.level = 0.5
  with pytest.raises(ValueError):
    band.mean[0] = 2.0


@settings(max_examples=30, deadline=None)
@given(
  n_seeds=st.integers(1, 6),
  n_rounds=st.integers(1, 6),
  level=st.floats(0.01, 0.99),
  data=st.data(),
)
def test_band_orders_lower_mean_upper(n_seeds, n_rounds, level, data):
  values = data.draw(
    st.lists(
      st.floats(-1e6, 1e6, allow_nan=False),
      min_size=n_seeds * n_rounds,
      max_size=n_seeds * n_rounds,
    )
  )
  curves = np.array(values).reshape(n_seeds, n_rounds)
  band = stats.mean_confidence_band(curves, level=level)
  slack = 1e-9 * (1.0 + np.abs(band.mean))
  assert np.all(band.lower <= band.mean + slack)
  assert np.all(band.mean <= band.upper + slack)
  # Symmetric about the mean.
  np.testing.assert_allclose(band.upper - band.mean, band.mean - band.lower, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# fit_log_growth / fit_sqrt_growth / compare_growth_fits
# --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["log", "sqrt"])
@pytest.mark.parametrize("start_fraction", [0.0, 0.3, 0.5])
def test_fit_point_estimates_match_polyfit_and_ols(model, start_fraction):
  rng = np.random.default_rng(11)
  n_rounds = 999
  cumulative = log_batch(rng, 15, n_rounds) if model == "log" else sqrt_batch(rng, 15, n_rounds)
  fit_function = stats.fit_log_growth if model == "log" else stats.fit_sqrt_growth
  fit = fit_function(cumulative, start_fraction=start_fraction, n_bootstrap=10)
  rounds = late_window(n_rounds, start_fraction)
  regressor = np.log(rounds) if model == "log" else np.sqrt(rounds)
  mean_curve = cumulative.mean(axis=0)[rounds.astype(int) - 1]
  slope, intercept = np.polyfit(regressor, mean_curve, 1)
  ols = sm.OLS(mean_curve, sm.add_constant(regressor)).fit()
  assert fit.model == model
  assert fit.first_round == int(rounds[0]) and fit.last_round == n_rounds
  assert fit.slope == pytest.approx(slope, rel=1e-8)
  assert fit.intercept == pytest.approx(intercept, rel=1e-8, abs=1e-8)
  assert fit.residual_sum_squares == pytest.approx(ols.ssr, rel=1e-7)
  assert fit.r_squared == pytest.approx(ols.rsquared, rel=1e-10)


@pytest.mark.parametrize(
  "n_rounds, start_fraction, first_round",
  [(1000, 0.5, 500), (1001, 0.5, 501), (7, 0.5, 4), (10, 0.0, 1), (1000, 0.2, 200), (3, 0.1, 1)],
)
def test_fit_window_rounds(n_rounds, start_fraction, first_round):
  cumulative = np.log(_rounds(n_rounds))[None, :] + np.zeros((2, 1))
  fit = stats.fit_log_growth(cumulative, start_fraction=start_fraction, n_bootstrap=2)
  assert (fit.first_round, fit.last_round) == (first_round, n_rounds)
  # Exact a + b log t data: exact fit, degenerate bootstrap.
  assert fit.slope == pytest.approx(1.0, rel=1e-10)
  assert fit.intercept == pytest.approx(0.0, abs=1e-10)
  assert fit.slope_lower == pytest.approx(1.0, rel=1e-10)
  assert fit.slope_upper == pytest.approx(1.0, rel=1e-10)


@pytest.mark.parametrize("model", ["log", "sqrt"])
def test_bootstrap_interval_matches_direct_resampling(model):
  rng = np.random.default_rng(3)
  n_seeds, n_rounds, n_bootstrap, seed, level = 9, 400, 200, 123, 0.9
  cumulative = log_batch(rng, n_seeds, n_rounds)
  fit_function = stats.fit_log_growth if model == "log" else stats.fit_sqrt_growth
  fit = fit_function(
    cumulative, start_fraction=0.5, n_bootstrap=n_bootstrap, level=level, seed=seed
  )
  # Documented protocol: resample seed indices, refit the mean curve.
  indices = np.random.default_rng(seed).integers(0, n_seeds, size=(n_bootstrap, n_seeds))
  rounds = late_window(n_rounds, 0.5)
  regressor = np.log(rounds) if model == "log" else np.sqrt(rounds)
  replicates = np.array(
    [
      np.polyfit(regressor, cumulative[row].mean(axis=0)[rounds.astype(int) - 1], 1)
      for row in indices
    ]
  )
  slope_bounds = np.percentile(replicates[:, 0], [5.0, 95.0])
  intercept_bounds = np.percentile(replicates[:, 1], [5.0, 95.0])
  np.testing.assert_allclose([fit.slope_lower, fit.slope_upper], slope_bounds, rtol=1e-8)
  np.testing.assert_allclose(
    [fit.intercept_lower, fit.intercept_upper], intercept_bounds, rtol=1e-8
  )
  assert fit.n_bootstrap == n_bootstrap and fit.seed == seed and fit.level == level


def test_bootstrap_is_deterministic_for_a_seed():
  cumulative = log_batch(np.random.default_rng(5), 30, 500)
  first = stats.fit_log_growth(cumulative, n_bootstrap=300, seed=42)
  second = stats.fit_log_growth(cumulative.copy(), n_bootstrap=300, seed=42)
  other = stats.fit_log_growth(cumulative, n_bootstrap=300, seed=43)
  assert first == second
  assert (first.slope_lower, first.slope_upper) != (other.slope_lower, other.slope_upper)
  assert first.slope == other.slope
  exponent = stats.growth_exponent(cumulative, n_bootstrap=300, seed=42)
  assert exponent == stats.growth_exponent(cumulative, n_bootstrap=300, seed=42)
  verdict = stats.classify_growth(cumulative, n_bootstrap=300, seed=42)
  assert verdict == stats.classify_growth(cumulative, n_bootstrap=300, seed=42)
  # The classifier shares its resamples with the stand-alone fits.
  assert verdict.log_fit == first
  assert verdict.exponent == exponent


def test_bootstrap_single_seed_interval_is_the_estimate():
  cumulative = log_batch(np.random.default_rng(1), 1, 300)
  fit = stats.fit_log_growth(cumulative, n_bootstrap=50)
  assert fit.slope_lower == pytest.approx(fit.slope, rel=1e-12)
  assert fit.slope_upper == pytest.approx(fit.slope, rel=1e-12)


@pytest.mark.parametrize("n_seeds, n_rounds", [(20, 1000), (50, 2000), (200, 5000)])
def test_true_log_rate_inside_bootstrap_interval(n_seeds, n_rounds):
  rng = np.random.default_rng(n_seeds + n_rounds)
  fit = stats.fit_log_growth(log_batch(rng, n_seeds, n_rounds, rate=2.0), seed=1)
  assert fit.slope_lower < 2.0 < fit.slope_upper
  assert fit.slope_lower < fit.slope < fit.slope_upper
  # The interval is informative: relative half-width below 25% (the seed
  # rates have a 25% spread, so the half-width is ~0.5 / sqrt(n_seeds)).
  assert (fit.slope_upper - fit.slope_lower) / 2.0 < 0.25 * 2.0


def test_true_sqrt_rate_inside_bootstrap_interval():
  rng = np.random.default_rng(8)
  fit = stats.fit_sqrt_growth(sqrt_batch(rng, 40, 3000, rate=0.5), seed=2)
  assert fit.slope_lower < 0.5 < fit.slope_upper
  assert fit.slope_upper - fit.slope_lower < 0.1


def test_log_rate_interval_coverage_over_replicate_batches():
  # 60 independent batches of 25 seeds; nominal coverage 95%, the seed
  # bootstrap percentile interval for a mean of 25 is typically ~92-94%.
  # P(< 50 of 60 | coverage 0.92) ~ 0.7%; a rounds-bootstrap or a wrong
  # standard error (coverage ~60-70%) fails this.
  rng = np.random.default_rng(2024)
  covered = 0
  for batch in range(60):
    cumulative = log_batch(rng, 25, 600, rate=1.5, noise=0.3)
    fit = stats.fit_log_growth(cumulative, n_bootstrap=400, seed=batch)
    covered += fit.slope_lower < 1.5 < fit.slope_upper
  assert covered >= 50


@pytest.mark.parametrize("kind", ["log", "sqrt"])
def test_compare_growth_fits_matches_polyfit(kind):
  rng = np.random.default_rng(4)
  n_rounds = 2000
  cumulative = log_batch(rng, 20, n_rounds) if kind == "log" else sqrt_batch(rng, 20, n_rounds)
  comparison = stats.compare_growth_fits(cumulative, start_fraction=0.25)
  rounds = late_window(n_rounds, 0.25)
  mean_curve = cumulative.mean(axis=0)[rounds.astype(int) - 1]
  rss = {}
  r_squared = {}
  for name, regressor in (("log", np.log(rounds)), ("sqrt", np.sqrt(rounds))):
    residuals = mean_curve - np.polyval(np.polyfit(regressor, mean_curve, 1), regressor)
    rss[name] = residuals @ residuals
    r_squared[name] = 1.0 - rss[name] / np.sum((mean_curve - mean_curve.mean()) ** 2)
  assert comparison.log_residual_sum_squares == pytest.approx(rss["log"], rel=1e-7)
  assert comparison.sqrt_residual_sum_squares == pytest.approx(rss["sqrt"], rel=1e-7)
  assert comparison.log_r_squared == pytest.approx(r_squared["log"], rel=1e-9)
  assert comparison.sqrt_r_squared == pytest.approx(r_squared["sqrt"], rel=1e-9)
  assert comparison.rss_ratio == pytest.approx(rss["sqrt"] / rss["log"], rel=1e-6)
  assert comparison.preferred == kind
  assert comparison.first_round == int(rounds[0])


def test_constant_curve_has_nan_r_squared():
  fit = stats.fit_log_growth(np.full((3, 50), 4.0), n_bootstrap=5)
  assert math.isnan(fit.r_squared)
  assert fit.slope == pytest.approx(0.0, abs=1e-12)
  assert fit.intercept == pytest.approx(4.0, rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(shift=st.floats(-100, 100), scale=st.floats(0.01, 100))
def test_fit_is_affine_equivariant(shift, scale):
  cumulative = log_batch(np.random.default_rng(0), 6, 120)
  base = stats.fit_log_growth(cumulative, n_bootstrap=40)
  moved = stats.fit_log_growth(scale * cumulative + shift, n_bootstrap=40)
  assert moved.slope == pytest.approx(scale * base.slope, rel=1e-8)
  assert moved.slope_upper == pytest.approx(scale * base.slope_upper, rel=1e-8)
  assert moved.intercept == pytest.approx(scale * base.intercept + shift, rel=1e-8, abs=1e-8)


# --------------------------------------------------------------------------
# growth_exponent
# --------------------------------------------------------------------------


def _ols_exponent(mean_curve, rounds):
  log_rounds = np.log(rounds)
  offset = log_rounds - 0.5 * (log_rounds[0] + log_rounds[-1])
  design = np.column_stack([np.ones_like(offset), offset, offset**2])
  params = sm.OLS(mean_curve, design).fit().params
  return 2.0 * params[2] / params[1], params[1]


def test_exponent_matches_statsmodels_ols():
  rng = np.random.default_rng(12)
  n_rounds = 1500
  cumulative = sqrt_batch(rng, 10, n_rounds)
  result = stats.growth_exponent(cumulative, start_fraction=0.4, n_bootstrap=5)
  rounds = late_window(n_rounds, 0.4)
  expected, growth_rate = _ols_exponent(cumulative.mean(axis=0)[rounds.astype(int) - 1], rounds)
  assert result.exponent == pytest.approx(expected, rel=1e-7)
  assert result.growth_rate == pytest.approx(growth_rate, rel=1e-8)
  assert result.at_round == pytest.approx(math.sqrt(rounds[0] * rounds[-1]), rel=1e-12)
  assert (result.first_round, result.last_round) == (600, n_rounds)


def test_exponent_interval_matches_direct_resampling():
  rng = np.random.default_rng(13)
  n_seeds, n_rounds, n_bootstrap, seed = 8, 800, 150, 9
  cumulative = log_batch(rng, n_seeds, n_rounds, noise=2.0)
  result = stats.growth_exponent(cumulative, n_bootstrap=n_bootstrap, seed=seed, level=0.8)
  indices = np.random.default_rng(seed).integers(0, n_seeds, size=(n_bootstrap, n_seeds))
  rounds = late_window(n_rounds, 0.5)
  replicates = []
  for row in indices:
    alpha, growth_rate = _ols_exponent(cumulative[row].mean(axis=0)[rounds.astype(int) - 1], rounds)
    replicates.append(alpha if growth_rate > 0 else -np.inf)
  expected = np.quantile(replicates, [0.1, 0.9], method="inverted_cdf")
  np.testing.assert_allclose([result.lower, result.upper], expected, rtol=1e-7)


@pytest.mark.parametrize("power", [0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_exponent_recovers_power_law(power, offset):
  curve = 3.0 * _rounds(4000) ** power + offset
  result = stats.growth_exponent(np.stack([curve, curve]), n_bootstrap=5)
  # The quadratic fit over one doubling of t is accurate to a few 1e-3.
  assert result.exponent == pytest.approx(power, abs=0.01)


@pytest.mark.parametrize("offset", [0.0, -7.0, 100.0])
def test_exponent_of_log_curve_is_zero(offset):
  curve = 2.5 * np.log(_rounds(3000)) + offset
  result = stats.growth_exponent(curve[None, :], n_bootstrap=5)
  assert result.exponent == pytest.approx(0.0, abs=1e-8)


def test_exponent_of_exponential_plateau_is_very_negative():
  # R = 1 - exp(-t/tau): dR/dlog t = (t/tau) exp(-t/tau), so
  # alpha = 1 - t/tau; at the window centre t ~ 707 with tau = 300: -1.36
  # (the quadratic fit is within 0.03 of it here).
  curve = 1.0 - np.exp(-_rounds(1000) / 300.0)
  result = stats.growth_exponent(curve[None, :], n_bootstrap=5)
  assert result.exponent == pytest.approx(1.0 - result.at_round / 300.0, abs=0.1)
  assert result.exponent < -1.0


def test_exponent_is_nan_without_growth():
  result = stats.growth_exponent(np.full((4, 100), 2.0), n_bootstrap=20)
  assert math.isnan(result.exponent)
  assert result.lower == -np.inf and result.upper == -np.inf


# --------------------------------------------------------------------------
# tail_mean_regret
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "n_rounds, fraction, n_tail",
  [(1000, 0.2, 200), (1001, 0.2, 201), (7, 0.2, 2), (10, 1.0, 10), (10, 0.01, 1)],
)
def test_tail_mean_matches_direct_computation(n_rounds, fraction, n_tail):
  rng = np.random.default_rng(n_rounds)
  per_round = rng.exponential(1.0, size=(6, n_rounds)) / _rounds(n_rounds)
  tail = stats.tail_mean_regret(per_round, fraction=fraction, level=0.9)
  per_seed = per_round[:, -n_tail:].mean(axis=1)
  lower, upper = scipy_stats.t.interval(
    0.9, df=5, loc=per_seed.mean(), scale=scipy_stats.sem(per_seed)
  )
  np.testing.assert_allclose(tail.per_seed, per_seed, rtol=1e-12)
  assert tail.mean == pytest.approx(per_seed.mean(), rel=1e-12)
  assert tail.lower == pytest.approx(lower, rel=1e-10)
  assert tail.upper == pytest.approx(upper, rel=1e-10)
  assert (tail.first_round, tail.last_round) == (n_rounds - n_tail + 1, n_rounds)


def test_tail_mean_single_seed_and_exact_zero():
  single = stats.tail_mean_regret(np.arange(10.0)[None, :], fraction=0.2)
  assert single.mean == single.lower == single.upper == pytest.approx(8.5)
  zero = stats.tail_mean_regret(np.zeros((5, 100)))
  assert zero.mean == zero.lower == zero.upper == 0.0


# --------------------------------------------------------------------------
# bad_round_counts
# --------------------------------------------------------------------------


def test_bad_round_counts_match_direct_count():
  rng = np.random.default_rng(21)
  per_round = rng.exponential(0.1, size=(17, 500))
  per_round[3, :10] = 0.05  # exactly eps0: counted (>=)
  eps0 = 0.05
  result = stats.bad_round_counts(per_round, eps0, level=0.95)
  expected = np.array([sum(1 for value in row if value >= eps0) for row in per_round])
  assert result.counts.dtype == np.int64
  np.testing.assert_array_equal(result.counts, expected)
  lower, upper = scipy_stats.t.interval(
    0.95, df=16, loc=expected.mean(), scale=scipy_stats.sem(expected.astype(float))
  )
  assert result.mean == pytest.approx(expected.mean(), rel=1e-12)
  assert result.lower == pytest.approx(lower, rel=1e-10)
  assert result.upper == pytest.approx(upper, rel=1e-10)
  assert result.eps0 == eps0 and result.n_rounds == 500


def test_bad_round_counts_edge_cases():
  per_round = np.array([[1.0, 0.5, 0.2], [0.0, 0.0, 0.0]])
  result = stats.bad_round_counts(per_round, 0.5)
  np.testing.assert_array_equal(result.counts, [2, 0])
  assert stats.bad_round_counts(per_round, 2.0).counts.tolist() == [0, 0]
  single = stats.bad_round_counts(per_round[:1], 0.1)
  assert single.mean == single.lower == single.upper == 3.0


# --------------------------------------------------------------------------
# classify_growth on synthetic batches of known growth.
# --------------------------------------------------------------------------

SIZES = [(20, 1000), (50, 2000), (200, 5000)]


@pytest.mark.parametrize("n_seeds, n_rounds", SIZES)
@pytest.mark.parametrize("batch_seed", [0, 1])
def test_classify_bounded_plateau(n_seeds, n_rounds, batch_seed):
  rng = np.random.default_rng([1, n_rounds, batch_seed])
  result = stats.classify_growth(bounded_batch(rng, n_seeds, n_rounds), seed=batch_seed)
  assert result.verdict == "bounded", result.reason
  assert result.conclusive
  assert result.criterion in ("negligible_growth", "decaying_faster_than_1_over_t")
  # Bounded needs an upper bound on growth, not only an interval with 0.
  assert result.growth_per_doubling_upper < 0.1 * result.final_mean


@pytest.mark.parametrize("n_seeds, n_rounds", SIZES)
def test_classify_bounded_still_levelling_off(n_seeds, n_rounds):
  # tau = T/4: the curve still rises in the late window (by ~12% of its
  # level), but its increments shrink exponentially.
  rng = np.random.default_rng([2, n_rounds])
  cumulative = bounded_batch(rng, n_seeds, n_rounds, tau=n_rounds / 4)
  result = stats.classify_growth(cumulative)
  assert result.verdict == "bounded", result.reason
  assert result.criterion == "decaying_faster_than_1_over_t"
  assert result.exponent.upper < -0.25


@pytest.mark.parametrize("n_seeds, n_rounds", SIZES)
@pytest.mark.parametrize("batch_seed", [0, 1])
def test_classify_logarithmic(n_seeds, n_rounds, batch_seed):
  rng = np.random.default_rng([3, n_rounds, batch_seed])
  cumulative = log_batch(rng, n_seeds, n_rounds, rate=2.0, noise=0.2)
  result = stats.classify_growth(cumulative, seed=batch_seed)
  assert result.verdict == "logarithmic", result.reason
  assert result.conclusive, result.reason
  # True rate within 4 bootstrap standard errors (a 95% interval spans
  # ~3.9 of them): fails with probability ~1e-4 per case if unbiased.
  fit = result.log_fit
  assert abs(fit.slope - 2.0) < 4.0 * (fit.slope_upper - fit.slope_lower) / 3.92
  exponent = result.exponent
  assert abs(exponent.exponent) < exponent.upper - exponent.lower


@pytest.mark.parametrize("n_seeds, n_rounds", SIZES)
@pytest.mark.parametrize("batch_seed", [0, 1])
def test_classify_sqrt_is_faster(n_seeds, n_rounds, batch_seed):
  rng = np.random.default_rng([4, n_rounds, batch_seed])
  result = stats.classify_growth(sqrt_batch(rng, n_seeds, n_rounds, rate=0.5), seed=batch_seed)
  assert result.verdict == "faster", result.reason
  assert result.comparison.preferred == "sqrt"
  fit = result.sqrt_fit
  assert abs(fit.slope - 0.5) < 4.0 * (fit.slope_upper - fit.slope_lower) / 3.92
  exponent = result.exponent
  assert abs(exponent.exponent - 0.5) < exponent.upper - exponent.lower


@pytest.mark.parametrize("n_seeds, n_rounds", [(20, 1000), (100, 3000)])
@pytest.mark.parametrize(
  "kind, burn_in, verdict",
  [
    ("bounded", 0.0, "bounded"),
    ("log", 0.0, "logarithmic"),
    ("log", 20.0, "logarithmic"),
    ("sqrt", 0.0, "faster"),
  ],
)
def test_classify_monotone_simulator_like_curves(n_seeds, n_rounds, kind, burn_in, verdict):
  rng = np.random.default_rng([5, n_rounds, len(kind)])
  cumulative, _ = monotone_batch(
    rng, n_seeds, n_rounds, kind, scale=10.0 if kind == "bounded" else 1.0, burn_in=burn_in
  )
  result = stats.classify_growth(cumulative, n_bootstrap=500)
  assert result.verdict == verdict, result.reason
  assert result.conclusive, result.reason


def test_classify_small_log_growth_after_large_burn_in_is_logarithmic():
  # Growth per doubling (0.21) is < 1% of the level (~52), but the 1/t
  # decay is confirmed, so rule 1 must not call it bounded.
  rng = np.random.default_rng(6)
  t = _rounds(3000)
  cumulative = (
    50.0 * (1.0 - np.exp(-t / 50.0)) + 0.3 * np.log(t) + 0.05 * rng.standard_normal((50, 3000))
  )
  result = stats.classify_growth(cumulative, n_bootstrap=500)
  assert result.growth_per_doubling_upper < 0.01 * result.final_mean
  assert result.verdict == "logarithmic" and result.conclusive, result.reason


@pytest.mark.parametrize(
  "curve, verdict, criterion",
  [
    (np.zeros(500), "bounded", "negligible_growth"),
    (np.full(500, 3.0), "bounded", "negligible_growth"),
    (np.log(_rounds(500)), "logarithmic", "log_confirmed"),
    (np.log(1.0 + _rounds(2000) / 100.0), "logarithmic", "log_confirmed"),
    (_rounds(500) ** 0.3, "faster", "exponent_above_margin"),
    (0.01 * _rounds(500), "faster", "exponent_above_margin"),
    (np.cumsum(_rounds(2000) ** -1.3), "bounded", "decaying_faster_than_1_over_t"),
    (np.cumsum(_rounds(2000) ** -1.5), "bounded", "negligible_growth"),
  ],
)
def test_classify_noise_free_curves(curve, verdict, criterion):
  result = stats.classify_growth(np.stack([curve, curve]), n_bootstrap=20)
  assert (result.verdict, result.criterion) == (verdict, criterion), result.reason


def test_classify_pure_noise_is_not_called_bounded():
  # Flat (so truly bounded) but noise too large to bound the growth: the
  # rule must report an inconclusive default instead of claiming
  # boundedness from an interval that merely includes 0 (or from the
  # replicates without growth, which count as alpha = -inf). Over 40 noise
  # draws 37 were inconclusive; the 3 others had a slope interval
  # excluding 0, the 5% two-sided error of a 95% interval.
  rng = np.random.default_rng(9)
  cumulative = 1.0 + 5.0 * rng.standard_normal((20, 400))
  result = stats.classify_growth(cumulative, n_bootstrap=300)
  assert result.verdict == "logarithmic"
  assert not result.conclusive
  assert result.criterion == "log_default"
  assert "inconclusive" in result.reason
  assert result.log_fit.slope_lower < 0.0 < result.log_fit.slope_upper


def test_classify_tail_matches_numpy_differences():
  cumulative, per_round = monotone_batch(np.random.default_rng(10), 10, 800, "log")
  result = stats.classify_growth(cumulative, tail_fraction=0.25, n_bootstrap=20)
  expected = per_round[:, -200:].mean(axis=1)
  np.testing.assert_allclose(result.tail.per_seed, expected, rtol=1e-9)
  assert result.tail.first_round == 601


def test_classify_thresholds_are_respected():
  rng = np.random.default_rng(14)
  cumulative = sqrt_batch(rng, 30, 2000)
  # With the margin above the true exponent 1/2, sqrt growth is no longer "faster".
  result = stats.classify_growth(cumulative, exponent_margin=0.6, n_bootstrap=300)
  assert result.verdict == "logarithmic"
  assert stats.classify_growth(cumulative, n_bootstrap=300).verdict == "faster"
  # A huge tolerance calls anything not confirmed logarithmic bounded.
  result = stats.classify_growth(cumulative, relative_tolerance=10.0, n_bootstrap=300)
  assert result.verdict == "bounded" and result.criterion == "negligible_growth"


# --------------------------------------------------------------------------
# summarize_growth and JSON output.
# --------------------------------------------------------------------------


def test_summary_is_json_ready_and_consistent():
  cumulative, per_round = monotone_batch(np.random.default_rng(15), 12, 600, "log")
  summary = stats.summarize_growth(cumulative, per_round, eps0=1e-3, n_bootstrap=200, seed=3)
  text = json.dumps(summary, allow_nan=False)
  assert json.loads(text) == summary
  assert summary["verdict"] in stats.VERDICTS
  assert summary["n_seeds"] == 12 and summary["n_rounds"] == 600
  expected_counts = (per_round >= 1e-3).sum(axis=1)
  assert summary["bad_rounds"]["counts"] == expected_counts.tolist()
  final = cumulative[:, -1]
  lower, upper = scipy_stats.t.interval(0.95, df=11, loc=final.mean(), scale=scipy_stats.sem(final))
  assert summary["final"]["mean"] == pytest.approx(final.mean(), rel=1e-12)
  assert summary["final"]["lower"] == pytest.approx(lower, rel=1e-10)
  assert summary["final"]["upper"] == pytest.approx(upper, rel=1e-10)
  assert summary["tail"]["mean"] == pytest.approx(per_round[:, -120:].mean(), rel=1e-10)
  classification = stats.classify_growth(cumulative, n_bootstrap=200, seed=3)
  assert summary["log_fit"] == classification.log_fit.to_dict()
  assert summary["reason"] == classification.reason


def test_summary_without_per_round_or_eps0():
  summary = stats.summarize_growth(np.zeros((3, 50)), n_bootstrap=10)
  assert "bad_rounds" not in summary
  assert summary["verdict"] == "bounded"
  assert summary["exponent"]["exponent"] is None  # NaN -> None
  json.dumps(summary, allow_nan=False)


def test_to_dict_of_nested_result():
  result = stats.classify_growth(np.stack([np.log(_rounds(100))] * 2), n_bootstrap=10)
  as_dict = result.to_dict()
  assert as_dict["log_fit"]["model"] == "log"
  assert isinstance(as_dict["tail"]["per_seed"], list)
  json.dumps(as_dict, allow_nan=False)


# --------------------------------------------------------------------------
# Input validation.
# --------------------------------------------------------------------------

GOOD = np.ones((3, 20)).cumsum(axis=1)


@pytest.mark.parametrize(
  "call, message",
  [
    (
      lambda: stats.mean_confidence_band(np.ones(5)),
      r"curves must be a 2-D array .* got shape \(5,\)",
    ),
    (lambda: stats.mean_confidence_band(np.ones((2, 3, 4))), r"curves must be a 2-D array"),
    (
      lambda: stats.mean_confidence_band(np.ones((0, 4))),
      r"curves must have at least one seed",
    ),
    (lambda: stats.mean_confidence_band(np.ones((2, 0))), r"at least one seed and one round"),
    (lambda: stats.mean_confidence_band([[1.0, np.nan]]), r"curves contains 1 non-finite"),
    (
      lambda: stats.mean_confidence_band([[1.0, np.inf, -np.inf]]),
      r"curves contains 2 non-finite",
    ),
    (lambda: stats.mean_confidence_band([["a", "b"]]), r"curves must be a numeric array"),
    (
      lambda: stats.mean_confidence_band(GOOD, level=0.0),
      r"level must be .* between 0 and 1; got 0.0",
    ),
    (lambda: stats.mean_confidence_band(GOOD, level=1.0), r"level .* got 1.0"),
    (lambda: stats.mean_confidence_band(GOOD, level=95), r"level .* got 95"),
    (lambda: stats.mean_confidence_band(GOOD, level=True), r"level .* got True"),
    (lambda: stats.mean_confidence_band(GOOD, level="0.9"), r"level .* got '0.9'"),
    (lambda: stats.fit_log_growth(np.ones(5)), r"cumulative must be a 2-D array"),
    (
      lambda: stats.fit_log_growth(GOOD, start_fraction=1.0),
      r"start_fraction .* 0 <= start_fraction < 1; got 1.0",
    ),
    (lambda: stats.fit_log_growth(GOOD, start_fraction=-0.1), r"start_fraction .* got -0.1"),
    (
      lambda: stats.fit_log_growth(GOOD, start_fraction=0.95),
      r"start_fraction=0.95 with n_rounds=20 leaves 2 rounds",
    ),
    (
      lambda: stats.fit_log_growth(GOOD, n_bootstrap=0),
      r"n_bootstrap must be an integer >= 1; got 0",
    ),
    (lambda: stats.fit_log_growth(GOOD, n_bootstrap=10.0), r"n_bootstrap .* got 10.0"),
    (lambda: stats.fit_sqrt_growth(GOOD, seed=-1), r"seed must be an integer >= 0; got -1"),
    (lambda: stats.fit_sqrt_growth(GOOD, seed=None), r"seed .* got None"),
    (lambda: stats.fit_sqrt_growth([[np.nan] * 5]), r"cumulative contains 5 non-finite"),
    (lambda: stats.compare_growth_fits(GOOD, start_fraction=2), r"start_fraction .* got 2"),
    (lambda: stats.growth_exponent(GOOD[:, :3]), r"leaves 2 rounds .* at least 4"),
    (
      lambda: stats.tail_mean_regret(GOOD, fraction=0.0),
      r"fraction must be .* 0 < fraction <= 1; got 0.0",
    ),
    (lambda: stats.tail_mean_regret(GOOD, fraction=1.5), r"fraction .* got 1.5"),
    (lambda: stats.tail_mean_regret(np.ones(4)), r"per_round must be a 2-D array"),
    (
      lambda: stats.bad_round_counts(GOOD, 0.0),
      r"eps0 must be a finite real number > 0; got 0.0",
    ),
    (lambda: stats.bad_round_counts(GOOD, -1), r"eps0 .* got -1"),
    (lambda: stats.bad_round_counts(GOOD, float("nan")), r"eps0 .* got nan"),
    (lambda: stats.bad_round_counts([[np.nan]], 0.1), r"per_round contains 1 non-finite"),
    (
      lambda: stats.classify_growth(GOOD, relative_tolerance=-0.1),
      r"relative_tolerance must be .* >= 0; got -0.1",
    ),
    (
      lambda: stats.classify_growth(GOOD, exponent_margin=float("inf")),
      r"exponent_margin .* got inf",
    ),
    (lambda: stats.classify_growth(GOOD, tail_fraction=0), r"tail_fraction .* got 0"),
    (
      lambda: stats.classify_growth(GOOD[:, :5], start_fraction=0.5),
      r"leaves 3 rounds .* at least 4",
    ),
    (
      lambda: stats.summarize_growth(GOOD, np.ones((3, 19))),
      r"per_round must have the shape of cumulative \(3, 20\); got \(3, 19\)",
    ),
    (lambda: stats.summarize_growth(GOOD, eps0=0), r"eps0 .* got 0"),
    (lambda: stats.per_round_regret([1.0, 2.0]), r"cumulative must be a 2-D array"),
  ],
)
def test_invalid_inputs_raise_clear_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_accepts_lists_and_integer_arrays():
  band = stats.mean_confidence_band([[1, 2], [3, 4]])
  np.testing.assert_array_equal(band.mean, [2.0, 3.0])
  counts = stats.bad_round_counts(np.array([[0, 1, 2]], dtype=np.int32), 1)
  assert counts.counts.tolist() == [2]
  np.testing.assert_array_equal(stats.per_round_regret([[1.0, 3.0, 6.0]]), [[1.0, 2.0, 3.0]])
