"""Host-side statistics over Monte Carlo regret curves.

Everything here is plain NumPy/SciPy on the host, applied after a simulation
has returned its per-round records. The module imports nothing from the rest
of ``jaxbandit`` so that it can be used on saved arrays alone.

Conventions:

- A batch of curves is an array of shape ``(n_seeds, n_rounds)``: one row per
  Monte Carlo seed, one column per round. Rounds are numbered ``t = 1..T``;
  column ``t - 1`` holds round ``t``.
- ``cumulative[s, t - 1]`` is seed ``s``'s cumulative regret after round
  ``t``; ``per_round`` is its first difference (``R_0 = 0``).
- Confidence intervals across seeds are Student-t intervals of the mean; the
  growth-rate intervals are seed-bootstrap percentile intervals (seeds, not
  rounds, are the independent units). Bootstraps take an explicit integer
  ``seed`` and draw from ``numpy.random.default_rng(seed)``, so a call is
  deterministic.

The question these statistics answer is the one of P1 (Kang 2026,
*Personalized Alignment Revisited*): is cumulative temperature-zero regret
bounded, logarithmic, or faster? See :func:`classify_growth`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

__all__ = [
  "ConfidenceBand",
  "GrowthFit",
  "GrowthComparison",
  "GrowthExponent",
  "TailMean",
  "BadRoundCounts",
  "GrowthClassification",
  "VERDICTS",
  "per_round_regret",
  "mean_confidence_band",
  "fit_log_growth",
  "fit_sqrt_growth",
  "compare_growth_fits",
  "growth_exponent",
  "tail_mean_regret",
  "bad_round_counts",
  "classify_growth",
  "summarize_growth",
]

VERDICTS = ("bounded", "logarithmic", "faster")

# Fractions times horizons are compared after this slack so that, e.g.,
# 0.2 * 1000 is not rounded up to 201 by a last-bit floating-point error.
_FRACTION_SLACK = 1e-9


# --------------------------------------------------------------------------
# Result containers.
# --------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
  """Converts NumPy values to JSON-ready Python values (non-finite -> None)."""
  if isinstance(value, dict):
    return {key: _jsonable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(item) for item in value]
  if isinstance(value, np.ndarray):
    return [_jsonable(item) for item in value.tolist()]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (numbers.Integral, np.integer)):
    return int(value)
  if isinstance(value, (numbers.Real, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  if dataclasses.is_dataclass(value):
    return value.to_dict()
  return value


def _freeze(array: np.ndarray) -> np.ndarray:
  array = np.array(array, copy=True)
  array.flags.writeable = False
  return array


def _values_equal(left: Any, right: Any) -> bool:
  if isinstance(left, np.ndarray) or isinstance(right, np.ndarray):
    return bool(np.array_equal(left, right, equal_nan=True))
  if isinstance(left, float) and isinstance(right, float):
    return left == right or (math.isnan(left) and math.isnan(right))
  return bool(left == right)


class _Result:
  """Mixin: ``to_dict`` and value equality for the result dataclasses.

  Equality compares array fields elementwise and treats NaN as equal to
  NaN, so two runs with the same inputs and seed compare equal.
  """

  __hash__ = None  # results hold arrays: not hashable.

  def __eq__(self, other: Any) -> bool:
    if type(self) is not type(other):
      return NotImplemented
    return all(
      _values_equal(getattr(self, field.name), getattr(other, field.name))
      for field in dataclasses.fields(self)
    )

  def to_dict(self) -> dict:
    """Returns the fields as JSON-ready Python values.

    Arrays become lists, NumPy scalars become Python scalars, nested
    results become dicts, and non-finite floats (NaN, +-inf) become
    ``None`` so that ``json.dumps`` writes standard JSON.
    """
    return {field.name: _jsonable(getattr(self, field.name)) for field in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True, eq=False)
class ConfidenceBand(_Result):
  """Per-round mean of a batch of curves with a Student-t band.

  Attributes:
    mean: (n_rounds,) mean over seeds.
    lower: (n_rounds,) lower end of the t-interval of the mean.
    upper: (n_rounds,) upper end of the t-interval of the mean.
    level: two-sided confidence level, e.g. 0.95.
    n_seeds: number of seeds averaged.
  """

  mean: np.ndarray  # (n_rounds,)
  lower: np.ndarray  # (n_rounds,)
  upper: np.ndarray  # (n_rounds,)
  level: float
  n_seeds: int


@dataclasses.dataclass(frozen=True, eq=False)
class GrowthFit(_Result):
  """Least-squares fit ``R_t ~ intercept + slope * f(t)`` over a late window.

  ``f`` is ``log`` (model ``"log"``) or ``sqrt`` (model ``"sqrt"``). The
  point estimates fit the seed-mean curve; the intervals are seed-bootstrap
  percentile intervals.

  Attributes:
    model: ``"log"`` or ``"sqrt"``.
    intercept: fitted ``a`` of the mean curve.
    slope: fitted ``b`` of the mean curve (for ``"log"``: regret added per
      unit of ``log t``, i.e. ``slope * log 2`` per doubling of ``t``).
    intercept_lower: lower percentile bound for ``a``.
    intercept_upper: upper percentile bound for ``a``.
    slope_lower: lower percentile bound for ``b``.
    slope_upper: upper percentile bound for ``b``.
    residual_sum_squares: residual sum of squares of the mean-curve fit.
    r_squared: ``1 - RSS / TSS`` of the mean-curve fit; NaN when the mean
      curve is constant over the window (TSS = 0).
    first_round: first round (1-based) of the fit window.
    last_round: last round of the fit window (the horizon ``T``).
    n_seeds: number of seeds.
    n_bootstrap: number of bootstrap replicates.
    level: two-sided level of the percentile intervals.
    seed: seed of the bootstrap generator.
  """

  model: str
  intercept: float
  slope: float
  intercept_lower: float
  intercept_upper: float
  slope_lower: float
  slope_upper: float
  residual_sum_squares: float
  r_squared: float
  first_round: int
  last_round: int
  n_seeds: int
  n_bootstrap: int
  level: float
  seed: int


@dataclasses.dataclass(frozen=True, eq=False)
class GrowthComparison(_Result):
  """Log versus square-root fit of the mean curve on one window.

  Attributes:
    log_residual_sum_squares: RSS of ``a + b log t``.
    sqrt_residual_sum_squares: RSS of ``a + b sqrt t``.
    log_r_squared: R^2 of the log fit (NaN for a constant mean curve).
    sqrt_r_squared: R^2 of the sqrt fit (NaN for a constant mean curve).
    rss_ratio: ``sqrt_residual_sum_squares / log_residual_sum_squares``;
      below 1 favours sqrt (NaN when both are 0).
    preferred: ``"sqrt"`` if its RSS is strictly smaller, else ``"log"``.
    first_round: first round (1-based) of the window.
    last_round: last round of the window.
  """

  log_residual_sum_squares: float
  sqrt_residual_sum_squares: float
  log_r_squared: float
  sqrt_r_squared: float
  rss_ratio: float
  preferred: str
  first_round: int
  last_round: int


@dataclasses.dataclass(frozen=True, eq=False)
class GrowthExponent(_Result):
  """Local growth exponent of the mean cumulative regret curve.

  ``alpha = (d^2 R / d(log t)^2) / (dR / d log t)``, estimated at the
  window's centre (in ``log t``) from a quadratic least-squares fit of the
  mean curve in ``log t``. It is 0 for ``a + b log t``, ``p`` for
  ``a + c t^p``, and negative when the per-round regret decays faster than
  ``1/t`` (bounded regret); the per-round regret behaves like
  ``t^(alpha - 1)``. Additive offsets do not change it.

  Attributes:
    exponent: alpha of the mean curve; NaN when the fitted growth rate
      ``dR / d log t`` at the centre is not positive (beyond rounding).
    lower: lower percentile bound (a bootstrap replicate without positive
      growth counts as ``-inf``).
    upper: upper percentile bound.
    growth_rate: fitted ``dR / d log t`` at the centre (the local log-slope).
    at_round: the round ``exp(centre)`` at which alpha is evaluated.
    first_round: first round (1-based) of the window.
    last_round: last round of the window.
    level: two-sided level of the percentile interval.
  """

  exponent: float
  lower: float
  upper: float
  growth_rate: float
  at_round: float
  first_round: int
  last_round: int
  level: float


@dataclasses.dataclass(frozen=True, eq=False)
class TailMean(_Result):
  """Mean per-round regret over the last rounds, with a t-interval.

  Attributes:
    mean: mean over seeds of each seed's average per-round regret in the
      tail window.
    lower: lower end of the Student-t interval across seeds.
    upper: upper end of the Student-t interval across seeds.
    per_seed: (n_seeds,) each seed's tail average.
    first_round: first round (1-based) of the tail window.
    last_round: last round (the horizon ``T``).
    level: two-sided confidence level.
    n_seeds: number of seeds.
  """

  mean: float
  lower: float
  upper: float
  per_seed: np.ndarray  # (n_seeds,)
  first_round: int
  last_round: int
  level: float
  n_seeds: int


@dataclasses.dataclass(frozen=True, eq=False)
class BadRoundCounts(_Result):
  """Bad-round counts ``N_eps0 = #{t : per-round regret_t >= eps0}`` per seed.

  Attributes:
    counts: (n_seeds,) int64 count per seed.
    eps0: the threshold.
    mean: mean count over seeds.
    lower: lower end of the Student-t interval of the mean count.
    upper: upper end of the Student-t interval of the mean count.
    level: two-sided confidence level.
    n_rounds: horizon ``T`` over which rounds were counted.
  """

  counts: np.ndarray  # (n_seeds,) int64
  eps0: float
  mean: float
  lower: float
  upper: float
  level: float
  n_rounds: int


@dataclasses.dataclass(frozen=True, eq=False)
class GrowthClassification(_Result):
  """Verdict on the growth of cumulative regret, with its evidence.

  Attributes:
    verdict: one of ``"bounded"``, ``"logarithmic"``, ``"faster"``.
    conclusive: False when the verdict is the default ``"logarithmic"``
      reached without the data confirming it (growth not established, or
      the exponent interval reaching past a margin); True otherwise.
    reason: human-readable account of the rule that fired.
    criterion: short machine-readable name of that rule.
    final_mean: mean cumulative regret at the horizon, ``mean_s R_T``.
    growth_per_doubling_upper: upper bound of the regret added per doubling
      of ``t`` under the log fit, ``slope_upper * log 2``.
    relative_tolerance: the ``relative_tolerance`` used.
    exponent_margin: the ``exponent_margin`` used.
    log_fit: the :class:`GrowthFit` of ``a + b log t``.
    sqrt_fit: the :class:`GrowthFit` of ``a + b sqrt t``.
    comparison: the :class:`GrowthComparison` of the two.
    exponent: the :class:`GrowthExponent`.
    tail: the :class:`TailMean` of the per-round regret.
  """

  verdict: str
  conclusive: bool
  reason: str
  criterion: str
  final_mean: float
  growth_per_doubling_upper: float
  relative_tolerance: float
  exponent_margin: float
  log_fit: GrowthFit
  sqrt_fit: GrowthFit
  comparison: GrowthComparison
  exponent: GrowthExponent
  tail: TailMean


# --------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------


def _check_curves(name: str, curves: Any) -> np.ndarray:
  """Returns ``curves`` as a finite float64 (n_seeds, n_rounds) array."""
  try:
    array = np.asarray(curves, dtype=np.float64)
  except (TypeError, ValueError) as error:
    raise ValueError(
      f"{name} must be a numeric array of shape (n_seeds, n_rounds); "
      f"could not convert it to float64 ({error})"
    ) from None
  if array.ndim != 2:
    raise ValueError(
      f"{name} must be a 2-D array of shape (n_seeds, n_rounds); got "
      f"shape {array.shape}. For a single seed pass curve[None, :]."
    )
  if array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f"{name} must have at least one seed and one round; got shape {array.shape}")
  n_bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
  if n_bad:
    raise ValueError(
      f"{name} contains {n_bad} non-finite values (NaN or inf); all "
      "entries must be finite (drop or repair failed seeds first)"
    )
  return array


def _check_level(level: Any, name: str = "level") -> float:
  if (
    isinstance(level, (bool, np.bool_))
    or not isinstance(level, numbers.Real)
    or not 0.0 < float(level) < 1.0
  ):
    raise ValueError(f"{name} must be a real number strictly between 0 and 1; got {level!r}")
  return float(level)


def _check_fraction(value: Any, name: str, *, allow_zero: bool) -> float:
  low = "0 <=" if allow_zero else "0 <"
  high = "< 1" if allow_zero else "<= 1"
  ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
  if ok:
    value = float(value)
    ok = (0.0 <= value < 1.0) if allow_zero else (0.0 < value <= 1.0)
  if not ok:
    raise ValueError(f"{name} must be a real number with {low} {name} {high}; got {value!r}")
  return value


def _check_int(value: Any, name: str, minimum: int) -> int:
  if (
    isinstance(value, (bool, np.bool_))
    or not isinstance(value, (numbers.Integral, np.integer))
    or int(value) < minimum
  ):
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
  return int(value)


def _check_nonnegative(value: Any, name: str) -> float:
  if (
    isinstance(value, (bool, np.bool_))
    or not isinstance(value, numbers.Real)
    or not math.isfinite(float(value))
    or float(value) < 0.0
  ):
    raise ValueError(f"{name} must be a finite real number >= 0; got {value!r}")
  return float(value)


def _late_window(n_rounds: int, start_fraction: float, min_rounds: int) -> tuple[int, int]:
  """First and last round (1-based, inclusive) with t >= start_fraction*T."""
  first = max(1, math.ceil(start_fraction * n_rounds - _FRACTION_SLACK))
  if n_rounds - first + 1 < min_rounds:
    raise ValueError(
      f"start_fraction={start_fraction!r} with n_rounds={n_rounds} leaves "
      f"{n_rounds - first + 1} rounds in the fit window [{first}, "
      f"{n_rounds}]; at least {min_rounds} are needed (lower "
      "start_fraction or use a longer horizon)"
    )
  return first, n_rounds


# --------------------------------------------------------------------------
# Shared numerics.
# --------------------------------------------------------------------------


def _t_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean and Student-t interval of the mean along axis 0.

  With a single sample the interval collapses to the mean (no spread can be
  estimated); with zero sample spread it also has zero width.
  """
  n_samples = samples.shape[0]
  mean = samples.mean(axis=0)
  if n_samples < 2:
    return mean, mean.copy(), mean.copy()
  standard_error = samples.std(axis=0, ddof=1) / math.sqrt(n_samples)
  half_width = scipy_stats.t.ppf(0.5 + level / 2.0, n_samples - 1) * standard_error
  return mean, mean - half_width, mean + half_width


