"""Tests of jaxbandit.policies against exact laws computed in NumPy.

Frequencies: 20,000 slates per policy and per (beta, mixture_weight) setting,
two settings drawn side by side by one vmap over the traced params (fixed
keys, so deterministic). For each
slate coordinate every action's count is within 5 Monte Carlo standard errors
of N p (p from a float64 NumPy formula), a chi-square goodness-of-fit test
does not reject at level 1e-4, and an action with pi0 = 0 is never drawn.
Pairs of coordinates: every joint cell within 5 SEs of the product law and a
contingency chi-square test of independence at level 1e-4. ``top_k`` is
compared exactly with NumPy's stable sort (ties to the lower index).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxbandit import policies as P

N_DRAWS = 20_000
SLATE_SIZE = 3
BETA = 0.7
MIXTURE_WEIGHT = 0.3

# Non-uniform pi0 with a zero (action 1 is never allowed) and an estimate whose
# largest value sits on that forbidden action.
REFERENCE = np.array([0.35, 0.0, 0.1, 0.25, 0.3])
ESTIMATE = np.array([0.2, 5.0, -0.4, 1.0, 0.3])


@pytest.fixture(scope="module", autouse=True)
def _strict_module():
  """Strict rank promotion for the whole module (fixtures included, one trace context)."""
  with jax.numpy_rank_promotion("raise"):
    yield


def log_reference(reference):
  reference = np.asarray(reference, np.float64)
  with np.errstate(divide="ignore"):
    return np.where(reference > 0, np.log(reference), -np.inf).astype(np.float32)


def policy_params(beta=BETA, mixture_weight=MIXTURE_WEIGHT):
  return P.PolicyParams(jnp.asarray(beta, jnp.float32), jnp.asarray(mixture_weight,
                                                                    jnp.float32))


def np_softened(estimate, reference, beta):
  """pi_t(a) = pi0(a) exp(R_hat(a) / beta) / Z over the support, float64."""
  weights = np.where(reference > 0, reference * np.exp((estimate - estimate.max()) / beta), 0.0)
  return weights / weights.sum()


def np_coordinate_laws(name, estimate, reference, beta, mixture_weight, slate_size):
  """(slate_size, n_actions) exact law of each slate coordinate (random policies)."""
  pi0 = np.asarray(reference, np.float64) / np.sum(reference)
  pi_t = np_softened(np.asarray(estimate, np.float64), pi0, beta)
  if name == "reference":
    rows = [pi0] * slate_size
  elif name == "softened":
    rows = [pi_t] * slate_size
  elif name == "current_reference":
    rows = [pi_t] + [pi0] * (slate_size - 1)
  elif name == "mixture":
    rows = [mixture_weight * pi_t + (1 - mixture_weight) * pi0] * slate_size
  else:
    raise ValueError(name)
  return np.stack(rows)


def np_top_k(estimate, reference, k):
  """The k best supported actions, ties to the lower index (stable sort)."""
  masked = np.where(np.asarray(reference) > 0, np.asarray(estimate, np.float64), -np.inf)
  return np.argsort(-masked, kind="stable")[:k]


def assert_counts_match(counts, probs, n, label, chi_square=True):
  """Every cell within 5 Monte Carlo SEs; chi-square over positive cells p >= 1e-4."""
  counts = np.asarray(counts, np.float64)
  se = np.sqrt(n * probs * (1 - probs))
  excess = np.abs(counts - n * probs) - 5 * se
  assert np.all(excess <= 0), f"{label}: counts {counts} vs expected {n * probs}"
  assert np.all(counts[probs == 0] == 0), f"{label}: drew an action of probability 0"
  if chi_square:
    positive = probs > 0
    p_value = stats.chisquare(counts[positive], n * probs[positive]).pvalue
    assert p_value >= 1e-4, f"{label}: chi-square p = {p_value}"


def assert_independent(first, second, n_actions, label):
  """Chi-square test of independence of two coordinates (contingency table), p >= 1e-4."""
  table = np.zeros((n_actions, n_actions))
  np.add.at(table, (first, second), 1)
  table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
  if min(table.shape) > 1:
    p_value = stats.chi2_contingency(table).pvalue
    assert p_value >= 1e-4, f"{label}: independence chi-square p = {p_value}"


RANDOM_POLICIES = ("reference", "softened", "current_reference", "mixture")

# Two (beta, mixture_weight) settings drawn side by side through a vmap over params.
SETTINGS = ((BETA, MIXTURE_WEIGHT), (0.25, 0.6))


def settings_params(settings=SETTINGS):
  return P.PolicyParams(jnp.asarray([b for b, _ in settings], jnp.float32),
                        jnp.asarray([w for _, w in settings], jnp.float32))


_TRACES = {}


@functools.lru_cache(maxsize=None)
def jitted_single(name):
  """jit(policy) for one slate, counting its traces in ``_TRACES[name]`` (shared by tests)."""
  policy = P.make_slate_policy(name, SLATE_SIZE)
  _TRACES[name] = 0

  def counted(key, estimate, log_ref, params):
    _TRACES[name] += 1
    return policy(key, estimate, log_ref, params)

  return jax.jit(counted)


@functools.lru_cache(maxsize=None)
def jitted_batched(name):
  """jit(vmap over params (vmap over keys (policy))): keys (B, N), params (B,) -> (B, N, K)."""
  policy = P.make_slate_policy(name, SLATE_SIZE)
  over_keys = jax.vmap(policy, in_axes=(0, None, None, None))
  return jax.jit(jax.vmap(over_keys, in_axes=(0, None, None, 0)))


@functools.lru_cache(maxsize=None)
def batched_slates(name):
  """(len(SETTINGS), N_DRAWS, SLATE_SIZE) slates and the keys used."""
  keys = jax.random.split(jax.random.key(0), (len(SETTINGS), N_DRAWS))
  slates = jitted_batched(name)(keys, jnp.asarray(ESTIMATE, jnp.float32),
                                jnp.asarray(log_reference(REFERENCE)), settings_params())
  return keys, np.asarray(slates)


@pytest.mark.parametrize("name", RANDOM_POLICIES)
def test_coordinate_frequencies_match_exact_laws(name):
  """Per-setting laws of each coordinate, and independence of coordinates, under vmap."""
  _, all_slates = batched_slates(name)
  assert all_slates.shape == (len(SETTINGS), N_DRAWS, SLATE_SIZE)
  assert all_slates.dtype == np.int32
  n_actions = len(REFERENCE)
  for member, (beta, weight) in enumerate(SETTINGS):
    slates = all_slates[member]
    laws = np_coordinate_laws(name, ESTIMATE, REFERENCE, beta, weight, SLATE_SIZE)
    label = f"{name} beta={beta} mixture_weight={weight}"
    for k in range(SLATE_SIZE):
      counts = np.bincount(slates[:, k], minlength=n_actions)
      assert_counts_match(counts, laws[k], N_DRAWS, f"{label} coordinate {k}")
    # Coordinates are independent draws: the joint law of a pair is the product
    # (each cell within 5 SEs), and a contingency test does not reject independence.
    for first, second in ((0, 1), (1, 2)):
      pair = f"{label} coordinates {first},{second}"
      joint = np.bincount(slates[:, first] * n_actions + slates[:, second],
                          minlength=n_actions**2)
      product = np.outer(laws[first], laws[second]).ravel()
      assert_counts_match(joint, product, N_DRAWS, pair, chi_square=False)
      assert_independent(slates[:, first], slates[:, second], n_actions, pair)


def test_laws_are_distinguishable():
  """Guards the frequency test: the laws differ by far more than 5 SEs at N_DRAWS."""
  pi0 = REFERENCE / REFERENCE.sum()
  laws = [pi0]
  for beta, weight in SETTINGS:
    pi_t = np_softened(ESTIMATE, pi0, beta)
    laws += [pi_t, weight * pi_t + (1 - weight) * pi0]
  se = np.sqrt(0.25 / N_DRAWS)
  for i in range(len(laws)):
    for j in range(i):
      assert np.max(np.abs(laws[i] - laws[j])) > 20 * se


@pytest.mark.parametrize("slate_size", [2, 3])
def test_top_k_matches_numpy_with_ties_to_lower_index(slate_size):
  rng = np.random.default_rng(11)
  n_rows, n_actions = 300, 6
  # Integer scores: many exact ties; supports of random size >= slate_size.
  estimates = rng.integers(-2, 3, size=(n_rows, n_actions)).astype(np.float32)
  references = rng.uniform(0.1, 1.0, size=(n_rows, n_actions))
  estimates[:50] = 1.0  # fully tied rows
  estimates[50:100, 0] = 10.0  # a large value that is off the support
  references[50:100, 0] = 0.0
  for row in range(n_rows):
    allowed = np.flatnonzero(references[row] > 0)
    n_off = rng.integers(0, len(allowed) - slate_size + 1)
    references[row, rng.choice(allowed, size=n_off, replace=False)] = 0.0
  references /= references.sum(axis=1, keepdims=True)
  policy = jax.jit(jax.vmap(P.make_slate_policy("top_k", slate_size),
                            in_axes=(0, 0, 0, None)))
  keys = jax.random.split(jax.random.key(1), n_rows)
  got = np.asarray(policy(keys, estimates, log_reference(references), policy_params()))
  want = np.stack([np_top_k(e, r, slate_size) for e, r in zip(estimates, references)])
  np.testing.assert_array_equal(got, want)
  assert np.all(np.take_along_axis(references, got, axis=1) > 0)


@pytest.mark.parametrize("name", P.SLATE_POLICIES)
def test_params_are_traced_not_static(name):
  """New beta / mixture_weight values reuse the one trace (a Python counter inside jit)."""
  single = jitted_single(name)
  estimate = jnp.asarray(ESTIMATE, jnp.float32)
  log_ref = jnp.asarray(log_reference(REFERENCE))
  key = jax.random.key(3)
  for beta, weight in ((0.1, 0.0), (1.0, 0.5), (20.0, 1.0)):
    slate = np.asarray(single(key, estimate, log_ref, policy_params(beta, weight)))
    assert slate.shape == (SLATE_SIZE,)
  assert _TRACES[name] == 1  # one trace for every value (and for any earlier test's calls)


@pytest.mark.parametrize("name", P.SLATE_POLICIES)
def test_vmap_over_params_equals_loop(name):
  """The vmapped (params x keys) policy equals a loop of single jitted calls."""
  keys = jax.random.split(jax.random.key(0), (len(SETTINGS), N_DRAWS))
  if name == "top_k":
    batched = np.asarray(jitted_batched(name)(keys, jnp.asarray(ESTIMATE, jnp.float32),
                                              jnp.asarray(log_reference(REFERENCE)),
                                              settings_params()))
    assert np.all(batched == np_top_k(ESTIMATE, REFERENCE, SLATE_SIZE))
  else:
    keys, batched = batched_slates(name)
  single = jitted_single(name)
  estimate = jnp.asarray(ESTIMATE, jnp.float32)
  log_ref = jnp.asarray(log_reference(REFERENCE))
  for member, (beta, weight) in enumerate(SETTINGS):
    for draw in range(5):
      one = single(keys[member, draw], estimate, log_ref, policy_params(beta, weight))
      np.testing.assert_array_equal(np.asarray(one), batched[member, draw])
