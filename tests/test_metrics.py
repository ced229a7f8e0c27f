"""Tests of jaxbandit.metrics against brute-force NumPy references.

The references loop over every (context, user) cell of positive weight in
float64, so they share no code with the package. The package runs in float32
on float32 inputs: temperature-zero regrets (a choice of actions, then a
weighted sum of O(1) values) agree to 1e-6; KL-regularised regrets (softmax,
log and sums) to 1e-5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbandit import metrics

N_CONTEXTS, N_USERS, N_ACTIONS = 4, 3, 6


@pytest.fixture(scope="module", autouse=True)
def _strict_module():
  """Strict rank promotion for the whole module (fixtures included, one trace context)."""
  with jax.numpy_rank_promotion("raise"):
    yield


# ---------------------------------------------------------------------------
# Random problems and NumPy references
# ---------------------------------------------------------------------------


def random_problem(seed):
  """Float32 truth with a zero-weight user, a zero-weight context and pi0 with zeros.

  Returns (true_scores (C, U, A), weights (C, U), reference_policy (C, A)).
  """
  rng = np.random.default_rng(seed)
  true_scores = rng.normal(size=(N_CONTEXTS, N_USERS, N_ACTIONS)).astype(np.float32)
  context_weights = rng.dirichlet(np.ones(N_CONTEXTS))
  context_weights[1] = 0.0
  user_weights = rng.dirichlet(np.ones(N_USERS))
  user_weights[2] = 0.0
  weights = (context_weights[:, None] * user_weights[None, :]).astype(np.float32)
  reference = rng.uniform(0.1, 1.0, size=(N_CONTEXTS, N_ACTIONS))
  reference[0, 0] = 0.0  # the lowest index is off the support
  reference[2, [1, 3, 4]] = 0.0
  reference[3, -1] = 0.0
  reference = (reference / reference.sum(axis=1, keepdims=True)).astype(np.float32)
  return true_scores, weights, reference


def np_greedy(scores_row, support_row):
  """First maximiser over the support (explicit loop, ties to the lowest index)."""
  best_action, best_value = None, -np.inf
  for action in range(len(scores_row)):
    if support_row[action] and scores_row[action] > best_value:
      best_action, best_value = action, scores_row[action]
  return best_action


def np_population_regret(true_scores, weights, reference, estimate):
  """sum over cells of positive weight of w * (max_S R* - R*[greedy_S(R_hat)]), float64."""
  true_scores = np.asarray(true_scores, np.float64)
  estimate = np.asarray(estimate, np.float64)
  support = np.asarray(reference) > 0
  total = 0.0
  for x in range(true_scores.shape[0]):
    for i in range(true_scores.shape[1]):
      w = float(weights[x, i])
      if w <= 0:
        continue
      best = max(true_scores[x, i, a] for a in range(true_scores.shape[2]) if support[x, a])
      chosen = np_greedy(estimate[x, i], support[x])
      total += w * (best - true_scores[x, i, chosen])
  return total


def np_kl_value(pi, true_row, reference_row):
  """J_beta(pi) without beta: returns (E_pi R*, KL(pi || pi0)) over the support."""
  on = reference_row > 0
  expected = np.sum(pi[on] * true_row[on])
  positive = on & (pi > 0)
  kl = np.sum(pi[positive] * np.log(pi[positive] / reference_row[positive]))
  return expected, kl


def np_kl_regularized_regret(true_scores, weights, reference, estimate, beta):
  """sum_cells w (J_beta(pi*_beta) - J_beta(pi_t)), pi ∝ pi0 exp(R / beta) on the support."""
  true_scores = np.asarray(true_scores, np.float64)
  estimate = np.asarray(estimate, np.float64)
  reference = np.asarray(reference, np.float64)
  total = 0.0
  for x in range(true_scores.shape[0]):
    on = reference[x] > 0
    for i in range(true_scores.shape[1]):
      w = float(weights[x, i])
      if w <= 0:
        continue

      def tilted(scores):
        logits = np.full(scores.shape, -np.inf)
        logits[on] = np.log(reference[x, on]) + scores[on] / beta
        pi = np.exp(logits - logits[on].max())
        return pi / pi.sum()

      values = []
      for scores in (true_scores[x, i], estimate[x, i]):
        expected, kl = np_kl_value(tilted(scores), true_scores[x, i], reference[x])
        values.append(expected - beta * kl)
      total += w * (values[0] - values[1])
  return total


@jax.jit
def package_regrets(true_scores, weights, reference, estimate, beta):
  truth = metrics.truth_tables(true_scores, weights, reference)
  return (metrics.population_regret(truth, estimate),
          metrics.kl_regularized_regret(truth, estimate, beta))


# ---------------------------------------------------------------------------
# Temperature-zero regret
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_population_regret_matches_double_loop(seed):
  true_scores, weights, reference = random_problem(seed)
  estimate = np.random.default_rng(100 + seed).normal(size=true_scores.shape).astype(np.float32)
  got, _ = package_regrets(true_scores, weights, reference, estimate, 1.0)
  want = np_population_regret(true_scores, weights, reference, estimate)
  assert want > 0  # a random estimate is wrong somewhere: the comparison is not 0 == 0
  np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_population_regret_with_exact_ties_goes_to_lowest_supported_index(seed):
  true_scores, weights, reference = random_problem(seed)
  rng = np.random.default_rng(200 + seed)
  # Integer scores in {0, 1, 2}: most cells have tied maximisers.
  estimate = rng.integers(0, 3, size=true_scores.shape).astype(np.float32)
  estimate[0, :, :] = 1.0  # all tied; action 0 is off the support in context 0
  estimate[0, :, 0] = 5.0  # ... and the best value off the support must be ignored
  estimate[2, 0, :] = 2.0  # all tied in a context whose support is {0, 2, 5}
  got, _ = package_regrets(true_scores, weights, reference, estimate, 1.0)
  want = np_population_regret(true_scores, weights, reference, estimate)
  np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-6)
  # The same ties resolved towards the highest index would give another value,
  # so the comparison above does test the tie rule.
  flipped = estimate[..., ::-1]
  want_high = np_population_regret(true_scores[..., ::-1], weights, reference[..., ::-1],
                                   flipped)
  assert abs(want_high - want) > 1e-3


def test_population_regret_is_zero_for_the_truth_and_any_monotone_transform():
  true_scores, weights, reference = random_problem(7)
  for estimate in (true_scores, 3.0 * true_scores - 1.0):
    got, _ = package_regrets(true_scores, weights, reference, estimate.astype(np.float32), 1.0)
    assert float(got) == 0.0


def test_population_regret_vmapped_equals_loop_and_traces_once():
  true_scores, weights, reference = random_problem(4)
  estimates = np.random.default_rng(5).normal(size=(6,) + true_scores.shape).astype(np.float32)
  traces = []

  def regret(estimate):
    traces.append(1)
    truth = metrics.truth_tables(true_scores, weights, reference)
    return metrics.population_regret(truth, estimate)

  single = jax.jit(regret)
  loop = np.array([float(single(e)) for e in estimates])
  assert len(traces) == 1  # six calls, one trace
  batched = np.asarray(jax.jit(jax.vmap(regret))(estimates))
  np.testing.assert_allclose(batched, loop, rtol=0, atol=1e-6)
  want = [np_population_regret(true_scores, weights, reference, e) for e in estimates]
  np.testing.assert_allclose(loop, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# KL-regularised regret
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_regularized_regret_matches_direct_computation(seed, beta):
  true_scores, weights, reference = random_problem(seed)
  estimate = np.random.default_rng(300 + seed).normal(size=true_scores.shape).astype(np.float32)
  estimate[0, :, 0] = 50.0  # off the support: must not move pi_t
  _, got = package_regrets(true_scores, weights, reference, estimate, beta)
  want = np_kl_regularized_regret(true_scores, weights, reference, estimate, beta)
  assert want > 1e-3
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [0.3, 1.0, 2.5])
def test_kl_regularized_regret_vanishes_at_the_truth(beta):
  true_scores, weights, reference = random_problem(3)
  _, at_truth = package_regrets(true_scores, weights, reference, true_scores, beta)
  assert abs(float(at_truth)) <= 1e-5
  # pi_t is invariant to a per-cell shift of the estimate.
  shift = np.random.default_rng(9).normal(size=true_scores.shape[:2] + (1,))
  shifted = (true_scores + shift).astype(np.float32)
  _, at_shift = package_regrets(true_scores, weights, reference, shifted, beta)
  assert abs(float(at_shift)) <= 1e-5
  # ... and a wrong estimate is penalised (the zero estimate deploys pi0 itself).
  _, at_zero = package_regrets(true_scores, weights, reference, np.zeros_like(true_scores),
                               beta)
  want = np_kl_regularized_regret(true_scores, weights, reference,
                                  np.zeros_like(true_scores), beta)
  np.testing.assert_allclose(float(at_zero), want, rtol=1e-5, atol=1e-5)
  assert want > 1e-3


# ---------------------------------------------------------------------------
# Exact regret through score factors and the candidate cache
# ---------------------------------------------------------------------------

N_FACTORS = 3


def random_factors(seed):
  """Keys (C, A, r) and a query (C, U, r); scores <query, key> of O(1)."""
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(N_CONTEXTS, N_ACTIONS, N_FACTORS)).astype(np.float32)
  queries = rng.normal(size=(N_CONTEXTS, N_USERS, N_FACTORS)).astype(np.float32)
  return keys, queries


def np_factor_regret(true_scores, weights, reference, keys, queries):
  """Per-cell regret of the first maximiser of <query, key> over the support (float64
  double loop; queries (C, U, r) of any size)."""
  regret = np.zeros(weights.shape)
  for c in range(weights.shape[0]):
    support = reference[c] > 0
    for u in range(weights.shape[1]):
      scores = np.asarray(keys[c], np.float64) @ np.asarray(queries[c, u], np.float64)
      chosen = np_greedy(scores, support)
      regret[c, u] = true_scores[c, u][support].max() - true_scores[c, u, chosen]
  return regret


@pytest.mark.parametrize("action_major", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_factor_cell_regret_matches_double_loop(seed, action_major):
  true_scores, weights, reference = random_problem(seed)
  keys, queries = random_factors(seed)
  truth = metrics.truth_tables(jnp.asarray(true_scores), jnp.asarray(weights),
                               jnp.asarray(reference), action_major)
  got = np.asarray(metrics.factor_cell_regret(truth, jnp.asarray(queries), jnp.asarray(keys)))
  np.testing.assert_allclose(got, np_factor_regret(true_scores, weights, reference, keys,
                                                   queries), atol=1e-6)


def test_factor_cell_regret_vmapped_over_problems_matches_each_double_loop():
  """As in the vmapped kernel (which carries the value): the truth, the keys and the
  queries all batched (two problems), so the pass reads each problem's own
  action-major R* planes."""
  problems = [random_problem(seed) for seed in (2, 3)]
  factors = [random_factors(seed) for seed in (2, 3)]
  truths = jax.vmap(functools.partial(metrics.truth_tables, action_major=True))(
      *(jnp.asarray(np.stack([p[i] for p in problems])) for i in range(3)))
  keys = jnp.asarray(np.stack([f[0] for f in factors]))
  queries = jnp.asarray(np.stack([f[1] for f in factors]))
  got = np.asarray(jax.jit(jax.vmap(metrics.factor_cell_regret))(truths, queries, keys))
  for lane, ((true_scores, weights, reference), (lane_keys, lane_queries)) in enumerate(
      zip(problems, factors)):
    np.testing.assert_allclose(got[lane], np_factor_regret(true_scores, weights, reference,
                                                           lane_keys, lane_queries), atol=1e-6)
  assert np.abs(got[0] - got[1]).max() > 1e-3  # the lanes are different problems


@pytest.mark.parametrize("action_major", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_factor_cell_regret_breaks_exact_ties_to_the_lowest_supported_action(seed, action_major):
  """Small-integer factors make every score exact in float32, so many cells have tied
  maximisers: the factored path picks the lowest supported one, as the double loop does."""
  true_scores, weights, reference = random_problem(seed)
  rng = np.random.default_rng(300 + seed)
  keys = rng.integers(-1, 2, size=(N_CONTEXTS, N_ACTIONS, N_FACTORS)).astype(np.float32)
  queries = rng.integers(-1, 2, size=(N_CONTEXTS, N_USERS, N_FACTORS)).astype(np.float32)
  keys[0] = keys[0, :1]  # context 0: every action has the same key, so every cell ties
  truth = metrics.truth_tables(jnp.asarray(true_scores), jnp.asarray(weights),
                               jnp.asarray(reference), action_major)
  got = np.asarray(metrics.factor_cell_regret(truth, jnp.asarray(queries), jnp.asarray(keys)))
  want = np_factor_regret(true_scores, weights, reference, keys, queries)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Resolving the same ties towards the highest index gives other regrets.
  flipped = np_factor_regret(true_scores[..., ::-1], weights, reference[..., ::-1],
                             keys[:, ::-1], queries)
  assert np.abs(flipped - want).max() > 1e-3


# ---------------------------------------------------------------------------
# The regret pass over the actions that can be greedy (extreme points)
# ---------------------------------------------------------------------------

# 72 actions: labels over every supported action fill nine vectors of 8 slots, as at
# paper size (the certified kernel scores eight blocks at a time, then one).
HULL_CONTEXTS, HULL_USERS, HULL_ACTIONS = 5, 4, 72


def hull_problem(seed, integer_keys=False):
  """Keys with interior points, an unsupported action, a repeated key, and
  context 1's first action at the centre (interior: kept only as the zero
  query's greedy action). Returns (true_scores, weights, reference, keys)."""
  rng = np.random.default_rng(seed)
  shape = (HULL_CONTEXTS, HULL_ACTIONS, N_FACTORS)
  keys = (rng.integers(-8, 9, size=shape) if integer_keys else rng.normal(size=shape))
  keys = keys.astype(np.float32)
  keys[1, 0] = 0.0
  keys[2, 5] = keys[2, 7]  # a repeated key: a tie between two actions
  reference = np.ones((HULL_CONTEXTS, HULL_ACTIONS))
  reference[0, [0, 3]] = 0.0  # context 0 starts with an unsupported action
  reference /= reference.sum(axis=1, keepdims=True)
  true_scores = rng.normal(size=(HULL_CONTEXTS, HULL_USERS, HULL_ACTIONS))
  weights = np.full((HULL_CONTEXTS, HULL_USERS), 1.0 / (HULL_CONTEXTS * HULL_USERS))
  return (true_scores.astype(np.float32), weights.astype(np.float32),
          reference.astype(np.float32), keys)


