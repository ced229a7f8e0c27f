"""Model classes and the exact-ERM (maximum-likelihood) solver.

Every convex model class of PAPER.md section 2 is linear in its parameters and
has the form::

    R_theta(x, a, i) = e_i^T  Theta  f(x, a)

with a known user embedding ``e_i`` (``m`` numbers), a known feature map
``f(x, a)`` (``q`` numbers) and unknown ``Theta`` (``m x q``):

=================  ==============  ==================  ============  =========
class              embedding e_i   features f(x, a)    Theta         per-user
=================  ==============  ==================  ============  =========
known_heads        true head h_i   x (outer) a, d^2    M, (J, d^2)   no
known_directions   one-hot(i)      z(x, a), J          H, (U, J)     yes
per_user_bilinear  one-hot(i)      x (outer) a, d^2    (U, d^2)      yes
pooled             1               x (outer) a, d^2    (1, d^2)      no
=================  ==============  ==================  ============  =========

For one-hot embeddings ("per-user" classes) the ERM decouples into one small
problem per user, solved as a batch. For the others the Hessian is assembled
from per-user sufficient statistics of the current iterate::

    S_i = sum_{n: user n = i} F_n^T W_n F_n   (q x q),
    Hess = sum_i (e_i e_i^T) kron S_i + ridge I

so its cost is linear in the data and independent of ``m``.

Exact ERM minimises ``sum_n -log P(outcome_n) + ridge/2 ||Theta||_F^2`` by
Newton's method (Armijo backtracking while the Newton decrement is above
``1e-2``, full steps inside that quadratic region), warm-started, stopping when the
Newton decrement ``lambda^2 = g^T Hess^{-1} g`` satisfies
``lambda^2 / 2 <= tol * max(1, n_data)`` (a bound on the suboptimality of the
mean loss), within ``max_iterations``. The solver never raises inside ``jit``:
it reports ``converged``, the iterations used and the final gradient norm.

Default ``ridge = 1.0``: the ERM then exists and is unique for any data,
separable or not. With ``ridge = 0`` the minimiser exists only for
non-separable data; the Newton system is then damped by ``1e-6`` for stability
and an unbounded problem shows as ``converged = False`` with finite parameters.

A new model class (for instance the non-convex factorized one) implements the
same :class:`Learner` bundle: ``init``, ``fit``, ``scores``, ``cell_scores``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxbandit import validation as V
from jaxbandit.choice import ChoiceModel
from jaxbandit.instance import Instance, latent_features

MODEL_CLASSES = ("known_heads", "known_directions", "per_user_bilinear", "pooled")


class ChoiceData(NamedTuple):
  """Observed choices as weighted rows (rows of weight 0 are ignored).

  Two layouts share this type. A *buffer* has one row per observation (the
  row's ``mask`` is True once written). A *table* enumerates every possible
  (context, user, slate, outcome) once and ``mask`` holds how many times each
  was observed (float32 counts, exact up to 2^24 per row), so the ERM's cost
  does not grow with the number of rounds.

  Attributes:
    contexts: (n,) int32 context index of each observation.
    users: (n,) int32 user index.
    slates: (n, slate_size) int32 action indices shown.
    outcomes: (n, n_ranked) int32 slate positions, best first.
    mask: (n,) bool (buffer: observed rows) or float32 counts (table).
  """

  contexts: jax.Array
  users: jax.Array
  slates: jax.Array
  outcomes: jax.Array
  mask: jax.Array

  @staticmethod
  def empty(capacity: int, slate_size: int, n_ranked: int) -> "ChoiceData":
    zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
    return ChoiceData(zeros(capacity), zeros(capacity), zeros(capacity, slate_size),
                      zeros(capacity, n_ranked), jnp.zeros((capacity,), jnp.bool_))

  def write(self, index, context, user, slate, outcome) -> "ChoiceData":
    """Stores one observation in row ``index`` (a pure update)."""
    return ChoiceData(
        self.contexts.at[index].set(context),
        self.users.at[index].set(user),
        self.slates.at[index].set(slate),
        self.outcomes.at[index].set(outcome),
        self.mask.at[index].set(True),
    )


def table_size(n_contexts: int, n_users: int, n_actions: int, slate_size: int,
               n_ranked: int) -> int:
  """Rows of the table layout: contexts x users x ordered slates x partial rankings."""
  rankings = int(np.prod([slate_size - k for k in range(n_ranked)]))
  return n_contexts * n_users * n_actions**slate_size * rankings


def _rankings(slate_size: int, n_ranked: int) -> np.ndarray:
  """Every ordered choice of ``n_ranked`` distinct positions, (count, n_ranked)."""
  import itertools

  return np.asarray(list(itertools.permutations(range(slate_size), n_ranked)),
                    np.int32).reshape(-1, n_ranked)


def empty_table(n_contexts: int, n_users: int, n_actions: int, slate_size: int,
                n_ranked: int) -> ChoiceData:
  """The table layout with every count at zero (index columns are NumPy constants)."""
  rankings = _rankings(slate_size, n_ranked)
  grids = np.meshgrid(np.arange(n_contexts), np.arange(n_users),
                      *([np.arange(n_actions)] * slate_size), np.arange(len(rankings)),
                      indexing="ij")
  flat = [g.reshape(-1).astype(np.int32) for g in grids]
  slates = np.stack(flat[2:2 + slate_size], axis=1)
  return ChoiceData(flat[0], flat[1], slates, rankings[flat[-1]],
                    np.zeros(flat[0].shape, np.float32))


def table_row(context, user, slate, outcome, n_users: int, n_actions: int, slate_size: int,
              n_ranked: int) -> jax.Array:
  """Row index of one observation in :func:`empty_table`'s enumeration."""
  rankings = jnp.asarray(_rankings(slate_size, n_ranked))
  ranking = jnp.argmax(jnp.all(rankings == outcome[None, :], axis=1)).astype(jnp.int32)
  index = context * n_users + user
  for k in range(slate_size):
    index = index * n_actions + slate[k]
  return index * rankings.shape[0] + ranking


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["embedding", "features"], meta_fields=["per_user", "name"])
@dataclasses.dataclass(frozen=True)
class ModelClass:
  """A linear-in-parameters model class (a pytree; ``per_user`` and ``name`` are static).

  Attributes:
    embedding: (n_users, m) known user embeddings; for per-user classes the
      identity is implied and this is a (n_users, 0) placeholder.
    features: (n_contexts, n_actions, q) known features f(x, a).
    per_user: whether Theta has one row per user (one-hot embeddings).
    name: the class name.
  """

  embedding: jax.Array
  features: jax.Array
  per_user: bool
  name: str

  @property
  def param_shape(self):
    rows = self.embedding.shape[0] if self.per_user else self.embedding.shape[1]
    return (rows, self.features.shape[-1])


