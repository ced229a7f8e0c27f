"""Tests of jaxbandit.instance against float64 NumPy references written here.

Tolerances: scores and gaps are float32 arithmetic on O(1) numbers, compared
with float64 references at atol 1e-5 (a few float32 ulps times the short sums
involved); eigenvalues at 1e-6 relative to the largest (they are computed in
float64 from the float32 heads, so only the inputs are rounded).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxbandit import instance as I
from jaxbandit import learners as L

from conftest import TINY_SIZES

pytestmark = pytest.mark.usefixtures("strict_jax")

ATOL = 1e-5


# ---------------------------------------------------------------------------
# Independent NumPy references
# ---------------------------------------------------------------------------


def arrays64(inst):
  """The instance's arrays as float64 NumPy arrays (a dict)."""
  return {name: np.asarray(value, np.float64) for name, value in inst._asdict().items()}


def np_true_scores(inst):
  """R*[x, i, a] = s * x^T (sum_j h_ij M_j) a by explicit loops."""
  arr = arrays64(inst)
  contexts, actions, maps, heads = arr["contexts"], arr["actions"], arr["maps"], arr["heads"]
  n_contexts, n_actions, _ = actions.shape
  n_users = heads.shape[0]
  out = np.zeros((n_contexts, n_users, n_actions))
  for c in range(n_contexts):
    for u in range(n_users):
      user_map = np.tensordot(heads[u], maps, axes=1)  # sum_j h_uj M_j, (d, d)
      for a in range(n_actions):
        out[c, u, a] = contexts[c] @ user_map @ actions[c, a]
  return float(arr["reward_scale"]) * out


def np_latent_features(inst):
  """z_j(x, a) = x^T M_j a, (n_contexts, n_actions, latent_dim)."""
  arr = arrays64(inst)
  return np.einsum("cp,jpq,caq->caj", arr["contexts"], arr["maps"], arr["actions"])


def np_greedy(scores, support):
  """Lowest index among the supported maximisers, by an explicit loop."""
  scores = np.asarray(scores)
  out = np.zeros(scores.shape[:-1], np.int64)
  for idx in np.ndindex(*scores.shape[:-1]):
    allowed = np.flatnonzero(support[idx[-2]])
    values = scores[idx][allowed]
    out[idx] = allowed[np.flatnonzero(values == values.max())[0]]
  return out


def np_gaps(inst):
  """Best minus second-best supported true score per cell; inf for a single action."""
  scores = np_true_scores(inst)
  support = np.asarray(inst.reference_policy) > 0
  out = np.zeros(scores.shape[:2])
  for c in range(scores.shape[0]):
    for u in range(scores.shape[1]):
      values = np.sort(scores[c, u, support[c]])[::-1]
      out[c, u] = values[0] - values[1] if values.size > 1 else np.inf
  return out


def np_gap_summary(inst):
  """(Delta_min, delta, eps_iso) over cells of positive weight."""
  weights = np.outer(np.asarray(inst.context_weights, np.float64),
                     np.asarray(inst.user_weights, np.float64))
  positive = weights > 0
  min_gap = np_gaps(inst)[positive].min()
  min_weight = weights[positive].min()
  return min_gap, min_weight, min_gap * min_weight


def np_diversity(inst, rtol=1e-6):
  """Gram eigen-diagnostics and the decision-relevant restriction (one runner-up)."""
  arr = arrays64(inst)
  heads, rho = arr["heads"], arr["user_weights"]
  gram = heads.T @ np.diag(rho) @ heads
  eig = np.linalg.eigvalsh(gram)
  scores = np_true_scores(inst)
  z = np_latent_features(inst)
  support = arr["reference_policy"] > 0
  diffs = []
  for c in range(scores.shape[0]):
    for u in range(scores.shape[1]):
      if arr["context_weights"][c] * rho[u] <= 0:
        continue
      allowed = np.flatnonzero(support[c])
      if allowed.size < 2:
        continue
      ranked = allowed[np.argsort(-scores[c, u, allowed])]
      diffs.append(z[c, ranked[0]] - z[c, ranked[1]])
  basis = scipy.linalg.orth(np.array(diffs).T, rcond=rtol)  # (J, r), orthonormal columns
  eig_rel = np.linalg.eigvalsh(basis.T @ gram @ basis)
  return eig, basis.shape[1], eig_rel