def in_hull_of_others(points, index):
  """Whether ``points[index]`` is a convex combination of the other points (an LP)."""
  from scipy.optimize import linprog

  others = np.delete(points, index, axis=0)
  equalities = np.vstack([others.T, np.ones(len(others))])
  target = np.append(points[index], 1.0)
  return linprog(np.zeros(len(others)), A_eq=equalities, b_eq=target,
                 bounds=(0, None), method="highs").status == 0


@pytest.mark.parametrize("integer_keys", [False, True])
def test_extreme_actions_keep_every_vertex_and_drop_only_interior_points(integer_keys):
  _, _, reference, keys = hull_problem(7, integer_keys)
  kept = metrics.extreme_actions(keys, reference > 0)
  n_dropped = 0
  for c in range(HULL_CONTEXTS):
    supported = np.flatnonzero(reference[c] > 0)
    assert np.all(np.diff(kept[c]) > 0) and set(kept[c]) <= set(supported)
    assert kept[c][0] == supported[0]  # the zero query's greedy action
    points = keys[c, supported].astype(np.float64)
    for position, action in enumerate(supported):
      if action not in kept[c]:
        n_dropped += 1
        assert in_hull_of_others(points, position), (c, action)
      elif not in_hull_of_others(points, position):
        continue  # a vertex, kept
  for c in range(HULL_CONTEXTS):
    supported = np.flatnonzero(reference[c] > 0)
    points = keys[c, supported].astype(np.float64)
    vertices = [a for i, a in enumerate(supported) if not in_hull_of_others(points, i)]
    assert set(vertices) <= set(kept[c]), c
  assert n_dropped > HULL_CONTEXTS * HULL_ACTIONS // 4  # the point: most are left out
  # Padded into one table: ascending rows, repeats only of a row's last action.
  labels = metrics.subset_labels(kept, HULL_ACTIONS)
  assert labels.shape[1] % 8 == 0 and labels.shape[1] >= max(len(row) for row in kept)
  for row, table_row in zip(kept, labels):
    np.testing.assert_array_equal(table_row[:len(row)], row)
    assert np.all(table_row[len(row):] == row[-1])