def _outer_features(instance: Instance) -> jax.Array:
  x, a = instance.contexts, instance.actions
  outer = x[:, None, :, None] * a[:, :, None, :]  # (C, A, d, d)
  return outer.reshape(outer.shape[:2] + (-1,))


def make_model_class(name: str, instance: Instance) -> ModelClass:
  """Builds the model class ``name`` (one of ``MODEL_CLASSES``) for an instance."""
  V.one_of("model_class", name, MODEL_CLASSES)
  n_users = instance.n_users
  if name == "known_heads":
    return ModelClass(instance.heads, _outer_features(instance), False, name)
  if name == "pooled":
    return ModelClass(jnp.ones((n_users, 1), jnp.float32), _outer_features(instance), False,
                      name)
  placeholder = jnp.zeros((n_users, 0), jnp.float32)
  if name == "known_directions":
    return ModelClass(placeholder, latent_features(instance), True, name)
  return ModelClass(placeholder, _outer_features(instance), True, name)


def true_parameters(model: ModelClass, instance: Instance) -> jax.Array:
  """Theta that reproduces the true scores exactly (well-specified classes only)."""
  scale = instance.reward_scale
  if model.name == "known_heads":
    return scale * instance.maps.reshape(instance.latent_dim, -1)
  if model.name == "known_directions":
    return scale * instance.heads
  if model.name == "per_user_bilinear":
    return scale * jnp.einsum("uj,jpq->upq", instance.heads, instance.maps).reshape(
        instance.n_users, -1)
  raise ValueError(f"model_class={model.name!r} is misspecified and has no true parameters; "
                   f"allowed: known_heads, known_directions, per_user_bilinear")