def np_regret(inst, estimate):
  """G(R) = sum_{x,i} d0[x] rho[i] (R*[x,i,a*] - R*[x,i,a_R]) with lowest-index ties."""
  truth = np_true_scores(inst)
  support = np.asarray(inst.reference_policy) > 0
  best = np_greedy(truth, support)
  chosen = np_greedy(estimate, support)
  loss = (np.take_along_axis(truth, best[..., None], -1) -
          np.take_along_axis(truth, chosen[..., None], -1))[..., 0]
  weights = np.outer(np.asarray(inst.context_weights, np.float64),
                     np.asarray(inst.user_weights, np.float64))
  return float(np.sum(weights * loss))


# ---------------------------------------------------------------------------
# Scores, greedy selector, gaps
# ---------------------------------------------------------------------------


def test_sizes_and_dtypes(tiny_instance):
  inst = tiny_instance
  assert (inst.n_contexts, inst.n_actions, inst.dim, inst.latent_dim, inst.n_users) == (
      4, 5, 2, 3, 3)
  for leaf in jax.tree_util.tree_leaves(inst):
    assert leaf.dtype == jnp.float32
  assert inst.actions.shape == (4, 5, 2)
  assert inst.maps.shape == (3, 2, 2)


def test_true_scores_match_loop_formula(tiny_instance):
  inst = tiny_instance._replace(reward_scale=jnp.float32(2.5))
  got = np.asarray(I.true_scores(inst))
  assert got.shape == (4, 3, 5)
  np.testing.assert_allclose(got, np_true_scores(inst), rtol=1e-5, atol=ATOL)
  np.testing.assert_allclose(np.asarray(I.latent_features(inst)), np_latent_features(inst),
                             rtol=1e-5, atol=ATOL)


def test_greedy_actions_exact_ties_go_to_lowest_supported_index(rng):
  # Integer scores in {0, 1, 2} give many exact ties; the support removes
  # some maximisers, including index 0, so "first supported maximiser" matters.
  scores = rng.integers(0, 3, size=(2, 4, 3, 6)).astype(np.float32)  # (batch, C, U, A)
  support = rng.random((4, 6)) < 0.6
  support[:, 0] = False
  support[np.arange(4), rng.integers(1, 6, size=4)] = True  # at least one action per row
  got = np.asarray(I.greedy_actions(jnp.asarray(scores), jnp.asarray(support)))
  assert got.dtype == np.int32 and got.shape == (2, 4, 3)
  np.testing.assert_array_equal(got, np_greedy(scores, support))
  # A hand-made row: the maximum 9 sits outside the support, 3 ties at 2 and 4.
  row = jnp.asarray([[[9.0, 1.0, 3.0, 0.0, 3.0]]])
  mask = jnp.asarray([[False, True, True, True, True]])
  assert int(I.greedy_actions(row, mask)[0, 0]) == 2


def test_gaps_and_gap_summary_use_only_positive_weight_cells(tiny_instance):
  base = tiny_instance
  # Context 1 supports a single action (gap inf); context 3 supports three.
  policy = np.full((4, 5), 0.2)
  policy[1] = [0.0, 0.0, 1.0, 0.0, 0.0]
  policy[3] = [0.5, 0.0, 0.25, 0.25, 0.0]
  inst = base._replace(reference_policy=jnp.asarray(policy, jnp.float32))
  ref_gaps = np_gaps(inst)
  got = np.asarray(I.gaps(inst))
  assert np.all(np.isinf(got[1])) and np.all(np.isinf(ref_gaps[1]))
  finite = np.isfinite(ref_gaps)
  np.testing.assert_allclose(got[finite], ref_gaps[finite], atol=ATOL)

  # Give zero weight to the user and the context holding the smallest gaps,
  # so that restricting to positive weight changes the answer.
  worst_context, worst_user = np.unravel_index(np.argmin(ref_gaps), ref_gaps.shape)
  user_weights = np.array([0.5, 0.3, 0.2])
  user_weights[worst_user] = 0.0
  user_weights /= user_weights.sum()
  context_weights = np.array([0.1, 0.2, 0.3, 0.4])
  weighted = inst._replace(user_weights=jnp.asarray(user_weights, jnp.float32),
                           context_weights=jnp.asarray(context_weights, jnp.float32))
  summary = I.gap_summary(weighted)
  min_gap, min_weight, eps_iso = np_gap_summary(weighted)
  assert summary.min_gap > ref_gaps.min() + 1e-4  # the zero-weight cell was excluded
  assert summary.min_gap == pytest.approx(min_gap, abs=ATOL)
  assert summary.min_cell_weight == pytest.approx(min_weight, rel=1e-6)
  assert min_weight == pytest.approx(0.1 * np.min(user_weights[user_weights > 0]))
  assert summary.eps_iso == pytest.approx(eps_iso, rel=1e-5, abs=1e-7)