@pytest.mark.parametrize("action_major", [False, True])
@pytest.mark.parametrize("integer_keys", [False, True])
def test_regret_over_extreme_actions_matches_every_action_double_loop(integer_keys,
                                                                        action_major):
  """Gaussian and small-integer keys (exact float32 scores, so many exact ties),
  random queries, one zero query (every score ties) and tiny ones: the pass
  over the kept actions gives the float64 double loop's first maximiser."""
  true_scores, weights, reference, keys = hull_problem(11, integer_keys)
  rng = np.random.default_rng(12)
  queries = (rng.integers(-1, 2, size=(HULL_CONTEXTS, HULL_USERS, N_FACTORS)) if integer_keys
             else rng.normal(size=(HULL_CONTEXTS, HULL_USERS, N_FACTORS))).astype(np.float32)
  queries[1, 0] = 0.0
  queries[3] *= np.float32(1e-6)
  truth = metrics.truth_tables(jnp.asarray(true_scores), jnp.asarray(weights),
                               jnp.asarray(reference), action_major)
  labels = metrics.subset_labels(metrics.extreme_actions(keys, reference > 0), HULL_ACTIONS)
  subset = metrics.action_subset(truth, jnp.asarray(keys), labels)
  got = np.asarray(metrics.factor_cell_regret(truth, jnp.asarray(queries), jnp.asarray(keys),
                                              subset))
  want = np.zeros((HULL_CONTEXTS, HULL_USERS))
  for c in range(HULL_CONTEXTS):
    support = reference[c] > 0
    for u in range(HULL_USERS):
      scores = np.asarray(keys[c], np.float64) @ np.asarray(queries[c, u], np.float64)
      want[c, u] = true_scores[c, u][support].max() - true_scores[c, u, np_greedy(scores,
                                                                                   support)]
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert labels.shape[1] < HULL_ACTIONS  # the pass left actions out


