"""jaxbandit against the independent NumPy/SciPy reference, in distribution.

``benchmarks/numpy_reference.py`` runs the paper-users protocol (K=2
Bradley-Terry, one slate item from the softened current policy and one from
pi0, known-heads exact ERM refitted every round, ridge 1, beta 1) from the
instance arrays alone, with NumPy's generator and SciPy's trust-region solver;
it shares no code with the package. Its random numbers differ from the
package's JAX keys, so the two agree in distribution, not draw for draw:

* round 1 deploys the zero estimate in both, whose greedy action is the lowest
  supported index of every cell, so its regret G is one deterministic number:
  the records must match to float32 accuracy (1e-6 relative plus 1e-6
  absolute, as in test_simulate.py) for every seed of both;
* the mean per-round regret of the first rounds (the estimate has seen at most
  a few observations) must agree within 4 standard errors of the difference of
  the two means (Welch);
* the mean cumulative regret at the horizon must have overlapping 95% Student-t
  intervals.

The instance is tiny (4 contexts, 5 actions, d=2, J=2, 3 users) with
non-uniform context and user weights and a pi0 with zeros, so the support
handling and the tie rule are exercised too. Both data layouts of the package
are checked ('buffer': a row per round; 'table': a weighted row per possible
observation, 600 rows here), one exact-ERM kernel each (~10 s apiece on 2 CPU
cores); the reference takes a few seconds and is run once for both. The slow variant
repeats the comparison on another instance with 4x the seeds and twice the
horizon and checks intermediate rounds as well; another slow test checks the
mean round-2 regret of both (2000 seeds) against its exact expectation,
enumerated over every possible first observation.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from scipy import special
from scipy import stats

from jaxbandit import instance as instance_lib
from jaxbandit import simulate as S

from conftest import load_benchmark_module

SIZES = dict(n_contexts=4, n_actions=5, dim=2, latent_dim=2, n_users=3)
# Non-uniform pi0 with zeros; context 0 has its lowest index off the support.
REFERENCE_POLICY = np.array([
    [0.0, 0.4, 0.2, 0.3, 0.1],
    [0.3, 0.1, 0.2, 0.1, 0.3],
    [0.25, 0.25, 0.0, 0.3, 0.2],
    [0.1, 0.2, 0.3, 0.4, 0.0],
])
CONTEXT_WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])
USER_WEIGHTS = np.array([0.5, 0.3, 0.2])
BETA, RIDGE = 1.0, 1.0
EARLY_ROUNDS = 5
EARLY_STANDARD_ERRORS = 4.0


def load_reference():
  return load_benchmark_module("numpy_reference.py")


def make_instance(problem_seed):
  return instance_lib.make_instance(jax.random.key(problem_seed), reward_scale=2.0,
                                    context_weights=CONTEXT_WEIGHTS,
                                    user_weights=USER_WEIGHTS,
                                    reference_policy=REFERENCE_POLICY, **SIZES)


@functools.lru_cache(maxsize=None)
def run_reference(problem_seed, horizon, n_seeds):
  """The reference's per-round regret (n_seeds, horizon), computed once per setting."""
  arrays = {k: np.asarray(v) for k, v in make_instance(problem_seed)._asdict().items()}
  out = load_reference().run_reference(arrays, n_seeds, horizon, beta=BETA, ridge=RIDGE, seed=0)
  return np.asarray(out["per_round_regret"], np.float64)


def run_both(problem_seed, horizon, n_seeds, data_layout="buffer"):
  """Per-round regret (n_seeds, horizon) from jaxbandit and from the reference."""
  instance = make_instance(problem_seed)
  config = S.SimulationConfig(horizon=horizon, slate_size=2, choice_model="bradley_terry",
                              model_class="known_heads", slate_policy="current_reference",
                              data_layout=data_layout)
  params = S.SimulationParams.make(beta=BETA, ridge=RIDGE)
  result = S.simulate(instance, config, params, n_seeds=n_seeds, master_seed=0)
  assert np.all(result.records.erm_converged), "the package's exact ERM must converge"
  return (np.asarray(result.records.regret[0], np.float64),
          run_reference(problem_seed, horizon, n_seeds))


def t_interval(samples, level=0.95):
  n = len(samples)
  mean = np.mean(samples)
  half = stats.t.ppf(0.5 + level / 2, n - 1) * np.std(samples, ddof=1) / np.sqrt(n)
  return mean - half, mean + half


def assert_round_one_identical(package, reference):
  expected = reference[0, 0]
  np.testing.assert_allclose(reference[:, 0], expected, rtol=0, atol=0)
  np.testing.assert_allclose(package[:, 0], expected, rtol=1e-6, atol=1e-6)


def assert_early_means_close(package, reference, n_rounds=EARLY_ROUNDS):
  for t in range(n_rounds):
    a, b = package[:, t], reference[:, t]
    difference = abs(a.mean() - b.mean())
    standard_error = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert difference <= EARLY_STANDARD_ERRORS * standard_error + 1e-5, (
        f"round {t + 1}: mean regret {a.mean():.5f} (jaxbandit) vs {b.mean():.5f} "
        f"(reference), more than {EARLY_STANDARD_ERRORS} standard errors "
        f"({standard_error:.5f}) apart")