def test_single_action_instance_has_infinite_gap(tiny_instance):
  inst = tiny_instance._replace(actions=tiny_instance.actions[:, :1],
                                reference_policy=jnp.ones((4, 1), jnp.float32))
  assert np.all(np.isinf(np.asarray(I.gaps(inst))))
  assert np.isinf(I.gap_summary(inst).min_gap)


# ---------------------------------------------------------------------------
# Minimum-gap acceptance
# ---------------------------------------------------------------------------

SMALL = TINY_SIZES  # the shared shape: make_instance and gap_summary are compiled once


def test_accept_problem_seed_returns_first_seed_reaching_min_gap():
  start = 11
  seen = []  # NumPy minimum gaps of seeds start, start + 1, ...
  target = None
  for seed in range(start, start + 40):
    seen.append(np_gap_summary(I.make_instance(jax.random.key(seed), **SMALL))[0])
    # The first seed after `start` whose gap beats every earlier one: aim
    # min_gap between the earlier record and it, so that seed is the answer.
    if len(seen) >= 3 and seen[-1] > max(seen[:-1]) + 1e-3:
      target = seed
      break
  assert target is not None, "no record seed found; pick another start"
  min_gap = 0.5 * (seen[-1] + max(seen[:-1]))
  result = I.accept_problem_seed(start, min_gap=min_gap, **SMALL)
  assert result.seed == target
  assert result.tries == target - start + 1
  assert result.gap.min_gap >= min_gap
  assert result.gap.min_gap == pytest.approx(seen[-1], abs=ATOL)
  np.testing.assert_array_equal(
      np.asarray(result.instance.contexts),
      np.asarray(I.make_instance(jax.random.key(target), **SMALL).contexts))
  # min_gap = 0 accepts the first seed.
  first = I.accept_problem_seed(start, min_gap=0.0, **SMALL)
  assert (first.seed, first.tries) == (start, 1)


def test_accept_problem_seed_unreachable_gap_raises_quickly():
  began = time.perf_counter()
  with pytest.raises(ValueError, match=r"min_gap=.*max_tries=4"):
    I.accept_problem_seed(0, min_gap=1e6, max_tries=4, **SMALL)
  assert time.perf_counter() - began < 30.0
  for name, kwargs in (("max_tries", dict(min_gap=0.1, max_tries=0)),
                       ("min_gap", dict(min_gap=-1.0)),
                       ("min_gap", dict(min_gap=float("nan"))),
                       ("problem_seed", dict(min_gap=0.1, problem_seed=-1))):
    kwargs = dict(kwargs)
    seed = kwargs.pop("problem_seed", 0)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
      I.accept_problem_seed(seed, **kwargs, **SMALL)


# ---------------------------------------------------------------------------
# Head generators and diversity diagnostics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_heads_have_the_requested_rank(rank):
  heads = np.asarray(I.low_rank_heads(rank)(jax.random.key(rank), 6, 4), np.float64)
  assert heads.shape == (6, 4)
  assert np.linalg.matrix_rank(heads, tol=1e-5 * np.abs(heads).max()) == rank


def test_gaussian_heads_full_rank_and_scaled():
  heads = np.asarray(I.gaussian_heads()(jax.random.key(1), 400, 5), np.float64)
  assert np.linalg.matrix_rank(heads) == 5
  assert np.linalg.matrix_rank(heads[:3]) == 3  # fewer users than directions: rank n_users
  # Entries N(0, 1/latent_dim): the sample variance of 2000 entries is within
  # 5 standard errors (sd of a variance estimate ~ sigma^2 sqrt(2/n)).
  variance = heads.var()
  assert abs(variance - 0.2) < 5 * 0.2 * np.sqrt(2 / heads.size)
  assert abs(heads.mean()) < 5 * np.sqrt(0.2 / heads.size)