def test_candidates_hold_the_greedy_action_within_their_radius():
  """Any query closer than the radius keeps its argmax among the K candidates; the radius is
  tight: 1% beyond it, along the worst action's direction, that action overtakes."""
  rng = np.random.default_rng(3)
  true_scores, weights, reference = random_problem(3)
  keys, queries = random_factors(3)
  truth = metrics.truth_tables(jnp.asarray(true_scores), jnp.asarray(weights),
                               jnp.asarray(reference))
  n_candidates = 2
  candidates, radius = jax.jit(metrics.rescore_all, static_argnums=3)(
      truth, jnp.asarray(queries), jnp.asarray(keys), n_candidates)
  candidates, radius = np.asarray(candidates), np.asarray(radius)
  assert candidates.shape == (n_candidates, N_CONTEXTS, N_USERS)
  checked = tight = 0
  for c in range(N_CONTEXTS):
    support = reference[c] > 0
    key = np.asarray(keys[c], np.float64)
    for u in range(N_USERS):
      if weights[c, u] == 0:
        assert radius[c, u] == np.inf
        continue
      query = np.asarray(queries[c, u], np.float64)
      best = np_greedy(key @ query, support)
      assert candidates[0, c, u] == best
      assert all(support[a] for a in candidates[:, c, u])
      for _ in range(50):
        direction = rng.normal(size=N_FACTORS)
        moved = query + 0.999 * radius[c, u] * rng.uniform() * direction / np.linalg.norm(
            direction)
        assert np_greedy(key @ moved, support) in candidates[:, c, u]
        checked += 1
      # Outside the radius: the action that sets it can overtake the greedy one.
      others = [b for b in range(N_ACTIONS) if support[b] and b not in candidates[:, c, u]]
      ratios = [(key[best] @ query - key[b] @ query) / np.linalg.norm(key[b] - key[best])
                for b in others]
      if others:
        worst = others[int(np.argmin(ratios))]
        np.testing.assert_allclose(radius[c, u], min(ratios), rtol=1e-3, atol=1e-4)
        step = key[worst] - key[best]
        moved = query + 1.01 * max(min(ratios), 0) * step / np.linalg.norm(step)
        assert key[worst] @ moved > key[best] @ moved
        tight += 1
  assert checked > 0 and tight > 0