def _bootstrap_weights(n_seeds: int, n_bootstrap: int, seed: int) -> np.ndarray:
  """(n_bootstrap, n_seeds) resampling weights (counts / n_seeds).

  Draws ``default_rng(seed).integers(0, n_seeds, (n_bootstrap, n_seeds))``:
  row ``k`` lists the seeds of replicate ``k``, drawn with replacement.
  """
  rng = np.random.default_rng(seed)
  indices = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds))
  offsets = n_seeds * np.arange(n_bootstrap)[:, None]
  counts = np.bincount((indices + offsets).ravel(), minlength=n_bootstrap * n_seeds)
  return counts.reshape(n_bootstrap, n_seeds) / n_seeds


def _least_squares(design: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Coefficients (n_features, n_targets) of least squares per column."""
  coefficients, *_ = np.linalg.lstsq(design, targets, rcond=None)
  return coefficients


def _fit_summary(design: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float, float]:
  """Coefficients, RSS and R^2 of one least-squares fit."""
  coefficients = _least_squares(design, target[:, None])[:, 0]
  residuals = target - design @ coefficients
  rss = float(residuals @ residuals)
  centred = target - target.mean()
  tss = float(centred @ centred)
  # A constant window (TSS ~ 0 up to rounding) has no variance to explain.
  if tss <= 1e-24 * max(1.0, float(np.max(np.abs(target))) ** 2) * target.size:
    return coefficients, rss, float("nan")
  return coefficients, rss, 1.0 - rss / tss


def _percentile_interval(
  replicates: np.ndarray, level: float, method: str = "linear"
) -> tuple[float, float]:
  lower, upper = np.quantile(replicates, [0.5 - level / 2.0, 0.5 + level / 2.0], method=method)
  return float(lower), float(upper)


_TRANSFORMS = {"log": np.log, "sqrt": np.sqrt}


def _growth_fit(
  cumulative: np.ndarray,
  model: str,
  start_fraction: float,
  weights: np.ndarray,
  n_bootstrap: int,
  level: float,
  seed: int,
) -> tuple[GrowthFit, np.ndarray]:
  """Fits one model; returns the fit and the (n_bootstrap, 2) replicates."""
  n_seeds, n_rounds = cumulative.shape
  first, last = _late_window(n_rounds, start_fraction, min_rounds=3)
  rounds = np.arange(first, last + 1, dtype=np.float64)
  design = np.stack([np.ones_like(rounds), _TRANSFORMS[model](rounds)], axis=1)
  window = cumulative[:, first - 1 : last]
  (intercept, slope), rss, r_squared = _fit_summary(design, window.mean(axis=0))
  # Least squares is linear in the data, so the fit of a bootstrap mean
  # curve is the same weighted mean of the per-seed fits: fit each seed once.
  per_seed = _least_squares(design, window.T).T  # (n_seeds, 2)
  replicates = weights @ per_seed  # (n_bootstrap, 2)
  intercept_lower, intercept_upper = _percentile_interval(replicates[:, 0], level)
  slope_lower, slope_upper = _percentile_interval(replicates[:, 1], level)
  fit = GrowthFit(
    model=model,
    intercept=float(intercept),
    slope=float(slope),
    intercept_lower=intercept_lower,
    intercept_upper=intercept_upper,
    slope_lower=slope_lower,
    slope_upper=slope_upper,
    residual_sum_squares=rss,
    r_squared=r_squared,
    first_round=first,
    last_round=last,
    n_seeds=n_seeds,
    n_bootstrap=n_bootstrap,
    level=level,
    seed=seed,
  )
  return fit, replicates


def _check_fit_args(cumulative, start_fraction, n_bootstrap, level, seed):
  cumulative = _check_curves("cumulative", cumulative)
  start_fraction = _check_fraction(start_fraction, "start_fraction", allow_zero=True)
  n_bootstrap = _check_int(n_bootstrap, "n_bootstrap", 1)
  level = _check_level(level)
  seed = _check_int(seed, "seed", 0)
  return cumulative, start_fraction, n_bootstrap, level, seed


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def per_round_regret(cumulative: Any) -> np.ndarray:
  """First differences of cumulative regret, with ``R_0 = 0``.

  Args:
    cumulative: (n_seeds, n_rounds) cumulative regret.

  Returns:
    (n_seeds, n_rounds) float64 per-round regret; column 0 equals
    ``cumulative[:, 0]``.
  """
  cumulative = _check_curves("cumulative", cumulative)
  return np.diff(cumulative, axis=1, prepend=0.0)


def mean_confidence_band(curves: Any, level: float = 0.95) -> ConfidenceBand:
  """Per-round mean over seeds with a Student-t confidence band.

  For each round, ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)`` with the
  sample standard deviation (ddof=1) across the ``n`` seeds. With
  ``n_seeds == 1`` no spread can be estimated and ``lower == upper ==
  mean``; a round where all seeds agree has a zero-width band.

  Args:
    curves: (n_seeds, n_rounds) values, e.g. cumulative regret; finite.
    level: two-sided confidence level in (0, 1).

  Returns:
    A :class:`ConfidenceBand` with (n_rounds,) arrays ``mean``, ``lower``,
    ``upper``.

  Raises:
    ValueError: if ``curves`` is not 2-D, is empty or has NaN/inf, or
      ``level`` is not in (0, 1).
  """
  curves = _check_curves("curves", curves)
  level = _check_level(level)
  mean, lower, upper = _t_interval(curves, level)
  return ConfidenceBand(
    mean=_freeze(mean),
    lower=_freeze(lower),
    upper=_freeze(upper),
    level=level,
    n_seeds=curves.shape[0],
  )


def fit_log_growth(
  cumulative: Any,
  start_fraction: float = 0.5,
  n_bootstrap: int = 1000,
  level: float = 0.95,
  seed: int = 0,
) -> GrowthFit:
  """Fits ``R_t ~ a + b log t`` to the mean cumulative regret, late rounds.

  The window holds rounds ``t`` with ``start_fraction * T <= t <= T``
  (rounds numbered ``1..T``; the first is at least 1). The point estimate
  is the ordinary least-squares fit of the seed-mean curve. The interval
  is a seed bootstrap: ``n_bootstrap`` times, resample the seeds with
  replacement (``default_rng(seed).integers(0, n_seeds, (n_bootstrap,
  n_seeds))``), refit on that replicate's mean curve, and take the
  ``(1 -+ level) / 2`` quantiles (NumPy ``linear`` method) of ``a`` and
  ``b``. With one seed every replicate equals the data and the interval
  collapses to the estimate.

  ``b`` is the regret added per unit of ``log t``; ``b log 2`` per doubling
  of the horizon.

  Args:
    cumulative: (n_seeds, n_rounds) cumulative regret; finite.
    start_fraction: start of the window as a fraction of ``T``, in [0, 1).
    n_bootstrap: number of bootstrap replicates, >= 1 (1000 or more for
      reported intervals).
    level: two-sided level of the percentile interval, in (0, 1).
    seed: non-negative integer seed of the bootstrap generator.

  Returns:
    A :class:`GrowthFit` with ``model == "log"``.

  Raises:
    ValueError: on malformed input or a window of fewer than 3 rounds.
  """
  cumulative, start_fraction, n_bootstrap, level, seed = _check_fit_args(
    cumulative, start_fraction, n_bootstrap, level, seed
  )
  weights = _bootstrap_weights(cumulative.shape[0], n_bootstrap, seed)
  fit, _ = _growth_fit(cumulative, "log", start_fraction, weights, n_bootstrap, level, seed)
  return fit


def fit_sqrt_growth(
  cumulative: Any,
  start_fraction: float = 0.5,
  n_bootstrap: int = 1000,
  level: float = 0.95,
  seed: int = 0,
) -> GrowthFit:
  """Fits ``R_t ~ a + b sqrt t`` to the mean cumulative regret, late rounds.

  Identical to :func:`fit_log_growth` (same window, same bootstrap draws
  for the same ``seed``) with ``sqrt t`` in place of ``log t``.

  Args:
    cumulative: (n_seeds, n_rounds) cumulative regret; finite.
    start_fraction: start of the window as a fraction of ``T``, in [0, 1).
    n_bootstrap: number of bootstrap replicates, >= 1.
    level: two-sided level of the percentile interval, in (0, 1).
    seed: non-negative integer seed of the bootstrap generator.

  Returns:
    A :class:`GrowthFit` with ``model == "sqrt"``.

  Raises:
    ValueError: on malformed input or a window of fewer than 3 rounds.
  """
  cumulative, start_fraction, n_bootstrap, level, seed = _check_fit_args(
    cumulative, start_fraction, n_bootstrap, level, seed
  )
  weights = _bootstrap_weights(cumulative.shape[0], n_bootstrap, seed)
  fit, _ = _growth_fit(cumulative, "sqrt", start_fraction, weights, n_bootstrap, level, seed)
  return fit


def _comparison(log_fit: GrowthFit, sqrt_fit: GrowthFit) -> GrowthComparison:
  log_rss = log_fit.residual_sum_squares
  sqrt_rss = sqrt_fit.residual_sum_squares
  ratio = sqrt_rss / log_rss if log_rss > 0 else (float("nan") if sqrt_rss == 0 else float("inf"))
  return GrowthComparison(
    log_residual_sum_squares=log_rss,
    sqrt_residual_sum_squares=sqrt_rss,
    log_r_squared=log_fit.r_squared,
    sqrt_r_squared=sqrt_fit.r_squared,
    rss_ratio=ratio,
    preferred="sqrt" if sqrt_rss < log_rss else "log",
    first_round=log_fit.first_round,
    last_round=log_fit.last_round,
  )


def compare_growth_fits(cumulative: Any, start_fraction: float = 0.5) -> GrowthComparison:
  """Compares ``a + b log t`` with ``a + b sqrt t`` on the mean curve.

  Both models have two parameters and are fitted on the same window
  (rounds ``start_fraction * T <= t <= T``), so their residual sums of
  squares are directly comparable.

  Args:
    cumulative: (n_seeds, n_rounds) cumulative regret; finite.
    start_fraction: start of the window as a fraction of ``T``, in [0, 1).

  Returns:
    A :class:`GrowthComparison`.

  Raises:
    ValueError: on malformed input or a window of fewer than 3 rounds.
  """
  cumulative, start_fraction, _, _, _ = _check_fit_args(cumulative, start_fraction, 1, 0.95, 0)
  weights = np.full((1, cumulative.shape[0]), 1.0 / cumulative.shape[0])
  log_fit, _ = _growth_fit(cumulative, "log", start_fraction, weights, 1, 0.95, 0)
  sqrt_fit, _ = _growth_fit(cumulative, "sqrt", start_fraction, weights, 1, 0.95, 0)
  return _comparison(log_fit, sqrt_fit)


def _exponent_from_coefficients(coefficients: np.ndarray, min_growth: float) -> np.ndarray:
  """alpha = 2 c2 / c1 where c1 > min_growth, else -inf (no growth to measure)."""
  linear, quadratic = coefficients[..., 1], coefficients[..., 2]
  with np.errstate(divide="ignore", invalid="ignore"):
    alpha = 2.0 * quadratic / linear
  return np.where(linear > min_growth, alpha, -np.inf)


def _growth_exponent(
  cumulative: np.ndarray,
  start_fraction: float,
  weights: np.ndarray,
  level: float,
) -> GrowthExponent:
  n_rounds = cumulative.shape[1]
  first, last = _late_window(n_rounds, start_fraction, min_rounds=4)
  log_rounds = np.log(np.arange(first, last + 1, dtype=np.float64))
  centre = 0.5 * (log_rounds[0] + log_rounds[-1])
  offset = log_rounds - centre
  design = np.stack([np.ones_like(offset), offset, offset**2], axis=1)
  window = cumulative[:, first - 1 : last]
  mean_curve = window.mean(axis=0)
  mean_coefficients = _least_squares(design, mean_curve[:, None])[:, 0]
  per_seed = _least_squares(design, window.T).T  # (n_seeds, 3)
  # A growth rate at rounding level (a flat curve) has no meaningful ratio.
  min_growth = 1e-12 * float(np.max(np.abs(window)))
  replicates = _exponent_from_coefficients(weights @ per_seed, min_growth)
  # inverted_cdf picks order statistics, so -inf replicates stay -inf
  # instead of turning interpolated quantiles into NaN.
  lower, upper = _percentile_interval(replicates, level, method="inverted_cdf")
  growth_rate = float(mean_coefficients[1])
  exponent = float(_exponent_from_coefficients(mean_coefficients, min_growth))
  if not math.isfinite(exponent):
    exponent = float("nan")
  return GrowthExponent(
    exponent=exponent,
    lower=lower,
    upper=upper,
    growth_rate=growth_rate,
    at_round=float(math.exp(centre)),
    first_round=first,
    last_round=last,
    level=level,
  )


def growth_exponent(
  cumulative: Any,
  start_fraction: float = 0.5,
  n_bootstrap: int = 1000,
  level: float = 0.95,
  seed: int = 0,
) -> GrowthExponent:
  """Local growth exponent alpha of the mean cumulative regret.

  With ``u = log t`` and ``v = u - centre`` (``centre`` the midpoint of
  ``log t`` over the window ``start_fraction * T <= t <= T``), fit
  ``R ~ c0 + c1 v + c2 v^2`` by least squares and report
  ``alpha = 2 c2 / c1``: the ratio of the second to the first derivative
  of ``R`` in ``log t`` at the centre. For ``R = a + c t^p`` this ratio is
  exactly ``p`` at every ``t`` (the quadratic fit approximates it to a few
  hundredths on a one-doubling window); for ``R = a + b log t`` it is 0;
  for bounded regret whose per-round regret decays like ``t^-(1+d)`` it is
  ``-d``, and exponential decay gives large negative values. Unlike
  ``log R_t - log R_{t/2}``, it ignores additive offsets such as a burn-in.

  The interval is the seed-bootstrap percentile interval (same draws as
  :func:`fit_log_growth` for the same ``seed``), with NumPy's
  ``inverted_cdf`` quantiles; a replicate whose fitted growth rate ``c1``
  is not positive (no measurable growth; rounding-level values, below
  ``1e-12`` times the largest ``|R|`` in the window, count as 0) counts as
  ``alpha = -inf``.

  Args:
    cumulative: (n_seeds, n_rounds) cumulative regret; finite.
    start_fraction: start of the window as a fraction of ``T``, in [0, 1).
    n_bootstrap: number of bootstrap replicates, >= 1.
    level: two-sided level of the percentile interval, in (0, 1).
    seed: non-negative integer seed of the bootstrap generator.

  Returns:
    A :class:`GrowthExponent`.

  Raises:
    ValueError: on malformed input or a window of fewer than 4 rounds.
  """
  cumulative, start_fraction, n_bootstrap, level, seed = _check_fit_args(
    cumulative, start_fraction, n_bootstrap, level, seed
  )
  weights = _bootstrap_weights(cumulative.shape[0], n_bootstrap, seed)
  return _growth_exponent(cumulative, start_fraction, weights, level)


def tail_mean_regret(per_round: Any, fraction: float = 0.2, level: float = 0.95) -> TailMean:
  """Mean per-round regret over the last ``fraction`` of the horizon.

  Each seed's per-round regret is averaged over its last
  ``ceil(fraction * T)`` rounds (at least one); the seed averages then get
  a Student-t interval of their mean (collapsed to the mean for one seed).

  Args:
    per_round: (n_seeds, n_rounds) per-round regret (not cumulative).
    fraction: tail length as a fraction of ``T``, in (0, 1].
    level: two-sided confidence level, in (0, 1).

  Returns:
    A :class:`TailMean`.

  Raises:
    ValueError: on malformed input.
  """
  per_round = _check_curves("per_round", per_round)
  fraction = _check_fraction(fraction, "fraction", allow_zero=False)
  level = _check_level(level)
  n_seeds, n_rounds = per_round.shape
  n_tail = max(1, math.ceil(fraction * n_rounds - _FRACTION_SLACK))
  per_seed = per_round[:, n_rounds - n_tail :].mean(axis=1)
  mean, lower, upper = _t_interval(per_seed, level)
  return TailMean(
    mean=float(mean),
    lower=float(lower),
    upper=float(upper),
    per_seed=_freeze(per_seed),
    first_round=n_rounds - n_tail + 1,
    last_round=n_rounds,
    level=level,
    n_seeds=n_seeds,
  )


def bad_round_counts(per_round: Any, eps0: float, level: float = 0.95) -> BadRoundCounts:
  """Counts rounds with per-round regret at least ``eps0``, per seed.

  ``N_eps0 = sum_t 1{G_t >= eps0}`` (P1's bad-round count; bounded in
  expectation when user diversity holds), as int64, with the mean over
  seeds and its Student-t interval (collapsed to the mean for one seed).

  Args:
    per_round: (n_seeds, n_rounds) per-round regret ``G_t``.
    eps0: threshold, a finite number > 0.
    level: two-sided confidence level, in (0, 1).

  Returns:
    A :class:`BadRoundCounts`.

  Raises:
    ValueError: on malformed input or ``eps0 <= 0``.

  References:
    E. H. Kang, Personalized Alignment Revisited (arXiv 2605.09119), 2026.
  """
  per_round = _check_curves("per_round", per_round)
  if (
    isinstance(eps0, (bool, np.bool_))
    or not isinstance(eps0, numbers.Real)
    or not math.isfinite(float(eps0))
    or float(eps0) <= 0.0
  ):
    raise ValueError(f"eps0 must be a finite real number > 0; got {eps0!r}")
  level = _check_level(level)
  counts = np.count_nonzero(per_round >= float(eps0), axis=1).astype(np.int64)
  mean, lower, upper = _t_interval(counts.astype(np.float64), level)
  return BadRoundCounts(
    counts=_freeze(counts),
    eps0=float(eps0),
    mean=float(mean),
    lower=float(lower),
    upper=float(upper),
    level=level,
    n_rounds=per_round.shape[1],
  )


def classify_growth(
  cumulative: Any,
  start_fraction: float = 0.5,
  tail_fraction: float = 0.2,
  n_bootstrap: int = 1000,
  level: float = 0.95,
  seed: int = 0,
  relative_tolerance: float = 0.01,
  exponent_margin: float = 0.25,
) -> GrowthClassification:
  """Classifies cumulative regret growth as bounded, logarithmic or faster.

  Statistics, all on the late window ``start_fraction * T <= t <= T`` and
  with seed-bootstrap percentile intervals at ``level`` (one shared set of
  resamples, so the intervals are paired):

  - ``b``: slope of ``R_t ~ a + b log t`` (:func:`fit_log_growth`), i.e.
    regret added per unit of ``log t``; ``b log 2`` per doubling.
  - ``alpha``: local growth exponent (:func:`growth_exponent`). It is 0 for
    logarithmic growth, 1/2 for ``sqrt t``, and the per-round regret decays
    like ``t^(alpha - 1)``; bounded regret (per-round regret decaying
    faster than ``1/t``, e.g. exponentially or hitting exactly 0) has
    ``alpha < 0``.
  - the RSS of the log and sqrt fits (:func:`compare_growth_fits`).

  Decision rule, first match wins (``L = mean_s R_T``, the final level):

  1. **bounded** (``negligible_growth``) if
     ``b_upper * log 2 <= relative_tolerance * L``: even the upper
     confidence bound of the growth per doubling of ``t`` is a negligible
     share of the regret already accrued (default 1%), unless logarithmic
     growth is confirmed (rule 4's condition: a confirmed ``1/t`` decay is
     logarithmic however small ``b`` is next to the burn-in). A curve that
     has stopped growing, or is flat up to noise, lands here.
  2. **bounded** (``decaying_faster_than_1_over_t``) if growth is
     established (``b_lower > 0``) and ``alpha_upper < -exponent_margin``:
     with confidence, the curve still rises but its per-round regret
     decays faster than ``t^-(1 + margin)``, i.e. the late increments
     shrink from one doubling of ``t`` to the next, so it is levelling off
     toward a plateau. (Requiring growth keeps a flat but noisy curve, whose
     bootstrap replicates without growth count as ``alpha = -inf``, from
     being called bounded here without rule 1's upper bound.)
  3. **faster** if ``alpha_lower > exponent_margin`` and the sqrt fit has a
     smaller RSS than the log fit: with confidence the per-round regret
     decays more slowly than ``t^-(1 - margin)``, and the curve's shape
     agrees.
  4. **logarithmic** otherwise. It is *confirmed* (``conclusive``) when
     the growth is established (``b_lower > 0``) and the exponent interval
     lies inside ``[-margin, margin]`` (per-round regret ~ ``1/t``);
     otherwise it is the default verdict, reported as inconclusive.

  Why these thresholds. ``alpha`` separates the hypotheses by a fixed
  distance independent of the curve's scale and burn-in: bounded < 0 =
  logarithmic < 1/2 = sqrt. The default margin 1/4 is the midpoint between
  log and sqrt, and a verdict other than "logarithmic" needs a whole
  confidence interval beyond it, so noise alone moves a log curve out with
  probability at most ``(1 - level) / 2`` when the interval is valid, and
  misspecification smaller than the margin is still called logarithmic
  (``log(t + t0)`` has ``alpha = t0 / (t + t0)``, below 1/4 while ``t0`` is
  under a third of the window's central round; ``log^2 t`` has
  ``alpha = 1 / log t``). ``relative_tolerance`` is a practical-equivalence
  margin: "bounded" needs positive evidence (an upper bound), never merely
  an interval that includes 0, which a noisy log curve can have too. Rules
  1-2 come before 3 because ``alpha`` is meaningless for a flat curve.

  Limits. The verdict describes the horizon simulated: a log curve whose
  burn-in transient has not decayed by ``start_fraction * T`` looks bounded
  (rule 2), and growth with ``-margin < alpha < margin`` (polylogarithmic,
  a slow power, or a summable ``t^-(1 + d)`` per-round decay with
  ``d < margin``) is called logarithmic; a longer horizon or a later
  ``start_fraction`` resolves these, and the evidence is returned so a
  reader can check. The percentile bootstrap omits the small-sample t
  correction, so with fewer than about 10 seeds its intervals are too
  narrow and the verdicts overconfident: use 20 or more seeds.

  The tail mean per-round regret (last ``tail_fraction`` of rounds) is
  returned as evidence and quoted in the reason; it does not decide.

  Args:
    cumulative: (n_seeds, n_rounds) cumulative regret; finite.
    start_fraction: start of the late window as a fraction of ``T``, in
      [0, 1).
    tail_fraction: tail length for the reported tail mean, in (0, 1].
    n_bootstrap: number of bootstrap replicates, >= 1.
    level: two-sided level of all intervals, in (0, 1).
    seed: non-negative integer seed of the bootstrap generator.
    relative_tolerance: rule-1 tolerance, >= 0 (0 disables rule 1 except
      for curves with exactly no late growth).
    exponent_margin: margin on ``alpha`` for rules 2-4, >= 0.

  Returns:
    A :class:`GrowthClassification`.

  Raises:
    ValueError: on malformed input or a window of fewer than 4 rounds.

  References:
    E. H. Kang, Personalized Alignment Revisited (arXiv 2605.09119), 2026:
    bounded regret under user diversity, at least logarithmic without.
  """
  cumulative, start_fraction, n_bootstrap, level, seed = _check_fit_args(
    cumulative, start_fraction, n_bootstrap, level, seed
  )
  tail_fraction = _check_fraction(tail_fraction, "tail_fraction", allow_zero=False)
  relative_tolerance = _check_nonnegative(relative_tolerance, "relative_tolerance")
  exponent_margin = _check_nonnegative(exponent_margin, "exponent_margin")
  _late_window(cumulative.shape[1], start_fraction, min_rounds=4)

  weights = _bootstrap_weights(cumulative.shape[0], n_bootstrap, seed)
  log_fit, _ = _growth_fit(cumulative, "log", start_fraction, weights, n_bootstrap, level, seed)
  sqrt_fit, _ = _growth_fit(cumulative, "sqrt", start_fraction, weights, n_bootstrap, level, seed)
  comparison = _comparison(log_fit, sqrt_fit)
  exponent = _growth_exponent(cumulative, start_fraction, weights, level)
  tail = tail_mean_regret(per_round_regret(cumulative), tail_fraction, level)

  final_mean = float(cumulative[:, -1].mean())
  growth_upper = log_fit.slope_upper * math.log(2.0)
  window = f"rounds {log_fit.first_round}-{log_fit.last_round}"
  pct = f"{100 * level:g}%"
  facts = (
    f"log-slope b = {log_fit.slope:.4g} [{log_fit.slope_lower:.4g}, "
    f"{log_fit.slope_upper:.4g}], growth exponent alpha = "
    f"{exponent.exponent:.3g} [{exponent.lower:.3g}, {exponent.upper:.3g}], "
    f"RSS sqrt/log = {comparison.rss_ratio:.3g}, tail per-round regret = "
    f"{tail.mean:.3g} [{tail.lower:.3g}, {tail.upper:.3g}] "
    f"({pct} intervals, {window})"
  )

  growth_established = log_fit.slope_lower > 0
  exponent_inside = -exponent_margin <= exponent.lower and exponent.upper <= exponent_margin
  log_confirmed = bool(growth_established and exponent_inside)

  if growth_upper <= relative_tolerance * max(final_mean, 0.0) and not log_confirmed:
    verdict, criterion, conclusive = "bounded", "negligible_growth", True
    reason = (
      f"bounded: the upper {pct} bound on growth per doubling of t, "
      f"{growth_upper:.3g}, is at most {relative_tolerance:g} x the final "
      f"mean regret {final_mean:.4g}; " + facts
    )
  elif growth_established and exponent.upper < -exponent_margin:
    verdict, criterion, conclusive = "bounded", "decaying_faster_than_1_over_t", True
    reason = (
      f"bounded: alpha's upper bound {exponent.upper:.3g} < "
      f"-{exponent_margin:g}, so per-round regret decays faster than "
      f"t^-{1 + exponent_margin:g} and the curve is levelling off; " + facts
    )
  elif exponent.lower > exponent_margin and comparison.preferred == "sqrt":
    verdict, criterion, conclusive = "faster", "exponent_above_margin", True
    reason = (
      f"faster than logarithmic: alpha's lower bound {exponent.lower:.3g} "
      f"> {exponent_margin:g} (per-round regret decays slower than "
      f"t^-{1 - exponent_margin:g}) and the sqrt fit beats the log fit; " + facts
    )
  else:
    conclusive = log_confirmed
    verdict = "logarithmic"
    if conclusive:
      criterion = "log_confirmed"
      reason = (
        f"logarithmic: growth established (b lower bound "
        f"{log_fit.slope_lower:.3g} > 0) and alpha within "
        f"+-{exponent_margin:g} (per-round regret ~ 1/t); " + facts
      )
    else:
      criterion = "log_default"
      missing = []
      if not growth_established:
        missing.append("positive growth is not established (b lower bound <= 0)")
      if not exponent_inside:
        missing.append(f"the alpha interval reaches beyond +-{exponent_margin:g}")
      reason = (
        "logarithmic (inconclusive, default verdict): neither bounded nor "
        "faster growth is shown, but " + " and ".join(missing) + "; " + facts
      )

  return GrowthClassification(
    verdict=verdict,
    conclusive=conclusive,
    reason=reason,
    criterion=criterion,
    final_mean=final_mean,
    growth_per_doubling_upper=growth_upper,
    relative_tolerance=relative_tolerance,
    exponent_margin=exponent_margin,
    log_fit=log_fit,
    sqrt_fit=sqrt_fit,
    comparison=comparison,
    exponent=exponent,
    tail=tail,
  )


def summarize_growth(
  cumulative: Any,
  per_round: Any | None = None,
  eps0: float | None = None,
  *,
  start_fraction: float = 0.5,
  tail_fraction: float = 0.2,
  n_bootstrap: int = 1000,
  level: float = 0.95,
  seed: int = 0,
  relative_tolerance: float = 0.01,
  exponent_margin: float = 0.25,
) -> dict:
  """All growth statistics of one batch as a JSON-ready dict.

  Args:
    cumulative: (n_seeds, n_rounds) cumulative regret; finite.
    per_round: optional (n_seeds, n_rounds) per-round regret, used for the
      tail mean and the bad-round counts; derived from ``cumulative`` by
      first differences when omitted.
    eps0: optional bad-round threshold > 0; adds ``"bad_rounds"``.
    start_fraction, tail_fraction, n_bootstrap, level, seed,
      relative_tolerance, exponent_margin: as in :func:`classify_growth`.

  Returns:
    A dict of plain Python values (non-finite floats as ``None``) with keys
    ``n_seeds``, ``n_rounds``, ``level``, ``verdict``, ``conclusive``,
    ``reason``, ``final`` (mean and t-interval of ``R_T``), ``log_fit``,
    ``sqrt_fit``, ``comparison``, ``exponent``, ``tail``, ``thresholds``
    and, when ``eps0`` is given, ``bad_rounds`` (per-seed ``counts`` as a
    list of ints). The ``tail`` entry uses ``per_round``.

  Raises:
    ValueError: on malformed input or mismatched shapes.
  """
  cumulative = _check_curves("cumulative", cumulative)
  if per_round is None:
    per_round = per_round_regret(cumulative)
  else:
    per_round = _check_curves("per_round", per_round)
    if per_round.shape != cumulative.shape:
      raise ValueError(
        f"per_round must have the shape of cumulative {cumulative.shape}; got {per_round.shape}"
      )
  classification = classify_growth(
    cumulative,
    start_fraction=start_fraction,
    tail_fraction=tail_fraction,
    n_bootstrap=n_bootstrap,
    level=level,
    seed=seed,
    relative_tolerance=relative_tolerance,
    exponent_margin=exponent_margin,
  )
  final = mean_confidence_band(cumulative[:, -1:], level)
  tail = tail_mean_regret(per_round, tail_fraction, level)
  summary = {
    "n_seeds": cumulative.shape[0],
    "n_rounds": cumulative.shape[1],
    "level": level,
    "verdict": classification.verdict,
    "conclusive": classification.conclusive,
    "reason": classification.reason,
    "criterion": classification.criterion,
    "final": {
      "mean": final.mean[0],
      "lower": final.lower[0],
      "upper": final.upper[0],
    },
    "log_fit": classification.log_fit,
    "sqrt_fit": classification.sqrt_fit,
    "comparison": classification.comparison,
    "exponent": classification.exponent,
    "tail": tail,
    "thresholds": {
      "relative_tolerance": classification.relative_tolerance,
      "exponent_margin": classification.exponent_margin,
      "growth_per_doubling_upper": classification.growth_per_doubling_upper,
    },
  }
  if eps0 is not None:
    summary["bad_rounds"] = bad_round_counts(per_round, eps0, level)
  return _jsonable(summary)