def test_supplied_heads_are_used_and_checked():
  given = np.arange(6.0).reshape(3, 2) / 10
  out = I.supplied_heads(given)(jax.random.key(0), 3, 2)
  np.testing.assert_array_equal(np.asarray(out), given.astype(np.float32))
  with pytest.raises(ValueError, match=r"\bheads\b.*\(3, 2\)"):
    I.supplied_heads(given)(jax.random.key(0), 3, 3)
  with pytest.raises(ValueError, match=r"\bheads\b"):
    I.supplied_heads(np.ones(3))
  bad = given.copy()
  bad[1, 1] = np.nan
  with pytest.raises(ValueError, match=r"\bheads\b.*non-finite"):
    I.supplied_heads(bad)
  given3 = np.arange(9.0).reshape(3, 3) / 10
  inst = I.make_instance(jax.random.key(0), **TINY_SIZES, heads=I.supplied_heads(given3))
  np.testing.assert_array_equal(np.asarray(inst.heads), given3.astype(np.float32))


def test_diversity_diagnostics_match_numpy_eigvalsh(tiny_instance):
  inst = tiny_instance._replace(user_weights=jnp.asarray([0.5, 0.3, 0.2], jnp.float32))
  diag = I.diversity_diagnostics(inst)
  eig, rel_dim, eig_rel = np_diversity(inst)
  scale = eig[-1]
  assert diag.gram_rank == 3
  assert diag.gram_min_eigenvalue == pytest.approx(eig[0], abs=1e-6 * scale)
  assert diag.gram_condition_number == pytest.approx(eig[-1] / eig[0], rel=1e-5)
  assert diag.relevant_dim == rel_dim
  assert diag.relevant_min_eigenvalue == pytest.approx(eig_rel[0], abs=1e-6 * scale)
  assert diag.relevant_condition_number == pytest.approx(eig_rel[-1] / eig_rel[0], rel=1e-5)


def test_rank_deficient_population_has_zero_min_eigenvalue(tiny_instance):
  # Three users whose heads all lie on one line of R^3.
  heads = np.outer([1.0, -0.5, 2.0], [0.3, -0.6, 0.2])
  inst = tiny_instance._replace(heads=jnp.asarray(heads, jnp.float32))
  diag = I.diversity_diagnostics(inst)
  eig, _, _ = np_diversity(inst)
  assert diag.gram_rank == 1
  assert abs(diag.gram_min_eigenvalue) < 1e-6 * eig[-1]
  assert diag.gram_condition_number == float("inf")
  assert diag.to_dict()["gram_condition_number"] == "inf"


# ---------------------------------------------------------------------------
# Padding, stacking and the one-user special case
# ---------------------------------------------------------------------------


def _bt_data(inst, rng, n_rows):
  """Bradley-Terry observations drawn in NumPy from the true scores."""
  truth = np_true_scores(inst)
  n_contexts, n_users, n_actions = truth.shape
  contexts = rng.integers(0, n_contexts, n_rows)
  users = rng.integers(0, n_users, n_rows)
  slates = np.stack([rng.choice(n_actions, 2, replace=False) for _ in range(n_rows)])
  utilities = truth[contexts[:, None], users[:, None], slates]
  p_first = 1 / (1 + np.exp(utilities[:, 1] - utilities[:, 0]))
  outcomes = np.where(rng.random(n_rows) < p_first, 0, 1)[:, None]
  as32 = lambda v: jnp.asarray(v, jnp.int32)
  return L.ChoiceData(as32(contexts), as32(users), as32(slates), as32(outcomes),
                      jnp.ones(n_rows, jnp.bool_))