def walk_queries(query, rng, n_steps=40):
  """The random walk of the regret-state tests: steps of scale 0, 0.003, 0.03 and 0.3 in
  turn, with a burst of scale 1 at steps 20-23; yields ``(step, scale, queries)``."""
  for step in range(n_steps):
    scale = 1.0 if 20 <= step < 24 else [0.0, 0.003, 0.03, 0.3][step % 4]
    query = (query + scale * rng.normal(size=query.shape)).astype(np.float32)
    yield step, scale, query


def test_candidate_cache_equals_brute_force_along_a_random_walk():
  """The cached regret equals scoring every action of every cell, round after round, through
  quiet rounds, partial re-scoring, rebuilds and rounds that score every cell while the
  cache is young (all occur); cells of zero weight are never re-scored and report 0."""
  rng = np.random.default_rng(5)
  true_scores, weights, reference = random_problem(5)
  keys, query = random_factors(5)
  truth = metrics.truth_tables(jnp.asarray(true_scores), jnp.asarray(weights),
                               jnp.asarray(reference))
  queries_of = lambda estimate: estimate  # the estimate is the queries: linear
  update = jax.jit(lambda cache, estimate: metrics.update_regret_cache(
      truth, cache, estimate, queries_of, jnp.asarray(keys), 2))
  cache = metrics.empty_regret_cache(N_CONTEXTS, N_USERS, N_ACTIONS, 2, N_FACTORS)
  rescored = []
  for step, _, query in walk_queries(query, rng):
    cache, regret, count = update(cache, jnp.asarray(query))
    expected = np_factor_regret(true_scores, weights, reference, keys, query)
    np.testing.assert_allclose(np.asarray(regret), np.where(weights > 0, expected, 0.0),
                               atol=1e-6, err_msg=f"step {step}")
    rescored.append((int(count), int(cache.age)))
  cells = N_CONTEXTS * N_USERS
  assert rescored[0] == (cells, 0)  # the empty cache is built first
  assert any(n == 0 for n, _ in rescored)
  assert any(0 < n <= 2 for n, _ in rescored)
  # Every cell scored: by rebuilding the cache (age 0), or without it while it is young.
  assert (cells, 0) in rescored[1:]
  assert any(n == cells and age > 0 for n, age in rescored), rescored


