"""Tests of jaxbandit.learners: model scores and exact ERM against SciPy and statsmodels.

The reference objective is written here in float64 NumPy: every model class is
a linear model ``u[n, k] = Phi[n, k, :] . vec(Theta)`` whose design tensor
``Phi`` is built from the instance arrays directly (table in the learners
docstring), and the penalised negative log-likelihood of a ranking is the
Plackett-Luce sum of stage log-softmaxes. ``scipy.optimize.minimize``
(``trust-exact``, analytic gradient and Hessian, gtol 1e-10) minimises it.

Tolerance for fitted parameters: 1e-4 relative (an iterative float32 solver
against a float64 one) at ``tol=1e-12``; at fit_erm's default ``tol`` the
documented suboptimality bound is checked instead, and parameters to 1e-3
(the default stops about one Newton step early: up to ~2e-4 relative error
seen on this data). Vmapped against looped fits: 1e-5.

Each (model class, choice model) pair costs one XLA compilation of the
solver (about 4 s on 2 cores), so the default run fits one pair per model
class that between them use every choice model; the rest of the cross product
is marked slow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import statsmodels.api as sm
from scipy import optimize, special

from jaxbandit import choice as C
from jaxbandit import instance as I
from jaxbandit import learners as L

from conftest import DEFAULT_TOL, TINY_SIZES, jit_fit_traces

pytestmark = pytest.mark.usefixtures("strict_jax")

N_ROWS = 150
MAX_ITERATIONS = 30  # fit_erm's default budget
TIGHT_TOL = 1e-12  # float32 reaches it here with margin (final decrements ~1e-11 * n)
CHOICES = {  # name -> (top_m, slate size)
    "bradley_terry": (None, 2),
    "multinomial_logit": (None, 3),
    "plackett_luce": (None, 3),
}
# One fit per model class in the default run; every choice model appears.
DEFAULT_PAIRS = [("known_heads", "bradley_terry"), ("known_directions", "multinomial_logit"),
                 ("per_user_bilinear", "plackett_luce"), ("pooled", "multinomial_logit")]
ALL_PAIRS = [(m, c) for m in L.MODEL_CLASSES for c in CHOICES]
PAIRS = [pytest.param(m, c, id=f"{m}-{c}",
                      marks=() if (m, c) in DEFAULT_PAIRS else pytest.mark.slow)
         for m, c in ALL_PAIRS]


# ---------------------------------------------------------------------------
# Independent NumPy model: features, scores, objective
# ---------------------------------------------------------------------------


def np_arrays(inst):
  return {name: np.asarray(value, np.float64) for name, value in inst._asdict().items()}


def np_truth(inst):
  arr = np_arrays(inst)
  user_maps = np.einsum("uj,jpq->upq", arr["heads"], arr["maps"])
  return arr["reward_scale"] * np.einsum("cp,upq,caq->cua", arr["contexts"], user_maps,
                                         arr["actions"])


def np_explicit_scores(name, inst, theta):
  """R[x, i, a] = e_i^T Theta f(x, a), written per class as a bilinear form."""
  arr = np_arrays(inst)
  x, a, maps, heads = arr["contexts"], arr["actions"], arr["maps"], arr["heads"]
  d = x.shape[1]
  n_users = heads.shape[0]
  theta = np.asarray(theta, np.float64)
  if name == "known_heads":  # Theta = M_hat (J, d*d); user map sum_j h_ij M_hat_j
    user_maps = np.einsum("uj,jpq->upq", heads, theta.reshape(-1, d, d))
  elif name == "per_user_bilinear":  # row i is user i's d x d matrix
    user_maps = theta.reshape(n_users, d, d)
  elif name == "pooled":  # one matrix for everyone
    user_maps = np.repeat(theta.reshape(1, d, d), n_users, axis=0)
  else:  # known_directions: Theta = H_hat (U, J) over the true directions z_j = x^T M_j a
    z = np.einsum("cp,jpq,caq->caj", x, maps, a)
    return np.einsum("uj,caj->cua", theta, z)
  return np.einsum("cp,upq,caq->cua", x, user_maps, a)


def np_design(name, inst, data):
  """Phi (n, K, P) with utilities = Phi @ Theta.ravel() (row-major Theta)."""
  arr = np_arrays(inst)
  x, a, maps, heads = arr["contexts"], arr["actions"], arr["maps"], arr["heads"]
  n_users = heads.shape[0]
  contexts = np.asarray(data.contexts)
  users = np.asarray(data.users)
  slates = np.asarray(data.slates)
  outer = np.einsum("np,nkq->nkpq", x[contexts], a[contexts[:, None], slates])
  outer = outer.reshape(outer.shape[:2] + (-1,))  # (n, K, d*d): f = outer(x, a).ravel()
  one_hot = np.eye(n_users)[users]  # (n, U)
  if name == "known_heads":
    return np.einsum("nj,nkq->nkjq", heads[users], outer).reshape(outer.shape[:2] + (-1,))
  if name == "pooled":
    return outer
  if name == "per_user_bilinear":
    return np.einsum("nu,nkq->nkuq", one_hot, outer).reshape(outer.shape[:2] + (-1,))
  z = np.einsum("np,jpq,nkq->nkj", x[contexts], maps, a[contexts[:, None], slates])
  return np.einsum("nu,nkj->nkuj", one_hot, z).reshape(z.shape[:2] + (-1,))


def np_nll_parts(utilities, outcomes, mask):
  """Sum of -log P(outcome) with its gradient and Hessian w.r.t. the utilities."""
  n, size = utilities.shape
  remaining = np.ones((n, size), bool)
  rows = np.arange(n)
  nll = np.zeros(n)
  grad = np.zeros((n, size))
  hess = np.zeros((n, size, size))
  for stage in range(outcomes.shape[1]):
    chosen = outcomes[:, stage]
    masked = np.where(remaining, utilities, -np.inf)
    log_norm = special.logsumexp(masked, axis=1)
    probs = np.where(remaining, np.exp(masked - log_norm[:, None]), 0.0)
    nll += log_norm - utilities[rows, chosen]
    grad += probs
    grad[rows, chosen] -= 1.0
    hess += np.einsum("nk,kl->nkl", probs, np.eye(size)) - np.einsum("nk,nl->nkl", probs, probs)
    remaining[rows, chosen] = False
  live = np.asarray(mask, np.float64)
  return np.sum(live * nll), grad * live[:, None], hess * live[:, None, None]


def np_objective(design, outcomes, mask, ridge):
  """(value, gradient, Hessian) of sum NLL + ridge/2 ||theta||^2 as functions of theta."""
  outcomes = np.asarray(outcomes)

  def parts(theta):
    utilities = design @ theta
    value, grad_u, hess_u = np_nll_parts(utilities, outcomes, mask)
    value += 0.5 * ridge * theta @ theta
    grad = np.einsum("nkp,nk->p", design, grad_u) + ridge * theta
    hess = np.einsum("nkp,nkl,nlq->pq", design, hess_u, design) + ridge * np.eye(theta.size)
    return value, grad, hess

  return parts


def scipy_erm(design, outcomes, mask, ridge):
  parts = np_objective(design, outcomes, mask, ridge)
  result = optimize.minimize(lambda t: parts(t)[:2], np.zeros(design.shape[-1]), jac=True,
                             hess=lambda t: parts(t)[2], method="trust-exact",
                             options={"gtol": 1e-9, "maxiter": 500})
  # trust-exact sometimes stops with "bad approximation" at a gradient of
  # ~1e-6; two float64 Newton steps from there reach the rounding floor.
  assert result.success or "approximation" in result.message, result.message
  assert np.max(np.abs(parts(result.x)[1])) < 1e-4
  theta = result.x
  for _ in range(2):
    _, grad, hess = parts(theta)
    theta = theta - np.linalg.solve(hess, grad)
  assert np.max(np.abs(parts(theta)[1])) < 1e-10
  return theta


def assert_params_close(params, reference, rtol=1e-4):
  """Relative agreement in norm and elementwise (atol scaled to the largest entry)."""
  params = np.asarray(params, np.float64).ravel()
  reference = np.asarray(reference, np.float64).ravel()
  scale = np.max(np.abs(reference))
  assert np.linalg.norm(params - reference) <= rtol * np.linalg.norm(reference)
  np.testing.assert_allclose(params, reference, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------
# Data drawn in NumPy from the true scores
# ---------------------------------------------------------------------------


def sample_outcomes(rng, utilities, n_ranked):
  """Plackett-Luce draws by sequential sampling (K=2, m=1 is Bradley-Terry)."""
  n, size = utilities.shape
  remaining = np.ones((n, size), bool)
  out = np.zeros((n, n_ranked), np.int64)
  for stage in range(n_ranked):
    probs = np.where(remaining, np.exp(utilities - utilities.max(1, keepdims=True)), 0.0)
    cdf = np.cumsum(probs / probs.sum(1, keepdims=True), axis=1)
    pick = np.argmax((cdf > rng.random((n, 1))) & remaining, axis=1)
    out[:, stage] = pick
    remaining[np.arange(n), pick] = False
  return out


def make_data(inst, choice_name, seed, *, separable=False, n_rows=N_ROWS):
  top_m, slate_size = CHOICES[choice_name]
  n_ranked = C.get_choice_model(choice_name, top_m).outcome_size(slate_size)
  rng = np.random.default_rng(seed)
  truth = np_truth(inst)
  contexts = rng.integers(0, inst.n_contexts, n_rows)
  users = rng.integers(0, inst.n_users, n_rows)
  slates = np.argsort(rng.random((n_rows, inst.n_actions)), axis=1)[:, :slate_size]
  utilities = truth[contexts[:, None], users[:, None], slates]
  if separable:  # the user always ranks by the true score: the true Theta separates
    outcomes = np.argsort(-utilities, axis=1)[:, :n_ranked]
  else:
    outcomes = sample_outcomes(rng, utilities, n_ranked)
  as32 = lambda v: jnp.asarray(v, jnp.int32)
  return L.ChoiceData(as32(contexts), as32(users), as32(slates), as32(outcomes),
                      jnp.ones(n_rows, jnp.bool_))


@pytest.fixture(scope="module")
def inst(tiny_instance):
  assert np.array_equal(np.asarray(tiny_instance.heads), np.asarray(
      I.make_instance(jax.random.key(0), **TINY_SIZES).heads)), "cached_data assumes key 0"
  return tiny_instance


_DATA_CACHE = {}


def cached_data(choice_name, seed=0, separable=False):
  """Data on the tiny instance (make_instance key 0, as conftest's), built once per arguments."""
  if "instance" not in _DATA_CACHE:
    _DATA_CACHE["instance"] = I.make_instance(jax.random.key(0), **TINY_SIZES)
  key = (choice_name, seed, separable)
  if key not in _DATA_CACHE:
    _DATA_CACHE[key] = make_data(_DATA_CACHE["instance"], choice_name, seed,
                                 separable=separable)
  return _DATA_CACHE[key]


# negative_log_likelihood jitted once (the choice model is a static, hashable bundle).
jit_nll = jax.jit(L.negative_log_likelihood, static_argnums=(1,))


def zeros(model):
  return jnp.zeros(model.param_shape, jnp.float32)


# ---------------------------------------------------------------------------
# Model classes and scores
# ---------------------------------------------------------------------------


def test_param_shapes_and_bad_name(inst):
  shapes = {name: L.make_model_class(name, inst).param_shape for name in L.MODEL_CLASSES}
  assert shapes == {"known_heads": (3, 4), "known_directions": (3, 3),
                    "per_user_bilinear": (3, 4), "pooled": (1, 4)}
  with pytest.raises(ValueError, match=r"\bmodel_class\b"):
    L.make_model_class("factorized", inst)


@pytest.mark.parametrize("name", L.MODEL_CLASSES)
def test_scores_match_explicit_bilinear_formula(name, inst, rng):
  model = L.make_model_class(name, inst)
  theta = rng.normal(size=model.param_shape)
  expected = np_explicit_scores(name, inst, theta)
  got = np.asarray(L.scores(model, jnp.asarray(theta, jnp.float32)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for context, user in ((0, 0), (3, 2)):
    np.testing.assert_allclose(
        np.asarray(L.cell_scores(model, jnp.asarray(theta, jnp.float32), context, user)),
        expected[context, user], rtol=1e-5, atol=1e-5)
  # The test's design tensor agrees with the explicit formula (checks the reference).
  data = cached_data("multinomial_logit")
  design = np_design(name, inst, data)
  slates = np.asarray(data.slates)
  cells = expected[np.asarray(data.contexts)[:, None], np.asarray(data.users)[:, None], slates]
  np.testing.assert_allclose(design @ theta.ravel(), cells, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["known_heads", "known_directions", "per_user_bilinear"])
def test_true_parameters_reproduce_true_scores(name, inst):
  scaled = inst._replace(reward_scale=jnp.float32(1.7))
  model = L.make_model_class(name, scaled)
  theta = L.true_parameters(model, scaled)
  assert theta.shape == model.param_shape
  got = np.asarray(L.scores(model, theta))
  np.testing.assert_allclose(got, np.asarray(I.true_scores(scaled)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, np_truth(scaled), rtol=1e-5, atol=1e-5)


def test_pooled_has_no_true_parameters(inst):
  with pytest.raises(ValueError, match=r"\bmodel_class\b"):
    L.true_parameters(L.make_model_class("pooled", inst), inst)


@pytest.mark.parametrize("choice_name", list(CHOICES))
def test_negative_log_likelihood_matches_numpy(choice_name, inst, rng):
  model = L.make_model_class("known_heads", inst)
  top_m, _ = CHOICES[choice_name]
  data = cached_data(choice_name)
  theta = rng.normal(size=model.param_shape)
  design = np_design("known_heads", inst, data)
  expected, _, _ = np_nll_parts(design @ theta.ravel(), np.asarray(data.outcomes),
                                np.ones(N_ROWS))
  got = jit_nll(model, C.get_choice_model(choice_name, top_m), jnp.asarray(theta, jnp.float32),
            data)
  assert float(got) == pytest.approx(expected, rel=1e-5)


def test_numpy_reference_gradient_is_right(inst):
  # Guards the reference itself: analytic gradient vs finite differences.
  data = cached_data("plackett_luce")
  parts = np_objective(np_design("known_heads", inst, data), data.outcomes, np.ones(N_ROWS),
                       0.3)
  theta = np.random.default_rng(1).normal(size=12)
  assert optimize.check_grad(lambda t: parts(t)[0], lambda t: parts(t)[1], theta) < 1e-4
  numeric_hess = optimize.approx_fprime(theta, lambda t: parts(t)[1], 1e-6)
  np.testing.assert_allclose(numeric_hess, parts(theta)[2], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Exact ERM against SciPy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_name,choice_name", PAIRS)
def test_fit_erm_matches_scipy(model_name, choice_name, inst, jit_fit):
  fit = jit_fit(choice_name, CHOICES[choice_name][0])
  model = L.make_model_class(model_name, inst)
  data = cached_data(choice_name)
  design = np_design(model_name, inst, data)
  for ridge in (1.0, 0.0):  # plenty of non-separable data: the ridge-0 minimiser exists
    parts = np_objective(design, data.outcomes, np.ones(N_ROWS), ridge)
    reference = scipy_erm(design, data.outcomes, np.ones(N_ROWS), ridge)

    # Default tolerance: the documented guarantee, Newton decrement^2/2 <=
    # tol * n, which bounds the suboptimality (up to the decrement being a
    # local estimate: factor 2 allowed).
    default = fit(model, zeros(model), data, ridge)
    assert bool(default.converged), (ridge, default)
    assert 0 < int(default.iterations) < MAX_ITERATIONS
    assert float(default.decrement) <= DEFAULT_TOL * N_ROWS
    suboptimality = parts(np.asarray(default.params, np.float64).ravel())[0] - parts(reference)[0]
    assert suboptimality <= 2 * DEFAULT_TOL * N_ROWS
    assert_params_close(default.params, reference.reshape(model.param_shape), rtol=1e-3)

    # Tight tolerance (float32 reaches it): parameters to 1e-4 relative.
    result = fit(model, zeros(model), data, ridge, TIGHT_TOL)
    assert bool(result.converged), (ridge, result)
    assert 0 < int(result.iterations) < MAX_ITERATIONS
    assert np.all(np.isfinite(np.asarray(result.params)))
    assert_params_close(result.params, reference.reshape(model.param_shape))
    # grad_norm reports the max-abs gradient at the returned parameters.
    numpy_grad = parts(np.asarray(result.params, np.float64).ravel())[1]
    assert float(result.grad_norm) == pytest.approx(np.abs(numpy_grad).max(), rel=0.1,
                                                    abs=1e-4)

    # Warm start at the solution: converged in at most one step, same answer.
    again = fit(model, result.params, data, ridge, TIGHT_TOL)
    assert bool(again.converged) and int(again.iterations) <= 1
    np.testing.assert_allclose(np.asarray(again.params), np.asarray(result.params),
                               rtol=1e-5, atol=1e-6)


def test_bradley_terry_ridge_zero_matches_statsmodels_logit(inst, jit_fit):
  # BT is logistic regression on difference features with no intercept.
  model = L.make_model_class("known_heads", inst)
  data = cached_data("bradley_terry")
  design = np_design("known_heads", inst, data)
  first_chosen = (np.asarray(data.outcomes)[:, 0] == 0).astype(np.float64)
  logit = sm.Logit(first_chosen, design[:, 0] - design[:, 1]).fit(
      method="newton", maxiter=100, tol=1e-12, disp=0)
  assert logit.mle_retvals["converged"]
  result = jit_fit("bradley_terry")(model, zeros(model), data, 0.0, TIGHT_TOL)
  assert bool(result.converged)
  assert_params_close(result.params, logit.params.reshape(model.param_shape))


@pytest.mark.parametrize("model_name,choice_name", [
    ("known_heads", "bradley_terry"),
    ("per_user_bilinear", "plackett_luce"),
])
def test_separable_data(model_name, choice_name, inst, jit_fit):
  fit = jit_fit(choice_name, CHOICES[choice_name][0])
  model = L.make_model_class(model_name, inst)
  data = cached_data(choice_name, seed=1, separable=True)
  design = np_design(model_name, inst, data)
  # The true parameters order every observation correctly: the data are separable.
  truth = np.asarray(L.true_parameters(model, inst), np.float64).ravel()
  utilities = design @ truth
  outcomes = np.asarray(data.outcomes)
  ranked = np.take_along_axis(utilities, outcomes, axis=1)
  assert np.all(np.diff(ranked, axis=1) < 0)
  unranked = utilities.copy()
  np.put_along_axis(unranked, outcomes, -np.inf, axis=1)
  assert np.all(ranked[:, -1] > unranked.max(axis=1))
  # ridge = 0: no minimiser; the solver must stay finite and not claim success falsely.
  unbounded = fit(model, zeros(model), data, 0.0)
  params = np.asarray(unbounded.params)
  assert np.all(np.isfinite(params))
  assert np.isfinite(float(unbounded.grad_norm))
  assert not np.isnan(float(unbounded.decrement))  # inf is the honest "no estimate"
  assert not bool(unbounded.converged) or np.isfinite(float(unbounded.decrement))
  if bool(unbounded.converged):  # then only as a finite, near-separating fit
    assert np.all(np.isfinite(np.asarray(L.scores(model, unbounded.params))))
  # ridge = 1: a unique, finite minimiser that SciPy agrees with.
  bounded = fit(model, zeros(model), data, 1.0, TIGHT_TOL)
  assert bool(bounded.converged) and int(bounded.iterations) < MAX_ITERATIONS
  assert_params_close(bounded.params,
                      scipy_erm(design, data.outcomes, np.ones(N_ROWS), 1.0).reshape(
                          model.param_shape))


# ---------------------------------------------------------------------------
# Buffers, batching and compilation
# ---------------------------------------------------------------------------


def test_masked_garbage_rows_are_ignored(inst, jit_fit, rng):
  model = L.make_model_class("known_heads", inst)
  compact = cached_data("bradley_terry")
  capacity = N_ROWS + 50
  rows = np.sort(rng.choice(capacity, N_ROWS, replace=False))  # where the real rows go
  # In-range garbage (a stale buffer): valid indices, arbitrary outcomes.
  garbage = [rng.integers(0, inst.n_contexts, capacity),
             rng.integers(0, inst.n_users, capacity),
             rng.integers(0, inst.n_actions, (capacity, 2)),
             rng.integers(0, 2, (capacity, 1)),
             np.zeros(capacity, bool)]
  for field, value in zip(garbage, compact):
    field[rows] = np.asarray(value)
  buffer = L.ChoiceData(*(jnp.asarray(field) for field in garbage))
  assert int(buffer.mask.sum()) == N_ROWS
  bt = C.bradley_terry()
  theta = jnp.asarray(rng.normal(size=model.param_shape), jnp.float32)
  assert float(jit_nll(model, bt, theta, buffer)) == pytest.approx(
      float(jit_nll(model, bt, theta, compact)), rel=1e-5)
  fit = jit_fit("bradley_terry")
  from_buffer = fit(model, zeros(model), buffer, 1.0, TIGHT_TOL)
  from_compact = fit(model, zeros(model), compact, 1.0, TIGHT_TOL)
  assert bool(from_buffer.converged) and bool(from_compact.converged)
  # The reported gradient ignores the garbage too (it is ~0 at the optimum).
  assert float(from_buffer.grad_norm) < 1e-3 and float(from_compact.grad_norm) < 1e-3
  np.testing.assert_allclose(np.asarray(from_buffer.params), np.asarray(from_compact.params),
                             rtol=1e-5, atol=1e-6)


# The three outer-product classes, each with another choice model.
CELL_TABLE_PAIRS = [("known_heads", "bradley_terry"), ("per_user_bilinear", "plackett_luce"),
                    ("pooled", "multinomial_logit")]


@pytest.mark.parametrize("cell_table_from", [None, 100, 200, "native"])
@pytest.mark.parametrize("model_name,choice_name", CELL_TABLE_PAIRS)
def test_blocked_cell_table_gradient_matches_numpy(model_name, choice_name, cell_table_from,
                                                   inst, rng):
  # The blocked gradient of outer-product classes sums each row's d-vector
  # into a (context, user) table; it must equal the design-matrix gradient of
  # the rows below n_rows whose mask is set, and ignore every other row. With
  # cell_table_from above n_rows (200) the per-user branch of the lax.cond
  # runs instead, at or below it (100) the table: the same gradient either way.
  # "native": the C++ row loop (erm_gradient='native'; its Bradley-Terry
  # vector path for known_heads, its float64 loop for the other two), which
  # must ignore the same rows.
  model = L.make_model_class(model_name, inst)
  top_m, slate_size = CHOICES[choice_name]
  choice_model = C.get_choice_model(choice_name, top_m)
  compact = cached_data(choice_name)
  native = cell_table_from == "native"
  cell_table_from = None if native else cell_table_from
  block, n_rows, capacity = 16, 137, 160  # the last visited block ends at row 144
  fields = [np.array(field) for field in compact]
  garbage = [rng.integers(0, inst.n_contexts, capacity),
             rng.integers(0, inst.n_users, capacity),
             np.argsort(rng.random((capacity, inst.n_actions)), axis=1)[:, :slate_size],
             np.argsort(rng.random((capacity, slate_size)), axis=1)[:, :fields[3].shape[1]],
             np.ones(capacity, bool)]  # rows past the visited blocks: marked, never read
  for field, value in zip(garbage, fields):
    field[:N_ROWS] = value
  garbage[4][n_rows:144] = False  # unwritten rows inside the last visited block
  garbage[4][rng.choice(n_rows, 20, replace=False)] = False  # rows masked out
  buffer = L.ChoiceData(*(jnp.asarray(field) for field in garbage))
  assert L._uses_cell_table(model, buffer, block)
  theta = rng.normal(size=model.param_shape)
  _, gradient, _ = L._objective_functions(model, choice_model, buffer, 0.7, block,
                                          jnp.asarray(n_rows), jnp.float32, cell_table_from,
                                          native_gradient=native)
  got = np.asarray(jax.jit(gradient)(jnp.asarray(theta, jnp.float32)))
  live = np.zeros(capacity)
  live[:n_rows] = garbage[4][:n_rows]
  design = np_design(model_name, inst, buffer)
  _, expected, _ = np_objective(design, garbage[3], live, 0.7)(theta.ravel())
  np.testing.assert_allclose(got.ravel(), expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())
  # The rows it must ignore would have moved it.
  _, everything, _ = np_objective(design, garbage[3], np.ones(capacity), 0.7)(theta.ravel())
  assert np.abs(everything - expected).max() > 1e-2 * np.abs(expected).max()


@pytest.mark.parametrize("choice_name", ["bradley_terry", "plackett_luce"])
def test_native_gradient_is_finite_and_right_where_probabilities_saturate(choice_name, inst,
                                                                          rng):
  # Utilities in the thousands: every choice probability is 0 or 1 in float32,
  # and exp overflows unless it is kept in range. The gradient must still be
  # the NumPy one (float64, through logsumexp), with no NaN or inf; here over
  # the whole buffer (no blocks, no n_rows).
  model = L.make_model_class("known_heads", inst)
  top_m, _ = CHOICES[choice_name]
  data = cached_data(choice_name)
  theta = 300.0 * rng.normal(size=model.param_shape)
  design = np_design("known_heads", inst, data)
  assert np.abs(design @ theta.ravel()).max() > 500.0
  _, gradient, _ = L._objective_functions(model, C.get_choice_model(choice_name, top_m), data,
                                          0.5, None, None, jnp.float32, native_gradient=True)
  got = np.asarray(jax.jit(gradient)(jnp.asarray(theta, jnp.float32)))
  assert np.all(np.isfinite(got))
  _, expected, _ = np_objective(design, data.outcomes, np.ones(N_ROWS), 0.5)(theta.ravel())
  np.testing.assert_allclose(got.ravel(), expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())


def test_choice_data_write_fills_one_row():
  data = L.ChoiceData.empty(4, 3, 2)
  assert data.slates.shape == (4, 3) and data.outcomes.shape == (4, 2)
  assert not bool(data.mask.any())
  data = data.write(2, 1, 0, jnp.asarray([4, 0, 2]), jnp.asarray([1, 2]))
  np.testing.assert_array_equal(np.asarray(data.mask), [False, False, True, False])
  np.testing.assert_array_equal(np.asarray(data.slates[2]), [4, 0, 2])
  np.testing.assert_array_equal(np.asarray(data.outcomes[2]), [1, 2])
  assert (int(data.contexts[2]), int(data.users[2])) == (1, 0)
  np.testing.assert_array_equal(np.asarray(data.slates)[[0, 1, 3]], 0)


def test_vmapped_fit_equals_loop_of_single_fits(inst, jit_fit):
  model = L.make_model_class("known_heads", inst)
  bt = C.bradley_terry()
  datasets = [cached_data("bradley_terry", seed=seed) for seed in (0, 2, 3)]
  batch = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *datasets)
  ridges = jnp.asarray([1.0, 0.5, 2.0], jnp.float32)

  def fit_one(data, ridge):
    with jax.numpy_rank_promotion("allow"):  # see conftest: the per-user Hessian broadcasts
      return L.fit_erm(model, bt, zeros(model), data, ridge, tol=TIGHT_TOL)

  batched = jax.jit(jax.vmap(fit_one))(batch, ridges)
  single = jit_fit("bradley_terry")
  for index, data in enumerate(datasets):
    alone = single(model, zeros(model), data, ridges[index], TIGHT_TOL)
    assert bool(batched.converged[index]) and bool(alone.converged)
    assert int(batched.iterations[index]) == int(alone.iterations)
    np.testing.assert_allclose(np.asarray(batched.params[index]), np.asarray(alone.params),
                               rtol=1e-5, atol=1e-6)


def test_jitted_fit_is_traced_once_for_same_shaped_datasets(inst, jit_fit):
  # jit_fit counts its traces with a Python side effect (conftest); it may
  # already have been traced for this pair by an earlier test, so count the
  # new traces: at most one for two datasets and two ridges of the same shape.
  model = L.make_model_class("known_heads", inst)
  fit = jit_fit("bradley_terry")
  before = jit_fit_traces[("bradley_terry", None, "known_heads")]
  first = fit(model, zeros(model), cached_data("bradley_terry", seed=4), 1.0)
  second = fit(model, zeros(model), cached_data("bradley_terry", seed=5), 0.25)
  after = jit_fit_traces[("bradley_terry", None, "known_heads")]
  assert after >= 1 and after - before <= 1
  third = fit(model, first.params, cached_data("bradley_terry", seed=6), 2.0)
  assert jit_fit_traces[("bradley_terry", None, "known_heads")] == after
  assert bool(first.converged) and bool(second.converged) and bool(third.converged)
  assert not np.allclose(np.asarray(first.params), np.asarray(second.params))


def test_make_learner_bundle(inst):
  model = L.make_model_class("known_directions", inst)
  learner = L.make_learner(model, C.multinomial_logit())
  params = learner.init()
  assert params.shape == (3, 3) and params.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(params), 0.0)
  theta = jnp.arange(9.0, dtype=jnp.float32).reshape(3, 3) / 9
  np.testing.assert_allclose(np.asarray(learner.scores(theta)),
                             np_explicit_scores("known_directions", inst, theta),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(learner.cell_scores(theta, 1, 2)),
                             np.asarray(learner.scores(theta))[1, 2], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"\btol\b"):
    L.make_learner(model, C.multinomial_logit(), tol=0.0)
  with pytest.raises(ValueError, match=r"\bmax_iterations\b"):
    L.make_learner(model, C.multinomial_logit(), max_iterations=0)
  with pytest.raises(ValueError, match=r"\bcell_table_from=0\b"):
    L.make_learner(model, C.multinomial_logit(), cell_table_from=0)


# ---------------------------------------------------------------------------
# Exact ERM with a carried inverse Hessian
# ---------------------------------------------------------------------------

CARRIED_PAIRS = [pytest.param("known_heads", "bradley_terry", id="known_heads-bradley_terry"),
                 pytest.param("per_user_bilinear", "plackett_luce",
                              id="per_user_bilinear-plackett_luce"),
                 pytest.param("known_directions", "multinomial_logit", marks=pytest.mark.slow,
                              id="known_directions-multinomial_logit")]


def np_block_inverse(model, hess):
  """The package's layout of an inverse Hessian: (p, p), or per-user (U, q, q) blocks."""
  inverse = np.linalg.inv(hess)
  if not model.per_user:
    return inverse
  users, q = model.param_shape
  return np.stack([inverse[u * q:(u + 1) * q, u * q:(u + 1) * q] for u in range(users)])


@pytest.mark.parametrize("model_name,choice_name", CARRIED_PAIRS[:2])
def test_add_observation_matches_numpy_inverse(model_name, choice_name, inst, rng):
  """One Woodbury update equals NumPy's inverse of the Hessian with the new row added."""
  top_m, _ = CHOICES[choice_name]
  choice_model = C.get_choice_model(choice_name, top_m)
  model = L.make_model_class(model_name, inst)
  data = cached_data(choice_name)
  n = 40
  design = np_design(model_name, inst, data)[:n + 1]
  theta = 0.3 * rng.standard_normal(design.shape[-1])
  mask = np.ones(n + 1)
  before = np_objective(design[:n], data.outcomes[:n], mask[:n], 1.0)(theta)[2]
  after = np_objective(design, data.outcomes[:n + 1], mask, 1.0)(theta)[2]
  updated = L.add_observation(
      model, choice_model, jnp.asarray(np_block_inverse(model, before), jnp.float32),
      jnp.asarray(theta.reshape(model.param_shape), jnp.float32), data.contexts[n],
      data.users[n], data.slates[n], data.outcomes[n])
  expected = np_block_inverse(model, after)
  np.testing.assert_allclose(np.asarray(updated), expected, rtol=1e-4,
                             atol=1e-5 * np.abs(expected).max())
  # Exactly symmetric, so that thousands of updates cannot drift apart from their transpose.
  np.testing.assert_array_equal(np.asarray(updated), np.swapaxes(np.asarray(updated), -1, -2))
  # The new row changes the inverse (the test would catch an update left out).
  assert np.abs(np_block_inverse(model, before) - expected).max() > 1e-3 * np.abs(expected).max()


def test_secant_update_maps_gradient_change_to_step(inst, rng):
  model = L.make_model_class("known_heads", inst)
  p = model.param_shape[0] * model.param_shape[1]
  root = rng.standard_normal((p, p))
  inverse = np.linalg.inv(root @ root.T + p * np.eye(p))
  step = rng.standard_normal(model.param_shape)
  change = (root @ root.T + 1.5 * p * np.eye(p)) @ step.ravel()  # a convex function's y
  grad = -np.linalg.solve(inverse, step.ravel())  # the gradient that made this step
  as32 = lambda v: jnp.asarray(v.reshape(step.shape), jnp.float32)
  updated = np.asarray(L._secant_update(model, jnp.asarray(inverse, jnp.float32), as32(step),
                                        as32(grad), as32(change), 0.0), np.float64)
  np.testing.assert_allclose(updated @ change, step.ravel(), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(updated, updated.T, atol=1e-6)
  assert np.all(np.linalg.eigvalsh(updated) > 0)


@pytest.mark.parametrize("model_name,choice_name", CARRIED_PAIRS)
def test_observation_gradient_is_one_rows_gradient(model_name, choice_name, inst, rng):
  """The O(1) term a refit adds to the carried gradient for its new row, against NumPy."""
  top_m, _ = CHOICES[choice_name]
  choice_model = C.get_choice_model(choice_name, top_m)
  model = L.make_model_class(model_name, inst)
  data = cached_data(choice_name)
  design = np_design(model_name, inst, data)
  theta = 0.3 * rng.standard_normal(design.shape[-1])
  for n in (0, N_ROWS - 1):
    expected = np_objective(design[n:n + 1], data.outcomes[n:n + 1], np.ones(1), 0.0)(theta)[1]
    got = L.observation_gradient(model, choice_model,
                                 jnp.asarray(theta.reshape(model.param_shape), jnp.float32),
                                 data.contexts[n], data.users[n], data.slates[n],
                                 data.outcomes[n])
    np.testing.assert_allclose(np.asarray(got).ravel(), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    assert np.abs(expected).max() > 1e-3  # a row that moves the gradient


@pytest.fixture(scope="module")
def carried_sequence():
  """jit of: fit the first rows cold, then add rows one at a time with fit_erm_carried."""
  cache = {}

  def get(model_name, choice_name, native=False):
    if (model_name, choice_name, native) not in cache:
      top_m, _ = CHOICES[choice_name]
      choice_model = C.get_choice_model(choice_name, top_m)

      @functools.partial(jax.jit, static_argnums=2)
      def run(model, data, first, ridge):
        carry = L.empty_hessian_carry(model)
        params = jnp.zeros(model.param_shape, jnp.float32)
        results = []
        for n in range(first, N_ROWS + 1):
          rows = data._replace(mask=jnp.arange(N_ROWS) < n)
          new = (data.contexts[n - 1], data.users[n - 1], data.slates[n - 1],
                 data.outcomes[n - 1])
          result, carry = L.fit_erm_carried(model, choice_model, params, carry, rows, new,
                                            ridge, tol=TIGHT_TOL, native_gradient=native)
          params = result.params
          results.append(result)
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *results), carry

      cache[(model_name, choice_name, native)] = run
    return cache[(model_name, choice_name, native)]

  return get


@pytest.mark.parametrize("model_name,choice_name,native", [
    *(pytest.param(*pair.values, False, id=pair.id, marks=pair.marks) for pair in CARRIED_PAIRS),
    # The quasi-Newton steps as one native call (erm_gradient='native', shared parameters).
    pytest.param("known_heads", "bradley_terry", True, id="known_heads-bradley_terry-native")])
def test_fit_erm_carried_matches_scipy_after_each_new_row(model_name, choice_name, native, inst,
                                                          carried_sequence):
  """Rows arrive one at a time; every refit is SciPy's ERM on the rows so far."""
  model = L.make_model_class(model_name, inst)
  data = cached_data(choice_name)
  first = N_ROWS - 4
  results, carry = carried_sequence(model_name, choice_name, native)(model, data, first, 1.0)
  design = np_design(model_name, inst, data)
  assert bool(carry.valid)
  # The carry holds the last estimate and NumPy's penalised gradient there
  # (near zero at the optimum, to float32 rounding of a sum of N_ROWS terms;
  # a gradient without the ridge term, -theta, would be far outside that).
  np.testing.assert_array_equal(np.asarray(carry.params), np.asarray(results.params[-1]))
  theta = np.asarray(carry.params, np.float64).ravel()
  np_grad = np_objective(design, data.outcomes, np.ones(N_ROWS), 1.0)(theta)[1]
  row_scale = max(np.abs(np_objective(design[n:n + 1], data.outcomes[n:n + 1], np.ones(1),
                                      0.0)(theta)[1]).max() for n in range(N_ROWS))
  atol = 1e-4 * row_scale
  np.testing.assert_allclose(np.asarray(carry.grad).ravel(), np_grad, atol=atol)
  assert np.abs(theta).max() > 10 * atol
  for k, n in enumerate(range(first, N_ROWS + 1)):
    reference = scipy_erm(design[:n], data.outcomes[:n], np.ones(n), 1.0)
    assert bool(results.converged[k]), (n, results.decrement[k])
    assert_params_close(results.params[k], reference.reshape(model.param_shape))
  # The first refit starts cold (Newton); later ones are warm quasi-Newton refits.
  assert int(np.max(results.iterations[1:])) <= 8
  # The carried inverse stays close to NumPy's inverse Hessian at the final estimate.
  theta = np.asarray(results.params[-1], np.float64).ravel()
  hess = np_objective(design, data.outcomes, np.ones(N_ROWS), 1.0)(theta)[2]
  expected = np_block_inverse(model, hess)
  error = np.linalg.norm(np.asarray(carry.inverse) - expected) / np.linalg.norm(expected)
  assert error < 0.2, error


# d = 3, J = 3: 27 parameters (not a multiple of the kernel's 4 rows or 8 lanes) and
# d^2 = 9 per factor (a whole vector of 8 and one more).
ODD_SIZES = dict(TINY_SIZES, dim=3)


@pytest.mark.parametrize("choice_name,max_steps,sizes", [
    ("bradley_terry", 1, "tiny"), ("bradley_terry", 3, "tiny"),
    ("multinomial_logit", 3, "tiny"), ("bradley_terry", 3, "odd")])
def test_native_carried_steps_match_numpy_quasi_newton(choice_name, max_steps, sizes, inst, rng):
  """The native quasi-Newton loop (erm_gradient='native', shared parameters) against the
  same loop written in NumPy (float64): trial = theta + direction, its gradient from
  the rows, the BFGS update of the inverse where the secant pair carries curvature,
  direction = -P grad, the decrement grad^T P grad / 2; a step is kept only if the
  decrement fell. Bradley-Terry rows take the kernel's float32 vector path, logit
  choices among 3 its float64 row loop; the odd sizes take the kernel's paths for
  rows of the inverse and factor blocks that do not fill a vector."""
  if sizes == "odd":
    inst = I.make_instance(jax.random.key(0), **ODD_SIZES)
    data = make_data(inst, choice_name, 0)
  else:
    data = cached_data(choice_name)
  model = L.make_model_class("known_heads", inst)
  n_params = int(np.prod(model.param_shape))
  assert sizes == "tiny" or (model.param_shape == (3, 9) and n_params % 4 and n_params % 8)
  design = np_design("known_heads", inst, data)
  parts = np_objective(design, data.outcomes, np.ones(N_ROWS), 1.0)
  # Near enough the minimum that every step lowers the decrement (27 parameters at
  # 0.3 overshoot).
  theta = (0.3 if sizes == "tiny" else 0.1) * rng.standard_normal(design.shape[-1])
  # A preconditioner 10% off the inverse Hessian, so that the steps are real and each
  # BFGS update moves it.
  hess = parts(theta)[2]
  inverse = np.linalg.inv(hess @ (np.eye(theta.size) + 0.1 * np.diag(rng.random(theta.size))))
  inverse = (0.5 * (inverse + inverse.T)).astype(np.float32).astype(np.float64)
  grad = parts(theta)[1]
  direction = -inverse @ grad
  decrement = -0.5 * grad @ direction
  threshold = 1e-12 * N_ROWS
  as32 = lambda v: jnp.asarray(np.reshape(v, model.param_shape), jnp.float32)
  got = jax.jit(lambda *args: L.native_carried_steps(model, *args, max_steps))(
      data, None, as32(theta), as32(grad), as32(direction), jnp.float32(decrement),
      jnp.asarray(inverse, jnp.float32), True, 1.0, threshold, 100 * threshold)
  params, grad_out, decrement_out, inverse_out, steps = (np.asarray(x, np.float64) for x in got)

  p = inverse
  for _ in range(max_steps):
    trial = theta + direction
    trial_grad = parts(trial)[1]
    s, y = direction, trial_grad - grad
    sy, py = s @ y, p @ y
    ypy = y @ py
    if -0.5 * s @ grad > 100 * threshold and sy > 0 and ypy < 4 * sy and 4 * ypy > sy:
      r = 1 / sy
      p = p - r * (np.outer(s, py) + np.outer(py, s)) + (r * r * ypy + r) * np.outer(s, s)
    new_direction = -p @ trial_grad
    new_decrement = -0.5 * trial_grad @ new_direction
    assert 0 <= new_decrement < decrement  # every step here is kept
    theta, grad, direction, decrement = trial, trial_grad, new_direction, new_decrement
  assert int(steps) == max_steps
  assert_params_close(params.reshape(model.param_shape), theta.reshape(model.param_shape),
                      rtol=1e-5)
  np.testing.assert_allclose(grad_out.ravel(), grad, rtol=1e-3, atol=1e-4 * np.abs(grad).max())
  np.testing.assert_allclose(inverse_out, p, rtol=1e-4, atol=1e-5 * np.abs(p).max())
  np.testing.assert_array_equal(inverse_out, inverse_out.T)  # symmetric bit for bit
  assert float(decrement_out) == pytest.approx(decrement, rel=1e-2, abs=1e-3 * threshold)
  # The updates moved the inverse (a loop that skipped them would fail above).
  assert np.abs(p - inverse).max() > 1e-3 * np.abs(p).max()


@pytest.mark.parametrize("name", ["known_heads", "per_user_bilinear", "known_directions"])
def test_score_factors_reproduce_explicit_scores(name, inst, rng):
  """<queries, keys> equals the explicit bilinear scores; bilinear classes factor in d, not d^2."""
  model = L.make_model_class(name, inst)
  theta = rng.standard_normal(model.param_shape)
  queries, keys = L.score_queries(model, jnp.asarray(theta, jnp.float32)), L.score_keys(model)
  factored = np.einsum("cur,car->cua", np.asarray(queries, np.float64),
                       np.asarray(keys, np.float64))
  np.testing.assert_allclose(factored, np_explicit_scores(name, inst, theta), rtol=1e-4,
                             atol=1e-4)
  # Linear in the parameters, as the regret cache's distances assume.
  twice = np.asarray(L.score_queries(model, jnp.asarray(2 * theta, jnp.float32)))
  np.testing.assert_allclose(twice, 2 * np.asarray(queries), rtol=1e-5, atol=1e-5)
  if name != "known_directions":
    assert queries.shape[-1] == inst.contexts.shape[-1]


@pytest.mark.parametrize("name", ["known_heads", "per_user_bilinear", "pooled",
                                  "known_directions"])
def test_query_scale_bounds_how_far_queries_move_with_the_user_vectors(name, inst, rng):
  """The certified pass's drift bound: between two estimates, every query moves at most
  ``query_scale[c]`` times as far as its user's vector (distances in float64); the
  scale is ``||x_c||`` (rounded up) for bilinear classes and 1 for the others."""
  model = L.make_model_class(name, inst)
  scale = np.asarray(L.query_scale(model), np.float64)
  bilinear = name != "known_directions"
  contexts = np.asarray(inst.contexts, np.float64)
  expected = np.linalg.norm(contexts, axis=1) if bilinear else np.ones(len(contexts))
  np.testing.assert_allclose(scale, expected, rtol=2e-6)
  assert np.all(scale >= expected)  # rounded up
  for _ in range(3):
    a, b = (rng.standard_normal(model.param_shape) for _ in range(2))
    queries = [np.asarray(L.score_queries(model, jnp.asarray(t, jnp.float32)), np.float64)
               for t in (a, b)]
    vectors = [np.asarray(L.user_vectors(model, jnp.asarray(t, jnp.float32)), np.float64)
               for t in (a, b)]
    moved = np.linalg.norm(queries[0] - queries[1], axis=-1)  # (C, U)
    drift = np.linalg.norm(vectors[0] - vectors[1], axis=-1)  # (U,)
    assert np.all(moved <= scale[:, None] * drift[None, :] * (1 + 1e-5) + 1e-5)


def test_latent_first_scores_match_explicit(inst, rng):
  model = L.make_model_class("known_heads", inst)
  theta = rng.standard_normal(model.param_shape)
  np.testing.assert_allclose(np.asarray(L.scores(model, jnp.asarray(theta, jnp.float32))),
                             np_explicit_scores("known_heads", inst, theta), rtol=1e-4,
                             atol=1e-4)