def test_padded_users_change_no_result(tiny_instance, rng, jit_fit):
  inst = tiny_instance._replace(user_weights=jnp.asarray([0.5, 0.3, 0.2], jnp.float32))
  padded = I.pad_users(inst, 5)
  assert padded.n_users == 5
  np.testing.assert_array_equal(np.asarray(padded.user_weights[3:]), 0.0)
  np.testing.assert_array_equal(np.asarray(padded.heads[3:]), 0.0)
  np.testing.assert_array_equal(np.asarray(padded.heads[:3]), np.asarray(inst.heads))

  np.testing.assert_allclose(np.asarray(I.gaps(padded))[:, :3], np.asarray(I.gaps(inst)),
                             atol=1e-6)
  assert I.gap_summary(padded) == pytest.approx(I.gap_summary(inst), rel=1e-6)
  diag, diag_padded = I.diversity_diagnostics(inst), I.diversity_diagnostics(padded)
  assert diag_padded == pytest.approx(diag, rel=1e-6, abs=1e-9)

  # Regret of an arbitrary estimate: whatever the padded users' estimated
  # scores, the population regret is unchanged.
  estimate = np_true_scores(inst) + rng.normal(scale=0.5, size=(4, 3, 5))
  garbage = rng.normal(scale=10.0, size=(4, 2, 5))
  assert np_regret(padded, np.concatenate([estimate, garbage], 1)) == pytest.approx(
      np_regret(inst, estimate), rel=1e-6)
  chosen = I.greedy_actions(jnp.asarray(estimate, jnp.float32), I.support_mask(inst))
  chosen_padded = I.greedy_actions(jnp.asarray(np.concatenate([estimate, garbage], 1),
                                               jnp.float32), I.support_mask(padded))
  np.testing.assert_array_equal(np.asarray(chosen_padded)[:, :3], np.asarray(chosen))

  # Exact ERM on the same data (users 0..2 only) gives the same fit.
  data = _bt_data(inst, rng, 150)
  fit_bt = jit_fit("bradley_terry")
  for name in ("known_heads", "per_user_bilinear"):
    model, model_padded = L.make_model_class(name, inst), L.make_model_class(name, padded)
    fit = fit_bt(model, jnp.zeros(model.param_shape), data, 1.0)
    fit_padded = fit_bt(model_padded, jnp.zeros(model_padded.param_shape), data, 1.0)
    assert bool(fit.converged) and bool(fit_padded.converged)
    rows = fit.params.shape[0]
    np.testing.assert_allclose(np.asarray(fit_padded.params)[:rows], np.asarray(fit.params),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(fit_padded.params)[rows:], 0.0)


def test_stack_instances_pads_to_largest_population(tiny_instance):
  large = tiny_instance
  small = I.make_instance(jax.random.key(7), **dict(TINY_SIZES, n_users=2))
  stacked = I.stack_instances([small, large])
  assert stacked.heads.shape == (2, 3, 3)
  assert stacked.user_weights.shape == (2, 3)
  np.testing.assert_allclose(np.asarray(stacked.user_weights[0]), [0.5, 0.5, 0.0])
  batched_gaps = np.asarray(jax.vmap(I.gaps)(stacked))
  np.testing.assert_allclose(batched_gaps[0, :, :2], np_gaps(small), atol=ATOL)
  np.testing.assert_allclose(batched_gaps[1], np_gaps(large), atol=ATOL)
  with pytest.raises(ValueError, match="instances"):
    I.stack_instances([])
  other = small._replace(contexts=small.contexts[:2], actions=small.actions[:2])
  with pytest.raises(ValueError, match="n_contexts"):
    I.stack_instances([small, other])
  with pytest.raises(ValueError, match=r"\bn_users\b"):
    I.pad_users(large, 2)


def test_one_user_instance_is_the_non_personalized_case(tiny_instance):
  inst = I.from_arrays(contexts=tiny_instance.contexts, actions=tiny_instance.actions,
                       maps=tiny_instance.maps, heads=tiny_instance.heads[1:2])
  assert inst.heads.shape == (1, 3)
  np.testing.assert_allclose(np.asarray(I.true_scores(inst)), np_true_scores(inst),
                             rtol=1e-5, atol=ATOL)
  min_gap, min_weight, _ = np_gap_summary(inst)
  summary = I.gap_summary(inst)
  assert summary.min_gap == pytest.approx(min_gap, abs=ATOL)
  assert summary.min_cell_weight == pytest.approx(0.25, rel=1e-6)
  diag = I.diversity_diagnostics(inst)
  assert diag.gram_rank == 1 and diag.gram_condition_number == float("inf")
  assert diag.relevant_dim >= 1


# ---------------------------------------------------------------------------
# Validation: every error names its parameter
# ---------------------------------------------------------------------------