# ---------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------


def scores(model: ModelClass, params: jax.Array) -> jax.Array:
  """Estimated scores for every cell, (n_contexts, n_users, n_actions)."""
  if model.per_user:
    return jnp.einsum("caq,uq->cua", model.features, params)
  projected = jnp.einsum("caq,mq->cam", model.features, params)
  return jnp.einsum("um,cam->cua", model.embedding, projected)


def cell_scores(model: ModelClass, params: jax.Array, context, user) -> jax.Array:
  """Estimated scores of every action for one (context, user), (n_actions,)."""
  features = model.features[context]  # (A, q)
  if model.per_user:
    return features @ params[user]
  return features @ (params.T @ model.embedding[user])


def _data_utilities(model: ModelClass, params, data: ChoiceData):
  features = model.features[data.contexts[:, None], data.slates]  # (n, K, q)
  if model.per_user:
    weights = params[data.users]  # (n, q)
  else:
    weights = model.embedding[data.users] @ params  # (n, q)
  return features, jnp.einsum("nkq,nq->nk", features, weights)


# ---------------------------------------------------------------------------
# Exact ERM
# ---------------------------------------------------------------------------


class ERMResult(NamedTuple):
  """Outcome of :func:`fit_erm`.

  Attributes:
    params: Theta at the last iterate, ``model.param_shape``.
    iterations: () int32 Newton iterations used.
    grad_norm: () max-abs gradient of the objective at ``params``.
    decrement: () Newton decrement squared / 2 at ``params`` (suboptimality estimate).
    converged: () bool, decrement criterion met within the budget.
  """

  params: jax.Array
  iterations: jax.Array
  grad_norm: jax.Array
  decrement: jax.Array
  converged: jax.Array


def negative_log_likelihood(model: ModelClass, choice_model: ChoiceModel, params,
                            data: ChoiceData) -> jax.Array:
  """Sum over observed rows of -log P(outcome) under ``params`` (no ridge)."""
  _, utilities = _data_utilities(model, params, data)
  loglik = jax.vmap(choice_model.log_likelihood)(utilities, data.outcomes)
  weights = data.mask.astype(loglik.dtype)
  return -jnp.sum(jnp.where(weights > 0, weights * loglik, 0.0))


def _objective(model, choice_model, params, data, ridge):
  return (negative_log_likelihood(model, choice_model, params, data) +
          0.5 * ridge * jnp.sum(params**2))


def _per_user_gradient(model, choice_model, params, data):
  """Per-user gradient statistics G_i of the current iterate, (U, q)."""
  features, utilities = _data_utilities(model, params, data)
  grad_u, _ = jax.vmap(choice_model.gradient_hessian)(utilities, data.outcomes)
  grad_u = grad_u * data.mask.astype(params.dtype)[:, None]
  per_datum = jnp.einsum("nkq,nk->nq", features, grad_u)
  return jax.ops.segment_sum(per_datum, data.users, model.embedding.shape[0])


def _gradient(model, choice_model, params, data, ridge):
  """Gradient of the penalised objective, ``model.param_shape``."""
  return _assemble(model, params, ridge, _per_user_gradient(model, choice_model, params, data))


def _user_statistics(model, choice_model, params, data):
  """Per-user sufficient statistics of the current iterate: G_i (U, q) and S_i (U, q, q)."""
  features, utilities = _data_utilities(model, params, data)
  grad_u, hess_u = jax.vmap(choice_model.gradient_hessian)(utilities, data.outcomes)
  live = data.mask.astype(params.dtype)
  grad_u = grad_u * live[:, None]
  hess_u = hess_u * live[:, None, None]
  n_users = model.embedding.shape[0]
  per_datum_grad = jnp.einsum("nkq,nk->nq", features, grad_u)
  per_datum_hess = jnp.einsum("nkq,nkl,nlr->nqr", features, hess_u, features)
  user_grad = jax.ops.segment_sum(per_datum_grad, data.users, n_users)  # (U, q)
  user_hess = jax.ops.segment_sum(per_datum_hess, data.users, n_users)  # (U, q, q)
  return user_grad, user_hess


