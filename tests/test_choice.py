"""Tests of jaxbandit.choice against exact probabilities computed in NumPy.

Frequencies: 20,000 draws per case; every outcome's count is within 5 Monte
Carlo standard errors of N p, and a chi-square goodness-of-fit test does not
reject at level 1e-4 (the keys are fixed, so the test is deterministic).
Log-likelihoods: float32 against a float64 formula, atol 1e-6 for O(1)
utilities. Derivatives: float64 central differences of the NumPy
log-likelihood (error ~1e-9), compared at atol 2e-6.
"""

from __future__ import annotations

import collections
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from jaxbandit import choice as C

pytestmark = pytest.mark.usefixtures("strict_jax")

N_DRAWS = 20_000

# (choice model name, top_m, slate size, utilities)
CASES = {
    "bt": ("bradley_terry", None, 2, [0.3, -0.4]),
    "mnl3": ("multinomial_logit", None, 3, [0.5, -0.2, 0.1]),
    "mnl4": ("multinomial_logit", None, 4, [0.2, 1.0, -0.5, 0.0]),
    "pl3_full": ("plackett_luce", None, 3, [0.4, -0.3, 0.9]),
    "pl4_top2": ("plackett_luce", 2, 4, [0.1, 0.8, -0.6, 0.3]),
}


def model_of(case):
  name, top_m, slate_size, utilities = CASES[case]
  model = C.get_choice_model(name, top_m)
  return model, slate_size, np.asarray(utilities, np.float64)


# ---------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------


def all_outcomes(slate_size, n_ranked):
  """Every ordered list of n_ranked distinct slate positions."""
  return [tuple(o) for o in itertools.permutations(range(slate_size), n_ranked)]


def np_log_prob(utilities, outcome):
  """log P(o) = sum_s u[o_s] - log sum_{k not in o_<s} exp u[k] (stable logsumexp)."""
  utilities = np.asarray(utilities, np.float64)
  remaining = list(range(len(utilities)))
  total = 0.0
  for position in outcome:
    total += utilities[position] - special.logsumexp(utilities[remaining])
    remaining.remove(position)
  return total


def np_nll_gradient(utilities, outcome):
  """Gradient of -log P(o), closed form: sum over stages of softmax(remaining) - e_{o_s}."""
  utilities = np.asarray(utilities, np.float64)
  grad = np.zeros_like(utilities)
  remaining = list(range(len(utilities)))
  for position in outcome:
    grad[remaining] += special.softmax(utilities[remaining])
    grad[position] -= 1.0
    remaining.remove(position)
  return grad


def numeric_gradient_hessian(f, u, step_grad=1e-5, step_hess=1e-4):
  """Central differences of a float64 function of a vector."""
  u = np.asarray(u, np.float64)
  size = u.size
  eye = np.eye(size)
  grad = np.array([(f(u + step_grad * eye[k]) - f(u - step_grad * eye[k])) / (2 * step_grad)
                   for k in range(size)])
  hess = np.zeros((size, size))
  h = step_hess
  for k in range(size):
    for l in range(size):
      hess[k, l] = (f(u + h * eye[k] + h * eye[l]) - f(u + h * eye[k] - h * eye[l]) -
                    f(u - h * eye[k] + h * eye[l]) + f(u - h * eye[k] - h * eye[l])) / (4 * h * h)
  return grad, hess


def numpy_sequential_rankings(rng, utilities, n_ranked, n_draws):
  """Plackett-Luce by sequential sampling without replacement (no Gumbel trick).

  Stage by stage, every row draws one of its remaining positions with
  probability softmax(utilities over the remaining) by inverting the CDF.
  """
  utilities = np.asarray(utilities, np.float64)
  weights = np.exp(utilities - utilities.max())
  remaining = np.ones((n_draws, utilities.size), bool)
  out = np.zeros((n_draws, n_ranked), np.int64)
  for stage in range(n_ranked):
    probs = np.where(remaining, weights, 0.0)
    cdf = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    uniform = rng.random((n_draws, 1))
    pick = np.argmax((cdf > uniform) & remaining, axis=1)
    out[:, stage] = pick
    remaining[np.arange(n_draws), pick] = False
  return out


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _batch_sampler(case):
  """One jitted sampler per case, vmapped over keys (shared by the tests)."""
  model, _, _ = model_of(case)
  return jax.jit(jax.vmap(model.sample, in_axes=(0, None)))


def sample_many(case, utilities, n_draws, seed):
  keys = jax.random.split(jax.random.key(seed), n_draws)
  return np.asarray(_batch_sampler(case)(keys, jnp.asarray(utilities, jnp.float32)))