def test_a_cell_is_due_only_when_its_own_query_leaves_its_anchor():
  """Distances are measured from each cell's own anchor: a cell whose query jumped far and
  was re-scored there is quiet in the next rounds while its query stays put, and the other
  cells, whose queries never moved, are never due; the regret stays exact throughout."""
  true_scores, weights, reference = random_problem(7)
  keys, query = random_factors(7)
  weights = np.where(weights > 0, weights, 1.0 / weights.size).astype(np.float32)
  truth = metrics.truth_tables(jnp.asarray(true_scores), jnp.asarray(weights),
                               jnp.asarray(reference))
  update = jax.jit(lambda cache, estimate: metrics.update_regret_cache(
      truth, cache, estimate, lambda e: e, jnp.asarray(keys), 4))
  cache = metrics.empty_regret_cache(N_CONTEXTS, N_USERS, N_ACTIONS, 2, N_FACTORS)
  cache, _, count = update(cache, jnp.asarray(query))
  assert int(count) == N_CONTEXTS * N_USERS
  radius = float(cache.radius[1, 2])
  assert np.isfinite(radius)
  jumped = query.copy()
  jumped[1, 2] += np.float32(10 * radius + 1) * np.array([1, -1, 1], np.float32) / np.sqrt(3)
  counts = []
  for _ in range(3):  # the jump, then two rounds at the same queries
    cache, regret, count = update(cache, jnp.asarray(jumped))
    expected = np_factor_regret(true_scores, weights, reference, keys, jumped)
    np.testing.assert_allclose(np.asarray(regret), expected, atol=1e-6)
    counts.append(int(count))
  assert counts == [1, 0, 0], counts
  # The anchor is the query in half precision; the radius kept is the scored one less
  # that rounding error, so distances from the stored anchor stay safe.
  anchor = np.asarray(cache.anchor[:, 1, 2])
  assert anchor.dtype == np.float16
  np.testing.assert_array_equal(anchor, jumped[1, 2].astype(np.float16))
  error = np.linalg.norm(jumped[1, 2].astype(np.float64) - anchor.astype(np.float64))
  assert error > 0
  _, fresh = jax.jit(metrics.rescore_all, static_argnums=3)(
      truth, jnp.asarray(jumped), jnp.asarray(keys), 2)
  np.testing.assert_allclose(float(cache.radius[1, 2]) + error, float(fresh[1, 2]),
                             rtol=1e-6, atol=1e-6)


def test_first_true_lists_the_first_dirty_cells_like_numpy():
  """The compaction behind partial re-scoring: the flat indices of the first ``size`` True
  cells in order, padded with 0, for masks that do and do not fill ``size`` (including
  shapes that are not a multiple of its 128-cell blocks)."""
  rng = np.random.default_rng(11)
  first_true = jax.jit(metrics._first_true, static_argnums=1)
  for shape, density, size in [((7, 45), 0.05, 8), ((7, 45), 0.3, 16), ((100, 100), 0.002, 64),
                               ((100, 100), 0.5, 512), ((3, 5), 0.0, 4)]:
    mask = rng.uniform(size=shape) < density
    expected = np.flatnonzero(mask)[:size]
    expected = np.concatenate([expected, np.zeros(size - len(expected), int)])
    np.testing.assert_array_equal(np.asarray(first_true(jnp.asarray(mask), size)), expected,
                                  err_msg=f"{shape} {density} {size}")


# ---------------------------------------------------------------------------
# The certified pass (native CPU kernel)
# ---------------------------------------------------------------------------


def certified_problem(true_scores, weights, reference, keys, labels=None, query_scale=None):
  """(truth, tables) of the certified pass; ``labels`` default: every supported action."""
  from jaxbandit import native

  status = native.status()
  assert status.available, f"the native kernel (jaxbandit.native) is needed: {status.reason}"
  truth = metrics.truth_tables(jnp.asarray(true_scores), jnp.asarray(weights),
                               jnp.asarray(reference))
  labels = metrics.supported_labels(truth.support) if labels is None else jnp.asarray(labels)
  subset = metrics.action_subset(truth, jnp.asarray(keys), labels)
  return truth, metrics.certified_tables(truth, jnp.asarray(keys), subset, query_scale)


def test_supported_labels_list_each_contexts_support_padded_to_eight():
  support = np.array([[False, True, True, False, True, False],
                      [True, False, False, False, False, False],
                      [True, True, True, True, True, True]])
  got = np.asarray(metrics.supported_labels(jnp.asarray(support)))
  assert got.shape == (3, 8) and got.dtype == np.int32
  for row, supported in zip(got, support):
    actions = np.flatnonzero(supported)
    np.testing.assert_array_equal(row[:len(actions)], actions)
    assert np.all(row[len(actions):] == actions[-1])