def _assemble(model, params, ridge, user_grad, user_hess=None):
  """Gradient (and Hessian) of the penalised objective from per-user statistics."""
  q = params.shape[-1]
  if model.per_user:
    grad = user_grad + ridge * params
    if user_hess is None:
      return grad
    return grad, user_hess + ridge * jnp.eye(q, dtype=params.dtype)[None]
  emb = model.embedding
  n_users, m = emb.shape
  grad = emb.T @ user_grad + ridge * params  # (m, q)
  if user_hess is None:
    return grad
  # sum_i (e_i e_i^T) kron S_i as one matrix product: (m*m, U) @ (U, q*q).
  pair = (emb[:, :, None] * emb[:, None, :]).reshape(n_users, m * m)
  hess = (pair.T @ user_hess.reshape(n_users, q * q)).reshape(m, m, q, q)
  hess = hess.transpose(0, 2, 1, 3).reshape(m * q, m * q)
  return grad, hess + ridge * jnp.eye(m * q, dtype=params.dtype)


def _gradient_hessian(model, choice_model, params, data, ridge):
  """Gradient and Hessian; the Hessian from per-user sufficient statistics S_i."""
  user_grad, user_hess = _user_statistics(model, choice_model, params, data)
  return _assemble(model, params, ridge, user_grad, user_hess)


def _over_blocks(data: ChoiceData, block_size: int, n_rows, fn, init):
  """Sums ``fn(rows)`` over the first ``n_rows`` rows of ``data``, ``block_size`` at a time.

  The trip count is ``ceil(n_rows / block_size)``, so the work grows with the
  rows filled so far rather than with the buffer's capacity (a multiple of
  ``block_size``); rows past ``n_rows`` inside the last block are masked.
  """
  n_blocks = (n_rows + block_size - 1) // block_size

  def body(index, total):
    start = index * block_size
    rows = jax.tree_util.tree_map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, start, block_size, axis=0), data)
    return jax.tree_util.tree_map(jnp.add, total, fn(rows))

  return jax.lax.fori_loop(0, n_blocks, body, init)


def _factor(model, hess, damping):
  """Cholesky factor(s) of the (damped) Hessian: batched per user for per-user classes."""
  eye = jnp.eye(hess.shape[-1], dtype=hess.dtype)
  return jnp.linalg.cholesky(hess + damping * eye.reshape((1,) * (hess.ndim - 2) + eye.shape))


def _solve(model, factor, grad):
  """Newton direction -Hess^{-1} grad from the Cholesky factor."""
  solve = lambda f, g: jax.scipy.linalg.cho_solve((f, True), g)
  if model.per_user:
    return -jax.vmap(solve)(factor, grad)
  return -solve(factor, grad.reshape(-1)).reshape(grad.shape)


_QUADRATIC_REGION = 1e-2  # Newton decrement^2 / 2 below which full steps are taken


class _SolverState(NamedTuple):
  params: jax.Array
  grad: jax.Array
  decrement: jax.Array
  iteration: jax.Array
  hessians: jax.Array
  stalled: jax.Array