@pytest.mark.parametrize("case", list(CASES))
def test_sample_frequencies_match_exact_probabilities(case):
  model, slate_size, utilities = model_of(case)
  n_ranked = model.outcome_size(slate_size)
  draws = sample_many(case, utilities, N_DRAWS, seed=len(case))
  assert draws.shape == (N_DRAWS, n_ranked) and draws.dtype == np.int32
  counts = collections.Counter(map(tuple, draws.tolist()))
  outcomes = all_outcomes(slate_size, n_ranked)
  assert set(counts) <= set(outcomes), "a draw is not an ordered list of distinct positions"
  probs = np.exp([np_log_prob(utilities, o) for o in outcomes])
  assert probs.sum() == pytest.approx(1.0, abs=1e-12)
  observed = np.array([counts.get(o, 0) for o in outcomes], np.float64)
  expected = N_DRAWS * probs
  z_scores = (observed - expected) / np.sqrt(N_DRAWS * probs * (1 - probs))
  assert np.max(np.abs(z_scores)) < 5.0, dict(zip(outcomes, np.round(z_scores, 2)))
  assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_plackett_luce_matches_numpy_sequential_sampling():
  model, slate_size, utilities = model_of("pl3_full")
  n_draws = N_DRAWS
  ours = sample_many("pl3_full", utilities, n_draws, seed=99)
  reference = numpy_sequential_rankings(np.random.default_rng(5), utilities, slate_size,
                                        n_draws)
  outcomes = all_outcomes(slate_size, slate_size)
  table = np.array([[collections.Counter(map(tuple, draws.tolist())).get(o, 0)
                     for o in outcomes] for draws in (ours, reference)])
  assert table.sum() == 2 * n_draws  # every draw is a full ranking
  assert stats.chi2_contingency(table).pvalue > 1e-4
  # Both agree with the exact law too: each cell within 5 standard errors.
  probs = np.exp([np_log_prob(utilities, o) for o in outcomes])
  se = np.sqrt(n_draws * probs * (1 - probs))
  assert np.all(np.abs(table - n_draws * probs) < 5 * se)


def test_sampling_depends_on_key_only():
  model, _, utilities = model_of("mnl4")
  u = jnp.asarray(utilities, jnp.float32)
  first = np.asarray(model.sample(jax.random.key(1), u))
  assert np.array_equal(first, np.asarray(model.sample(jax.random.key(1), u)))
  many = sample_many("mnl4", utilities, N_DRAWS, seed=1)[:64]
  assert len(set(many[:, 0].tolist())) > 1  # different keys give different draws


# ---------------------------------------------------------------------------
# Log-likelihood and derivatives
# ---------------------------------------------------------------------------


def _loglik_grad_hess(model):
  """Jitted, vmapped over outcomes: (utilities (K,), outcomes (n, m)) -> ll, grad, hess."""
  both = lambda u, o: (model.log_likelihood(u, o), *model.gradient_hessian(u, o))
  return jax.jit(jax.vmap(both, in_axes=(None, 0)))


@pytest.mark.parametrize("case", list(CASES))
def test_log_likelihood_and_derivatives_match_numpy(case):
  model, slate_size, utilities = model_of(case)
  outcomes = all_outcomes(slate_size, model.outcome_size(slate_size))
  loglik, grad, hess = map(np.asarray, _loglik_grad_hess(model)(
      jnp.asarray(utilities, jnp.float32), jnp.asarray(outcomes, jnp.int32)))
  assert loglik.shape == (len(outcomes),)
  assert grad.shape == (len(outcomes), slate_size)
  assert hess.shape == (len(outcomes), slate_size, slate_size)
  u32 = np.asarray(utilities, np.float32).astype(np.float64)  # the values the package sees
  for row, outcome in enumerate(outcomes):
    nll = lambda u, o=outcome: -np_log_prob(u, o)
    num_grad, num_hess = numeric_gradient_hessian(nll, u32)
    assert loglik[row] == pytest.approx(np_log_prob(u32, outcome), abs=1e-6)
    np.testing.assert_allclose(num_grad, np_nll_gradient(u32, outcome), atol=1e-8)
    np.testing.assert_allclose(grad[row], num_grad, atol=2e-6)
    np.testing.assert_allclose(hess[row], num_hess, atol=2e-6)
  assert special.logsumexp(loglik.astype(np.float64)) == pytest.approx(0.0, abs=1e-5)


EXTREME = {
    "bt": [1e4, -1e4],
    "mnl3": [1e4, 0.0, -1e4],
    "pl3_full": [-1e4, 1e4, 0.0],
    "pl4_top2": [0.0, -1e4, 1e4, 5e3],
}


@pytest.mark.parametrize("case", list(EXTREME))
def test_extreme_utilities_stay_finite(case):
  model, slate_size, _ = model_of(case)
  utilities = np.asarray(EXTREME[case], np.float64)
  outcomes = all_outcomes(slate_size, model.outcome_size(slate_size))
  loglik, grad, hess = map(np.asarray, _loglik_grad_hess(model)(
      jnp.asarray(utilities, jnp.float32), jnp.asarray(outcomes, jnp.int32)))
  assert np.all(np.isfinite(loglik)) and np.all(np.isfinite(grad)) and np.all(np.isfinite(hess))
  for row, outcome in enumerate(outcomes):
    assert loglik[row] == pytest.approx(np_log_prob(utilities, outcome), rel=1e-6, abs=1e-3)
    np.testing.assert_allclose(grad[row], np_nll_gradient(utilities, outcome), atol=1e-6)
  likely = tuple(np.argsort(-utilities)[:len(outcomes[0])])
  unlikely = tuple(np.argsort(utilities)[:len(outcomes[0])])
  assert abs(loglik[outcomes.index(likely)]) < 1e-3
  assert loglik[outcomes.index(unlikely)] < -1.9e4
  if case == "bt":
    assert loglik[outcomes.index((1,))] == pytest.approx(-2e4, rel=1e-6)
  # Each stage's softmax is (nearly) one-hot, so the Hessian vanishes.
  np.testing.assert_allclose(hess, 0.0, atol=1e-6)