def test_certified_cells_equal_brute_force_along_a_random_walk():
  """The certified pass's greedy values equal scoring every supported action of every
  cell in float64 (first maximiser), round after round: quiet rounds (no cell due),
  rounds with a few cells due and rounds with all of them (all occur). Cells of zero
  weight are never scored; a query that has not moved since its cell was scored is
  never due."""
  rng = np.random.default_rng(5)
  true_scores, weights, reference = random_problem(5)
  keys, query = random_factors(5)
  truth, tables = certified_problem(true_scores, weights, reference, keys)
  update = jax.jit(lambda cells, queries: metrics.certified_cell_values(truth, tables, cells,
                                                                        queries))
  cells = metrics.empty_certified_cells(N_CONTEXTS, N_USERS, N_FACTORS)
  weighted = int(np.sum(weights > 0))
  counts = []
  for step, scale, query in walk_queries(query, rng):
    cells, value, count, _ = update(cells, jnp.asarray(query))
    expected = np_factor_regret(true_scores, weights, reference, keys, query)
    got = np.asarray(truth.best) - np.asarray(value)
    np.testing.assert_allclose(got[weights > 0], expected[weights > 0], atol=1e-6,
                               err_msg=f"step {step}")
    assert np.all(np.asarray(value)[weights == 0] == 0.0)  # never scored
    counts.append(int(count))
    if scale == 0.0 and step > 0:
      assert int(count) == 0, (step, counts)  # nothing moved
  assert counts[0] == weighted  # every cell of positive weight is scored first
  assert any(0 < n < weighted for n in counts), counts
  assert max(counts[20:24]) > weighted // 2, str(counts)  # the burst moves most cells


def test_certified_ties_go_to_the_lowest_action_and_the_radius_is_safe():
  """Integer keys and queries make every score exact, ties included: the certified pass
  picks the lowest supported action among maximisers, over the hull's actions (labels
  of extreme points) as over every action. Queries moved by up to 0.999 of a cell's
  radius keep its greedy action; the cell is then not due, and its value stays exact."""
  rng = np.random.default_rng(17)
  true_scores, weights, reference, keys = hull_problem(17, integer_keys=True)
  queries = rng.integers(-4, 5, size=(HULL_CONTEXTS, HULL_USERS, N_FACTORS)).astype(np.float32)
  queries[2, 0] = keys[2, 5] - keys[2, 4]  # towards the repeated key: a tie with actions 5, 7
  hull = metrics.subset_labels(metrics.extreme_actions(keys, reference > 0), HULL_ACTIONS)
  assert hull is not None
  for labels in (None, hull):
    truth, tables = certified_problem(true_scores, weights, reference, keys, labels)
    update = jax.jit(lambda cells, q, truth=truth, tables=tables: metrics.certified_cell_values(
        truth, tables, cells, q))
    cells, value, count, _ = update(metrics.empty_certified_cells(HULL_CONTEXTS, HULL_USERS,
                                                                  N_FACTORS), jnp.asarray(queries))
    assert int(count) == HULL_CONTEXTS * HULL_USERS
    for c in range(HULL_CONTEXTS):
      support = reference[c] > 0
      for u in range(HULL_USERS):
        scores = keys[c].astype(np.float64) @ queries[c, u].astype(np.float64)
        assert float(value[c, u]) == true_scores[c, u, np_greedy(scores, support)], (c, u)
    radius = np.asarray(cells.radius)
    assert np.all(np.isfinite(radius[radius > 0]))
    moved = queries.copy()
    direction = rng.normal(size=queries.shape)
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    moved += (0.999 * np.maximum(radius, 0)[..., None] * direction).astype(np.float32)
    _, again, count, _ = update(cells, jnp.asarray(moved))
    quiet = radius > 0
    assert int(count) == np.sum(~quiet)  # cells with a positive radius stay quiet
    np.testing.assert_array_equal(np.asarray(again), np.asarray(value))
    assert np.any(quiet)


def test_certified_non_finite_query_follows_the_full_pass_and_stays_due():
  """A NaN query: no score beats -inf, so the value is action 0's (the fused pass's rule),
  the cell is due again next round, and a finite query then scores it exactly."""
  true_scores, weights, reference = random_problem(9)
  keys, query = random_factors(9)
  truth, tables = certified_problem(true_scores, weights, reference, keys)
  update = jax.jit(lambda cells, q: metrics.certified_cell_values(truth, tables, cells, q))
  cells, _, _, _ = update(metrics.empty_certified_cells(N_CONTEXTS, N_USERS, N_FACTORS),
                          jnp.asarray(query))
  broken = query.copy()
  broken[0, 0, 1] = np.nan
  cells, value, count, _ = update(cells, jnp.asarray(broken))
  full = metrics.factor_cell_regret(truth, jnp.asarray(broken), jnp.asarray(keys))
  assert int(count) == 1
  assert float(value[0, 0]) == true_scores[0, 0, 0]
  np.testing.assert_allclose(float(truth.best[0, 0] - value[0, 0]), float(full[0, 0]))
  cells, value, count, _ = update(cells, jnp.asarray(query))
  assert int(count) == 1  # only the cell that saw the NaN
  expected = np_factor_regret(true_scores, weights, reference, keys, query)
  np.testing.assert_allclose(float(truth.best[0, 0] - value[0, 0]), expected[0, 0], atol=1e-6)