def fit_erm(model: ModelClass, choice_model: ChoiceModel, params_init: jax.Array,
            data: ChoiceData, ridge, *, tol: float = 1e-12, max_iterations: int = 30,
            max_chord_steps: int = 6, max_backtracks: int = 20,
            block_size: Optional[int] = None, n_rows=None) -> ERMResult:
  """Exact ERM: the minimiser of the penalised negative log-likelihood of all data.

  Each outer iteration evaluates the Hessian at the current iterate, takes a
  Newton step (Armijo backtracking outside the quadratic region), then, while
  inside the quadratic region, reuses that Hessian's Cholesky factor for up to
  ``max_chord_steps`` further steps that need only a gradient each (chord
  Newton: linear convergence at a rate set by how much the Hessian moved,
  which is tiny for a warm start). The loop structure is static, so under
  ``vmap`` the seeds share each Hessian evaluation instead of paying for it on
  every step.

  Args:
    model: the :class:`ModelClass`.
    choice_model: the feedback model whose likelihood is maximised.
    params_init: warm start, shape ``model.param_shape``.
    data: the :class:`ChoiceData` buffer (masked rows ignored).
    ridge: () traced penalty ``ridge/2 ||Theta||^2`` (>= 0).
    tol: stop when decrement^2 / 2 <= tol * max(1, number of observed rows),
      the decrement measured with the latest Hessian factor.
    max_iterations: budget of steps (Newton and chord together; static).
    max_chord_steps: chord steps per Hessian evaluation (static).
    max_backtracks: Armijo halvings per Newton step (static).
    block_size: if given (static), sums over the data run in blocks of this
      many rows and stop after the first ``n_rows`` rows, so a buffer filled
      to ``t`` rows costs O(t) rather than O(capacity); the buffer's length
      must be a multiple of ``block_size``.
    n_rows: () traced count of leading rows that may hold data (with
      ``block_size``); rows beyond it are never read.

  Returns:
    An :class:`ERMResult`; never raises inside ``jit``.
  """
  ridge = jnp.asarray(ridge, params_init.dtype)
  damping = jnp.where(ridge > 0, 0.0, 1e-6).astype(params_init.dtype)
  n_obs = jnp.maximum(jnp.sum(data.mask), 1).astype(params_init.dtype)
  threshold = tol * n_obs
  if block_size is None:
    objective = lambda p: _objective(model, choice_model, p, data, ridge)
    gradient = lambda p: _gradient(model, choice_model, p, data, ridge)
    gradient_hessian = lambda p: _gradient_hessian(model, choice_model, p, data, ridge)
  else:
    n_users, q = model.embedding.shape[0], params_init.shape[-1]
    zero_grad = jnp.zeros((n_users, q), params_init.dtype)
    zero_hess = jnp.zeros((n_users, q, q), params_init.dtype)
    zero = jnp.zeros((), params_init.dtype)

    def objective(p):
      nll = _over_blocks(data, block_size, n_rows,
                         lambda rows: negative_log_likelihood(model, choice_model, p, rows),
                         zero)
      return nll + 0.5 * ridge * jnp.sum(p**2)

    def gradient(p):
      user_grad = _over_blocks(
          data, block_size, n_rows,
          lambda rows: _per_user_gradient(model, choice_model, p, rows), zero_grad)
      return _assemble(model, p, ridge, user_grad)

    def gradient_hessian(p):
      user_grad, user_hess = _over_blocks(
          data, block_size, n_rows,
          lambda rows: _user_statistics(model, choice_model, p, rows), (zero_grad, zero_hess))
      return _assemble(model, p, ridge, user_grad, user_hess)

  def outer_cond(state):
    return ((state.iteration < max_iterations) & (state.decrement > threshold) &
            ~state.stalled)

  def outer_body(state):
    grad, hess = gradient_hessian(state.params)
    factor = _factor(model, hess, damping)
    direction = _solve(model, factor, grad)
    decrement = -0.5 * jnp.sum(grad * direction)
    slope = -2.0 * decrement
    value0 = objective(state.params)
    quadratic = decrement <= _QUADRATIC_REGION

    def ls_cond(carry):
      step, value, count = carry
      return ~quadratic & (count < max_backtracks) & ~(value <= value0 + 1e-4 * step * slope)

    def ls_body(carry):
      step, _, count = carry
      step = 0.5 * step
      return step, objective(state.params + step * direction), count + 1

    first = objective(state.params + direction)
    step, value, _ = jax.lax.while_loop(ls_cond, ls_body, (jnp.ones_like(value0), first, 0))
    accepted = ((value <= value0 + 1e-4 * step * slope) | quadratic) & jnp.isfinite(value)
    accepted &= decrement > threshold
    params = jnp.where(accepted, state.params + step * direction, state.params)
    grad = gradient(params)
    direction = _solve(model, factor, grad)
    decrement_new = -0.5 * jnp.sum(grad * direction)
    decrement_new = jnp.where(accepted, decrement_new, decrement)

    def chord_cond(carry):
      _, _, _, dec, count = carry
      return ((count < max_chord_steps) & (dec > threshold) & (dec <= _QUADRATIC_REGION) &
              accepted & (state.iteration + 1 + count < max_iterations))

    def chord_body(carry):
      params, _, direction, _, count = carry
      params = params + direction
      grad = gradient(params)
      direction = _solve(model, factor, grad)
      return params, grad, direction, -0.5 * jnp.sum(grad * direction), count + 1

    params, grad, _, decrement_new, chords = jax.lax.while_loop(
        chord_cond, chord_body, (params, grad, direction, decrement_new, 0))
    return _SolverState(params, grad, decrement_new, state.iteration + 1 + chords,
                        state.hessians + 1, ~accepted)

  grad0 = gradient(params_init)
  state = _SolverState(params_init, grad0, jnp.full((), jnp.inf, params_init.dtype),
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                       jnp.zeros((), jnp.bool_))
  state = jax.lax.while_loop(outer_cond, outer_body, state)
  grad_norm = jnp.max(jnp.abs(state.grad))
  finite = jnp.all(jnp.isfinite(state.params))
  # A failed Cholesky (ridge 0, saturated separable data) leaves a NaN
  # decrement; report it as inf so the diagnostic stays comparable.
  decrement = jnp.where(jnp.isnan(state.decrement), jnp.inf, state.decrement)
  return ERMResult(state.params, state.iteration, grad_norm, decrement,
                   (decrement <= threshold) & finite)