def assert_intervals_overlap(package, reference, rounds):
  cum_package = np.cumsum(package, axis=1)
  cum_reference = np.cumsum(reference, axis=1)
  for t in rounds:
    low_p, high_p = t_interval(cum_package[:, t - 1])
    low_r, high_r = t_interval(cum_reference[:, t - 1])
    assert low_p <= high_r and low_r <= high_p, (
        f"cumulative regret at round {t}: jaxbandit 95% interval [{low_p:.4f}, {high_p:.4f}] "
        f"and reference [{low_r:.4f}, {high_r:.4f}] do not overlap")


@pytest.fixture(scope="module", params=["buffer", "table"])
def small_runs(request):
  """Both data layouts (a row per round, or a weighted row per possible observation):
  the same likelihood, so each must agree with the reference."""
  return run_both(problem_seed=1, horizon=40, n_seeds=24, data_layout=request.param)


def test_round_one_regret_is_identical(small_runs):
  package, reference = small_runs
  assert reference[0, 0] > 0, "the zero estimate should have positive regret on this instance"
  assert_round_one_identical(package, reference)


def test_early_rounds_mean_regret_close(small_runs):
  assert_early_means_close(*small_runs)


def test_cumulative_regret_at_horizon_intervals_overlap(small_runs):
  package, reference = small_runs
  # Regret must have been incurred and learned from for the check to mean anything.
  assert package.sum(axis=1).mean() > package[:, 0].mean()
  assert package[:, -10:].mean() < package[:, 0].mean()
  assert_intervals_overlap(package, reference, rounds=[package.shape[1]])


def exact_round_two_regret(problem_seed):
  """E[G] of the estimate deployed in round 2, by enumerating every first observation.

  Round 1 deploys the zero estimate, so both slate items are drawn from pi0; the
  first observation is (x, i, a0, a1, winner) with probability
  d0[x] rho[i] pi0[a0|x] pi0[a1|x] P_BT(winner), and round 2 deploys the exact
  ERM of that one observation (fitted here by the reference's own solver).
  """
  reference = load_reference()
  arrays = {k: np.asarray(v, np.float64) for k, v in make_instance(problem_seed)._asdict().items()}
  contexts, actions, maps, heads = (arrays[k] for k in ("contexts", "actions", "maps", "heads"))
  d0, rho, pi0 = (arrays[k] for k in ("context_weights", "user_weights", "reference_policy"))
  true = float(arrays["reward_scale"]) * reference.scores(contexts, actions, maps, heads)
  support = pi0 > 0
  best = reference.best_values(true, support)
  weights = np.outer(d0, rho)
  n_params = maps.size
  expectation = 0.0
  for x, i, a0, a1 in np.ndindex(len(d0), len(rho), pi0.shape[1], pi0.shape[1]):
    probability = d0[x] * rho[i] * pi0[x, a0] * pi0[x, a1]
    if probability == 0:
      continue
    first_wins = special.expit(true[x, i, a0] - true[x, i, a1])
    for chosen, other, p_outcome in ((a0, a1, first_wins), (a1, a0, 1.0 - first_wins)):
      z = reference.difference_features(contexts, actions, heads, np.array([x]), np.array([i]),
                                        np.array([chosen]), np.array([other]))
      theta, _ = reference.fit_erm(z, RIDGE, np.zeros(n_params), 1e-6)
      estimate = reference.scores(contexts, actions, theta.reshape(maps.shape), heads)
      expectation += probability * p_outcome * reference.population_regret(
          true, best, estimate, support, weights)
  return expectation


@pytest.mark.slow  # a horizon-2 kernel compile and a 600-fit enumeration (~15 s)
def test_round_two_mean_regret_matches_exact_enumeration():
  """Round 2 is the first random round: its mean over many seeds must match the exact
  expectation (within 4 standard errors) for both implementations."""
  n_seeds = 2000
  instance = make_instance(1)
  config = S.SimulationConfig(horizon=2, slate_size=2, choice_model="bradley_terry",
                              model_class="known_heads", slate_policy="current_reference")
  result = S.simulate(instance, config, S.SimulationParams.make(beta=BETA, ridge=RIDGE),
                      n_seeds=n_seeds, master_seed=0)
  package = np.asarray(result.records.regret[0, :, 1], np.float64)
  reference = run_reference(1, 2, n_seeds)[:, 1]
  exact = exact_round_two_regret(1)
  for name, samples in (("jaxbandit", package), ("reference", reference)):
    standard_error = samples.std(ddof=1) / np.sqrt(n_seeds)
    assert abs(samples.mean() - exact) <= 4 * standard_error, (
        f"{name}: mean round-2 regret {samples.mean():.5f}, exact {exact:.5f} "
        f"(standard error {standard_error:.5f})")


@pytest.mark.slow  # one more exact-ERM compile and 4x the seeds (~15-30 s on 2 cores)
def test_agreement_on_another_instance_with_more_seeds():
  package, reference = run_both(problem_seed=2, horizon=80, n_seeds=96)
  assert_round_one_identical(package, reference)
  assert_early_means_close(package, reference, n_rounds=10)
  assert_intervals_overlap(package, reference, rounds=[10, 20, 40, 80])