BAD_MAKE_ARGS = [
    ("n_contexts", dict(n_contexts=0)),
    ("n_actions", dict(n_actions=-2)),
    ("dim", dict(dim=1.5)),
    ("latent_dim", dict(latent_dim="3")),
    ("n_users", dict(n_users=True)),
    ("reward_scale", dict(reward_scale=0.0)),
    ("reward_scale", dict(reward_scale=float("inf"))),
    ("user_weights", dict(user_weights=[-0.5, 1.0, 0.5])),
    ("user_weights", dict(user_weights=[0.2, 0.2, 0.2])),
    ("user_weights", dict(user_weights=[0.5, 0.5])),
    ("context_weights", dict(context_weights=[np.nan, 0.5, 0.25, 0.25])),
    ("context_weights", dict(context_weights=[[0.25] * 4])),
    ("reference_policy", dict(reference_policy=np.full((4, 4), 0.25))),
    ("reference_policy", dict(reference_policy=[0.5, 0.5, 0.5, -0.5, 0.0])),
    ("reference_policy", dict(reference_policy=[0.1, 0.1, 0.1, 0.1, 0.1])),
    ("reference_policy", dict(reference_policy=[np.inf, 0.0, 0.0, 0.0, 0.0])),
    ("rank", dict(heads=I.low_rank_heads(4))),
]


@pytest.mark.parametrize("name,override", BAD_MAKE_ARGS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_MAKE_ARGS)])
def test_make_instance_rejects_bad_input(name, override):
  with pytest.raises(ValueError, match=rf"\b{name}\b"):
    I.make_instance(jax.random.key(0), **dict(TINY_SIZES, **override))


def test_low_rank_heads_rejects_bad_rank():
  with pytest.raises(ValueError, match=r"\brank\b"):
    I.low_rank_heads(0)


def _good_arrays(rng):
  return dict(contexts=rng.normal(size=(4, 2)), actions=rng.normal(size=(4, 5, 2)),
              maps=rng.normal(size=(3, 2, 2)), heads=rng.normal(size=(3, 3)))


def test_from_arrays_matches_inputs(rng):
  arrays = _good_arrays(rng)
  inst = I.from_arrays(**arrays, reward_scale=2.0, user_weights=[0.2, 0.3, 0.5])
  for name, value in arrays.items():
    np.testing.assert_array_equal(np.asarray(getattr(inst, name)), value.astype(np.float32))
  np.testing.assert_allclose(np.asarray(inst.reference_policy), 0.2)
  np.testing.assert_allclose(np.asarray(I.true_scores(inst)), np_true_scores(inst),
                             rtol=1e-5, atol=ATOL)


BAD_ARRAYS = [
    ("contexts", lambda a: a.update(contexts=a["contexts"][0])),
    ("actions", lambda a: a.update(actions=a["actions"][:, :, :1])),
    ("actions", lambda a: a.update(actions=a["actions"][:3])),
    ("maps", lambda a: a.update(maps=a["maps"][:, :1])),
    ("heads", lambda a: a.update(heads=a["heads"][:, :2])),
    ("contexts", lambda a: a["contexts"].__setitem__((1, 0), np.nan)),
    ("actions", lambda a: a["actions"].__setitem__((0, 2, 1), np.inf)),
    ("maps", lambda a: a["maps"].__setitem__((2, 1, 1), np.nan)),
    ("heads", lambda a: a["heads"].__setitem__((0, 0), -np.inf)),
    ("reward_scale", lambda a: a.update(reward_scale=-1.0)),
    ("reward_scale", lambda a: a.update(reward_scale=np.nan)),
    ("context_weights", lambda a: a.update(context_weights=[0.5, 0.5, 0.5, -0.5])),
    ("user_weights", lambda a: a.update(user_weights=[1.0, 1.0, 1.0])),
    ("reference_policy", lambda a: a.update(reference_policy=np.full((4, 5), np.nan))),
]


@pytest.mark.parametrize("name,corrupt", BAD_ARRAYS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARRAYS)])
def test_from_arrays_rejects_bad_input(name, corrupt, rng):
  arrays = _good_arrays(rng)
  corrupt(arrays)
  with pytest.raises(ValueError, match=rf"\b{name}\b"):
    I.from_arrays(**arrays)