class Learner(NamedTuple):
  """A learner as a bundle of pure functions (the interface new classes implement).

  Attributes:
    init: ``() -> params`` the estimate before any data (zeros for convex classes).
    fit: ``(params, data, ridge) -> ERMResult`` exact ERM warm-started at ``params``.
    scores: ``(params) -> (n_contexts, n_users, n_actions)`` estimated scores.
    cell_scores: ``(params, context, user) -> (n_actions,)``.
    cells_scores: optional ``(params, contexts (B,), users (B,)) -> (B, n_actions)``.
    score_drift_bound: optional ``(params_old, params_new) -> (n_contexts, n_users)``,
      an upper bound on ``max_a |R_new(x, a, i) - R_old(x, a, i)|`` per cell. With
      both optional fields the simulator can keep the exact population regret
      up to date by re-scoring only the cells whose greedy action may have
      changed (``regret_evaluation='incremental'``).
    context_scores: optional ``(params, context) -> (n_users, n_actions)``,
      used to evaluate every cell one context at a time on CPU.
    fits_in_blocks: ``fit`` accepts ``block_size=`` and ``n_rows=`` (see
      :func:`fit_erm`), so a buffer filled to t rows costs O(t).
  """

  init: Callable
  fit: Callable
  scores: Callable
  cell_scores: Callable
  cells_scores: Optional[Callable] = None
  score_drift_bound: Optional[Callable] = None
  context_scores: Optional[Callable] = None
  fits_in_blocks: bool = False


def user_vectors(model: ModelClass, params: jax.Array) -> jax.Array:
  """w_i = Theta^T e_i, (n_users, q): R_theta(x, a, i) = <w_i, f(x, a)>."""
  return params if model.per_user else model.embedding @ params


def make_learner(model: ModelClass, choice_model: ChoiceModel, *, tol: float = 1e-12,
                 max_iterations: int = 30) -> Learner:
  """Greedy exact-ERM learner over a convex :class:`ModelClass`."""
  V.positive_float("tol", tol)
  V.positive_int("max_iterations", max_iterations)
  shape = model.param_shape
  feature_norm = jnp.max(jnp.linalg.norm(model.features, axis=-1), axis=-1)  # (C,)

  def init():
    return jnp.zeros(shape, jnp.float32)

  def fit(params, data, ridge, block_size=None, n_rows=None):
    return fit_erm(model, choice_model, params, data, ridge, tol=tol,
                   max_iterations=max_iterations, block_size=block_size, n_rows=n_rows)

  def cells_scores(params, contexts, users):
    weights = user_vectors(model, params)[users]  # (B, q)
    return jnp.einsum("baq,bq->ba", model.features[contexts], weights)

  def score_drift_bound(params_old, params_new):
    # |<w_new - w_old, f(x, a)>| <= ||w_new - w_old|| * max_a ||f(x, a)|| (Cauchy-Schwarz).
    drift = jnp.linalg.norm(user_vectors(model, params_new - params_old), axis=-1)  # (U,)
    return feature_norm[:, None] * drift[None, :]

  def context_scores(params, context):
    return user_vectors(model, params) @ model.features[context].T

  return Learner(init, fit, lambda params: scores(model, params),
                 lambda params, context, user: cell_scores(model, params, context, user),
                 cells_scores, score_drift_bound, context_scores, True)