# ---------------------------------------------------------------------------
# jit, vmap
# ---------------------------------------------------------------------------


def test_jitted_equals_unjitted(rng):
  model, slate_size, _ = model_of("pl4_top2")
  u = jnp.asarray(rng.normal(size=slate_size), jnp.float32)
  outcome = jnp.asarray(all_outcomes(slate_size, model.outcome_size(slate_size))[1], jnp.int32)
  key = jax.random.key(3)
  np.testing.assert_array_equal(np.asarray(jax.jit(model.sample)(key, u)),
                                np.asarray(model.sample(key, u)))
  assert float(jax.jit(model.log_likelihood)(u, outcome)) == pytest.approx(
      float(model.log_likelihood(u, outcome)), abs=1e-6)
  for jitted, eager in zip(jax.jit(model.gradient_hessian)(u, outcome),
                           model.gradient_hessian(u, outcome)):
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)


def test_vmapped_equals_loop_of_unbatched_calls(rng):
  model, slate_size, _ = model_of("pl3_full")
  n = 5
  utilities = jnp.asarray(rng.normal(size=(n, slate_size)), jnp.float32)
  keys = jax.random.split(jax.random.key(11), n)
  # The unbatched calls are jitted too (one compilation each, then a loop).
  sample, log_likelihood, gradient_hessian = map(
      jax.jit, (model.sample, model.log_likelihood, model.gradient_hessian))
  batch_draws = np.asarray(jax.jit(jax.vmap(model.sample))(keys, utilities))
  loop_draws = np.stack([np.asarray(sample(keys[i], utilities[i])) for i in range(n)])
  np.testing.assert_array_equal(batch_draws, loop_draws)
  outcomes = jnp.asarray(batch_draws)
  batch_ll = np.asarray(jax.jit(jax.vmap(model.log_likelihood))(utilities, outcomes))
  batch_grad, batch_hess = map(np.asarray, jax.jit(jax.vmap(model.gradient_hessian))(
      utilities, outcomes))
  for i in range(n):
    assert batch_ll[i] == pytest.approx(float(log_likelihood(utilities[i], outcomes[i])),
                                        abs=1e-6)
    grad, hess = gradient_hessian(utilities[i], outcomes[i])
    np.testing.assert_allclose(batch_grad[i], np.asarray(grad), atol=1e-6)
    np.testing.assert_allclose(batch_hess[i], np.asarray(hess), atol=1e-6)
    assert batch_ll[i] == pytest.approx(
        np_log_prob(np.asarray(utilities[i], np.float64), batch_draws[i]), abs=1e-6)


# ---------------------------------------------------------------------------
# Construction and slate-size checks
# ---------------------------------------------------------------------------


def test_model_metadata():
  assert C.bradley_terry().outcome_size(2) == 1
  assert C.multinomial_logit().outcome_size(4) == 1
  assert C.plackett_luce().outcome_size(4) == 4
  assert C.plackett_luce(2).outcome_size(4) == 2
  assert C.get_choice_model("plackett_luce", 3).n_ranked == 3
  assert [C.get_choice_model(name).name for name in C.CHOICE_MODELS] == list(C.CHOICE_MODELS)


def test_check_slate_size_accepts_valid_sizes():
  C.check_slate_size(C.bradley_terry(), 2, 5)
  C.check_slate_size(C.multinomial_logit(), 5, 5)
  C.check_slate_size(C.plackett_luce(), 3, 5)
  C.check_slate_size(C.plackett_luce(2), 2, 5)


@pytest.mark.parametrize("model,slate_size,n_actions,name", [
    (C.bradley_terry(), 3, 5, "slate_size"),
    (C.multinomial_logit(), 1, 5, "slate_size"),
    (C.multinomial_logit(), 6, 5, "slate_size"),
    (C.plackett_luce(), 2.0, 5, "slate_size"),
    (C.plackett_luce(4), 3, 5, "top_m"),
])
def test_check_slate_size_rejects(model, slate_size, n_actions, name):
  with pytest.raises(ValueError, match=rf"\b{name}\b"):
    C.check_slate_size(model, slate_size, n_actions)


def test_constructors_reject_bad_arguments():
  with pytest.raises(ValueError, match=r"\btop_m\b"):
    C.plackett_luce(0)
  with pytest.raises(ValueError, match=r"\bchoice_model\b"):
    C.get_choice_model("probit")