def test_certified_drift_bound_skips_only_cells_inside_their_radius():
  """With user vectors, the certified pass measures only cells whose allowance ran out.

  Queries ``x_c W_u`` (outer-product form, 19 users: two blocks of eight and a tail,
  a context of zeros) follow a random walk of the vectors ``W_u`` with, every fifth
  step, a move of one user aligned with one context (the bound ``||x_c|| ||dW_u||``
  then holds with equality). At every step: the values equal scoring every supported
  action in float64; the cells, the values and the number re-scored equal those of
  the pass that measures every cell; and every cell left with a positive allowance
  has its query, in float64, at least ``allowance * ||x_c||`` inside its radius. Quiet
  steps measure far fewer cells than carry weight."""
  rng = np.random.default_rng(23)
  n_contexts, n_users, n_actions, d = 6, 19, 24, N_FACTORS
  contexts = rng.normal(size=(n_contexts, d)).astype(np.float32)
  contexts[4] = 0.0
  vectors = rng.normal(size=(n_users, d, d)).astype(np.float32)
  keys = rng.normal(size=(n_contexts, n_actions, d)).astype(np.float32)
  true_scores = rng.normal(size=(n_contexts, n_users, n_actions)).astype(np.float32)
  weights = np.full((n_contexts, n_users), 1.0 / (n_contexts * n_users), np.float32)
  weights[:, 5] = 0.0
  reference = np.ones((n_contexts, n_actions))
  reference[1, [0, 7]] = 0.0
  scale = (np.sqrt(np.sum(contexts.astype(np.float64)**2, axis=1)) * (1 + 1e-6)).astype(np.float32)
  truth, measured_tables = certified_problem(true_scores, weights, reference, keys)
  _, drift_tables = certified_problem(true_scores, weights, reference, keys, query_scale=scale)
  update = jax.jit(lambda cells, q, w, tables: metrics.certified_cell_values(
      truth, tables, cells, q, w))
  every = metrics.empty_certified_cells(n_contexts, n_users, d, d * d)
  drifting = every
  weighted = int(np.sum(weights > 0))
  measured = []
  for step in range(60):
    if step % 5 == 4:  # one user along one context: the bound is tight for that cell
      c, u = [0, 1, 2, 3, 5][(step // 5) % 5], step % n_users
      radius = float(np.asarray(drifting.radius)[c, u])
      size = 0.4 * (radius if np.isfinite(radius) and radius > 0 else 0.1) / scale[c]
      move = np.outer(contexts[c], rng.normal(size=d))
      vectors[u] += (size * move / np.linalg.norm(move)).astype(np.float32)
    else:
      size = 1.0 if 30 <= step < 32 else [0.0, 1e-4, 1e-3, 1e-2][step % 4]
      vectors += (size * rng.normal(size=vectors.shape)).astype(np.float32)
    queries = np.einsum("ci,uij->cuj", contexts, vectors).astype(np.float32)
    flat = jnp.asarray(vectors.reshape(n_users, d * d))
    every, value, due, checked = update(every, jnp.asarray(queries), jnp.zeros_like(flat),
                                        measured_tables)
    drifting, drift_value, drift_due, drift_checked = update(
        drifting, jnp.asarray(queries), flat, drift_tables)
    expected = np_factor_regret(true_scores, weights, reference, keys, queries)
    got = np.asarray(truth.best) - np.asarray(drift_value)
    np.testing.assert_allclose(got[weights > 0], expected[weights > 0], atol=1e-6,
                               err_msg=f"step {step}")
    assert int(checked) == weighted
    assert int(drift_due) == int(due) and int(due) <= int(drift_checked) <= weighted, step
    for name in ("anchor", "radius", "value"):
      np.testing.assert_array_equal(np.asarray(getattr(drifting, name)),
                                    np.asarray(getattr(every, name)), err_msg=f"{name} {step}")
    allowance = np.asarray(drifting.allowance, np.float64)
    inside = (allowance > 0) & (weights > 0)
    distance = np.linalg.norm(queries.astype(np.float64) -
                              np.asarray(drifting.anchor, np.float64), axis=-1)
    with np.errstate(invalid="ignore"):  # context 4: inf * 0
      reach = np.where(scale[:, None] > 0, allowance * scale[:, None], 0.0)
    margin = np.asarray(drifting.radius, np.float64) - distance - reach
    assert np.all(margin[inside] >= 0), (step, margin[inside].min())
    measured.append(int(drift_checked))
  assert measured[0] == weighted
  assert min(measured[1:]) < weighted // 4, measured


def test_certified_tables_need_label_rows_a_multiple_of_eight_wide():
  true_scores, weights, reference = random_problem(3)
  keys, _ = random_factors(3)
  truth = metrics.truth_tables(jnp.asarray(true_scores), jnp.asarray(weights),
                               jnp.asarray(reference))
  subset = metrics.action_subset(truth, jnp.asarray(keys),
                                 jnp.zeros((N_CONTEXTS, 5), jnp.int32))
  with pytest.raises(ValueError, match="multiple of 8 wide, got 5"):
    metrics.certified_tables(truth, jnp.asarray(keys), subset)
