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

so its cost is linear in the data and independent of ``m``. For outer-product
features ``f(x, a) = x (outer) a`` the blocked gradient goes one step further:
each row adds a d-vector to its (context, user) cell of a table, and the
per-user statistics come from that table by one matrix product
(:func:`_cell_table_user_gradient`). The table's fixed cost per call only pays
once there are enough rows: ``make_learner(cell_table_from=...)`` keeps the
per-user sums below that many rows (the simulator's ``map`` path does). On the
CPU the same statistics can come from a native kernel that visits each row
once and nothing per cell (:func:`native_user_gradient`,
``make_learner(native_gradient=True)``).

Exact ERM minimises ``sum_n -log P(outcome_n) + ridge/2 ||Theta||_F^2`` by
Newton's method (Armijo backtracking while the Newton decrement is above
``1e-2``, full steps inside that quadratic region), warm-started, stopping when the
Newton decrement ``lambda^2 = g^T Hess^{-1} g`` satisfies
``lambda^2 / 2 <= tol * max(1, n_data)`` (a bound on the suboptimality of the
mean loss), within ``max_iterations``. The solver never raises inside ``jit``:
it reports ``converged``, the iterations used and the final gradient norm.

:func:`fit_erm_carried` reaches the same minimiser under the same stopping
rule from a carried inverse Hessian (Woodbury update per new observation,
BFGS update per step), so a warm refit usually needs a few gradients and no
Hessian; the simulator uses it by default (``erm_hessian='carried'``).

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
from jaxbandit.precision import full_precision

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
                   data_fields=["embedding", "features", "outer_factors"],
                   meta_fields=["per_user", "name"])
@dataclasses.dataclass(frozen=True)
class ModelClass:
  """A linear-in-parameters model class (a pytree; ``per_user`` and ``name`` are static).

  Attributes:
    embedding: (n_users, m) known user embeddings; for per-user classes the
      identity is implied and this is a (n_users, 0) placeholder.
    features: (n_contexts, n_actions, q) known features f(x, a).
    per_user: whether Theta has one row per user (one-hot embeddings).
    name: the class name.
    outer_factors: for outer-product features ``f(x, a) = x (outer) a``, the
      factors ``(contexts (C, d), actions (C, A, d))``; None otherwise. They
      make the regret's score factors d- rather than d^2-dimensional
      (:func:`score_queries`, :func:`score_keys`).
  """

  embedding: jax.Array
  features: jax.Array
  per_user: bool
  name: str
  outer_factors: Optional[tuple] = None

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
  factors = (instance.contexts, instance.actions)
  if name == "known_heads":
    return ModelClass(instance.heads, _outer_features(instance), False, name, factors)
  if name == "pooled":
    return ModelClass(jnp.ones((n_users, 1), jnp.float32), _outer_features(instance), False,
                      name, factors)
  placeholder = jnp.zeros((n_users, 0), jnp.float32)
  if name == "known_directions":
    return ModelClass(placeholder, latent_features(instance), True, name)
  return ModelClass(placeholder, _outer_features(instance), True, name, factors)


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


def _scores_of(model: ModelClass, params: jax.Array, features: jax.Array) -> jax.Array:
  """Scores of every user for feature rows (..., A, q): (..., U, A).

  Latent-first, ``e_i^T (Theta f)``, when the embedding is shorter than the
  features (m (q + U) products per action instead of U q); otherwise through
  the user vectors ``w_i = Theta^T e_i``.
  """
  if not model.per_user and model.embedding.shape[1] < params.shape[1]:
    projected = jnp.einsum("...aq,mq->...ma", features, params)
    return jnp.einsum("um,...ma->...ua", model.embedding, projected)
  return jnp.einsum("...aq,uq->...ua", features, user_vectors(model, params))


def scores(model: ModelClass, params: jax.Array) -> jax.Array:
  """Estimated scores for every cell, (n_contexts, n_users, n_actions)."""
  return _scores_of(model, params, model.features)


def cell_scores(model: ModelClass, params: jax.Array, context, user) -> jax.Array:
  """Estimated scores of every action for one (context, user), (n_actions,)."""
  features = model.features[context]  # (A, q)
  if model.per_user:
    return features @ params[user]
  return features @ (params.T @ model.embedding[user])


def _data_utilities(model: ModelClass, params, data: ChoiceData):
  features = model.features[data.contexts[:, None], data.slates]  # (n, K, q)
  weights = user_vectors(model, params)[data.users]  # (n, q): U m q products, not n m q
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


# The cell-table gradient (below) pays a fixed pass over a (C, U, d) table per
# call and saves (K + 2)(d^2 - d) numbers moved per row. On a 2-core CPU at
# paper size (C U d = 50,000) it broke even at 500-1,100 rows, so it is used
# when the buffer's mean fill over a run, half its capacity, reaches C U d / 64.
_CELL_TABLE_ROWS_RATIO = 32
# Blocks of more rows made XLA:CPU's gather and scatter-add 3-4x slower per row.
_CELL_TABLE_MAX_BLOCK = 256


def cell_table_applies(n_contexts: int, n_users: int, d: int, capacity: int,
                       block_size: Optional[int]) -> bool:
  """Whether an outer-product class's gradient over a buffer of ``capacity`` rows,
  summed in blocks of ``block_size`` (None: no blocks), uses the cell table:
  blocks of at most 256 rows and ``C U d <= 32 capacity``."""
  if block_size is None or block_size > _CELL_TABLE_MAX_BLOCK:
    return False
  return n_contexts * n_users * d <= _CELL_TABLE_ROWS_RATIO * capacity


def _uses_cell_table(model: ModelClass, data: ChoiceData, block_size: Optional[int]) -> bool:
  """Whether the blocked gradient goes through :func:`_cell_table_user_gradient` (static)."""
  if model.outer_factors is None:
    return False
  n_contexts, _, d = model.outer_factors[1].shape
  return cell_table_applies(n_contexts, model.embedding.shape[0], d, data.contexts.shape[0],
                            block_size)


def _cell_table_user_gradient(model, choice_model, params, data, block_size, n_rows):
  """Per-user gradient statistics G_i (U, d^2) for outer-product features, from a cell table.

  With ``f(x, a) = x (outer) a`` a row's utilities are ``<g_xi, a_k>`` for the
  cell's query ``g_xi = W_i^T x`` (d numbers, :func:`score_queries`), and its
  gradient term is ``x (outer) D`` with ``D = sum_k grad_k a_k``. Each row
  therefore gathers its query and its slate's d-vectors and adds ``D`` (d
  numbers) to its cell of a (C, U, d) table; one matrix product with the
  contexts turns the table into ``G_i = sum_x x (outer) D_xi``. That is
  (K + 2) d numbers moved per row instead of (K + 2) d^2, for a fixed cost of
  one pass over the table. Only the first ``n_rows`` rows are visited,
  ``block_size`` at a time (:func:`_fold_blocks`).
  """
  contexts, actions = model.outer_factors
  n_contexts, n_actions, d = actions.shape
  n_users = model.embedding.shape[0]
  queries = score_queries(model, params).reshape(n_contexts * n_users, d)
  keys = actions.reshape(n_contexts * n_actions, d)

  def add_rows(rows, table):
    cells = rows.contexts * n_users + rows.users  # (n,)
    slate_keys = keys[rows.contexts[:, None] * n_actions + rows.slates]  # (n, K, d)
    utilities = jnp.sum(queries[cells][:, None, :] * slate_keys, axis=-1)  # (n, K)
    grad_u, _ = jax.vmap(choice_model.gradient_hessian)(utilities, rows.outcomes)
    grad_u = grad_u * rows.mask.astype(params.dtype)[:, None]
    return table.at[cells].add(jnp.sum(grad_u[:, :, None] * slate_keys, axis=1))

  table = _fold_blocks(data, block_size, n_rows, add_rows,
                       jnp.zeros((n_contexts * n_users, d), params.dtype))
  # G[i, (j, l)] = sum_x x[j] D[x, i, l]: one (d, C) @ (C, U d) product.
  stats = contexts.T @ table.reshape(n_contexts, n_users * d)  # (d, U d)
  return stats.reshape(d, n_users, d).transpose(1, 0, 2).reshape(n_users, d * d)


def native_gradient_applies(model: ModelClass, slate_size: int) -> bool:
  """Whether :func:`native_user_gradient` handles ``model`` (static): outer-product
  features, slates of at most 16 actions."""
  return model.outer_factors is not None and slate_size <= 16


def native_user_gradient(model, params, data: ChoiceData, n_rows=None):
  """Per-user gradient statistics G_i (U, d^2) from the native kernel (CPU only).

  The same statistics as :func:`_per_user_gradient` and
  :func:`_cell_table_user_gradient` for outer-product features and any
  Plackett-Luce choice model: per row the query ``W_i^T x``, the slate's
  utilities, their gradient and ``x (outer) D`` added to the user's statistic,
  summed in float32 vectors for Bradley-Terry pairs of up to 8 factors, in float64
  otherwise (``csrc/user_gradient.cc``). It visits the first ``n_rows`` rows
  (all when None) and nothing per cell, so a call costs O(rows) with almost no
  fixed part. Tracing it builds and registers the native kernels if needed
  (:func:`jaxbandit.native.status`) and raises ValueError where they cannot run.
  """
  from jaxbandit import native

  n_users = model.embedding.shape[0]
  d = model.outer_factors[1].shape[-1]
  gradient = jax.ffi.ffi_call(native.GRADIENT_TARGET,
                              jax.ShapeDtypeStruct((n_users, d * d), jnp.float32),
                              vmap_method="sequential")
  return gradient(user_vectors(model, params).astype(jnp.float32),
                  *_native_row_inputs(model, data, n_rows, "the native gradient")
                  ).astype(params.dtype)


def _native_row_inputs(model, data: ChoiceData, n_rows, what: str):
  """The inputs the native row pass reads, in its kernels' order: contexts (C, d),
  actions (C, A, d), the rows' contexts, users, slates, outcomes and weights, and
  the rows to visit (all when ``n_rows`` is None). Tracing it builds and
  registers the native kernels if needed and raises ValueError, naming ``what``,
  where they cannot run."""
  from jaxbandit import native

  status = native.status()
  if not status.available:
    raise ValueError(f"{what} needs the native CPU kernels, which are not available: "
                     f"{status.reason}")
  contexts, actions = model.outer_factors
  rows = data.contexts.shape[0] if n_rows is None else n_rows
  return (contexts.astype(jnp.float32), actions.astype(jnp.float32), data.contexts, data.users,
          data.slates, data.outcomes, data.mask.astype(jnp.float32), jnp.asarray(rows, jnp.int32))


def native_steps_apply(model: ModelClass, slate_size: int) -> bool:
  """Whether :func:`native_carried_steps` handles ``model`` (static): the classes
  :func:`native_user_gradient` handles whose parameters are shared (not per user)."""
  return native_gradient_applies(model, slate_size) and not model.per_user


def native_carried_steps(model, data: ChoiceData, n_rows, params, grad, direction, decrement,
                         inverse, usable, ridge, threshold, floor, max_steps: int):
  """The carried refit's quasi-Newton steps as one native call (CPU only).

  The loop of :func:`carried_quasi_newton` for the classes of
  :func:`native_steps_apply`: while ``usable``, the decrement above ``threshold``
  and fewer than ``max_steps`` steps taken, a trial step ``params + direction``,
  its gradient from the rows (the row pass of :func:`native_user_gradient`),
  the BFGS update of ``inverse`` that :func:`_secant_update` would make (with
  its ``floor``), the next direction ``-inverse @ grad`` and decrement; a step
  is kept only if the decrement fell. ``csrc/user_gradient.cc`` runs it as one
  custom call a refit instead of a dozen XLA operations a step, and applies
  each step's update to a row of the inverse as the next step's pass reads it,
  so k steps read the inverse k + 1 times instead of 2k. The arithmetic is
  float32 as in XLA, summed in another order: iterates agree to rounding, not
  bit for bit.

  Args:
    grad, direction, decrement: at ``params``: the penalised gradient over
      ``data``, ``-inverse @ grad`` and ``grad^T inverse grad / 2``.
    inverse: the carried inverse Hessian (p, p), the new row's Woodbury update applied.
    usable: () bool, whether to take any step.
    max_steps: most steps (static).

  Returns:
    ``(params, grad, decrement, inverse, steps)`` after the last kept step.
  """
  from jaxbandit import native

  rows = _native_row_inputs(model, data, n_rows, "the native quasi-Newton steps")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  settings = jnp.stack([f32(ridge), f32(threshold), f32(floor)])
  limits = jnp.stack([jnp.asarray(usable, jnp.int32), jnp.asarray(max_steps, jnp.int32)])
  call = jax.ffi.ffi_call(
      native.STEPS_TARGET,
      (jax.ShapeDtypeStruct(params.shape, jnp.float32),
       jax.ShapeDtypeStruct(params.shape, jnp.float32),
       jax.ShapeDtypeStruct((), jnp.float32),
       jax.ShapeDtypeStruct(inverse.shape, jnp.float32),
       jax.ShapeDtypeStruct((), jnp.int32)),
      vmap_method="sequential", input_output_aliases={15: 3})
  new_params, new_grad, new_decrement, new_inverse, steps = call(
      f32(model.embedding), *rows, settings, limits, f32(params), f32(grad), f32(direction),
      f32(decrement), f32(inverse))
  return (new_params.astype(params.dtype), new_grad.astype(params.dtype),
          new_decrement.astype(params.dtype), new_inverse.astype(inverse.dtype), steps)


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


def _fold_blocks(data: ChoiceData, block_size: int, n_rows, step, init):
  """``total = step(rows, total)`` over the first ``n_rows`` rows of ``data``,
  ``block_size`` at a time, from ``init``.

  The trip count is ``ceil(n_rows / block_size)``, so the work grows with the
  rows filled so far rather than with the buffer's capacity (a multiple of
  ``block_size``); rows past ``n_rows`` inside the last block are masked.
  """
  def body(index, total):
    start = index * block_size
    rows = jax.tree_util.tree_map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, start, block_size, axis=0), data)
    return step(rows, total)

  return jax.lax.fori_loop(0, (n_rows + block_size - 1) // block_size, body, init)


def _over_blocks(data: ChoiceData, block_size: int, n_rows, fn, init):
  """Sums ``fn(rows)`` over the first ``n_rows`` rows of ``data``, ``block_size`` at a
  time (see :func:`_fold_blocks`)."""
  return _fold_blocks(data, block_size, n_rows,
                      lambda rows, total: jax.tree_util.tree_map(jnp.add, total, fn(rows)),
                      init)


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
  stalled: jax.Array
  factor: jax.Array  # the latest Hessian's Cholesky factor (keep_factor), else a dummy ()


def _objective_functions(model, choice_model, data, ridge, block_size, n_rows, dtype,
                         cell_table_from=None, native_gradient=False):
  """``(objective, gradient, gradient_hessian)`` of the penalised loss over ``data``.

  With ``block_size`` the sums visit only the first ``n_rows`` rows, a block
  at a time (see :func:`_over_blocks`); otherwise the whole buffer at once.
  Where the buffer is large enough for the cell table (:func:`_uses_cell_table`),
  ``cell_table_from`` (rows, static, or None) keeps the per-user path while
  ``n_rows`` is below it: the table's fixed cost per call (every cell's
  query, the table cleared and multiplied by the contexts) outweighs its
  saving per row until there are about that many rows. The choice is a
  ``lax.cond`` on ``n_rows``, so it is only worth making where ``n_rows`` is
  not batched (under ``vmap`` both branches would run). ``native_gradient``
  (static) takes the gradient from :func:`native_user_gradient` instead, for
  the classes it handles.
  """
  native = native_gradient and native_gradient_applies(model, data.slates.shape[-1])
  if block_size is None:
    objective = lambda p: _objective(model, choice_model, p, data, ridge)
    if native:
      gradient = lambda p: _assemble(model, p, ridge, native_user_gradient(model, p, data))
    else:
      gradient = lambda p: _gradient(model, choice_model, p, data, ridge)
    gradient_hessian = lambda p: _gradient_hessian(model, choice_model, p, data, ridge)
    return objective, gradient, gradient_hessian
  n_users, q = model.embedding.shape[0], model.features.shape[-1]
  zero_grad = jnp.zeros((n_users, q), dtype)
  zero_hess = jnp.zeros((n_users, q, q), dtype)
  zero = jnp.zeros((), dtype)

  def objective(p):
    nll = _over_blocks(data, block_size, n_rows,
                       lambda rows: negative_log_likelihood(model, choice_model, p, rows), zero)
    return nll + 0.5 * ridge * jnp.sum(p**2)

  def per_user(p):
    return _over_blocks(data, block_size, n_rows,
                        lambda rows: _per_user_gradient(model, choice_model, p, rows), zero_grad)

  def cell_table(p):
    return _cell_table_user_gradient(model, choice_model, p, data, block_size, n_rows)

  def gradient(p):
    if native:
      user_grad = native_user_gradient(model, p, data, n_rows)
    elif not _uses_cell_table(model, data, block_size):
      user_grad = per_user(p)
    elif cell_table_from is None:
      user_grad = cell_table(p)
    else:
      user_grad = jax.lax.cond(n_rows < cell_table_from, per_user, cell_table, p)
    return _assemble(model, p, ridge, user_grad)

  def gradient_hessian(p):
    user_grad, user_hess = _over_blocks(
        data, block_size, n_rows,
        lambda rows: _user_statistics(model, choice_model, p, rows), (zero_grad, zero_hess))
    return _assemble(model, p, ridge, user_grad, user_hess)

  return objective, gradient, gradient_hessian


def _newton(model, functions, params_init, grad_init, decrement_init, threshold, damping, *,
            max_iterations, max_chord_steps, max_backtracks,
            keep_factor=False) -> _SolverState:
  """Damped Newton with chord steps from ``params_init`` until the decrement meets ``threshold``.

  ``decrement_init`` is the decrement already known at ``params_init`` (inf
  if unknown): at or below ``threshold`` the loop makes no iteration.
  ``keep_factor`` (static): the state keeps the last iteration's Cholesky
  factor (zeros if none ran), for a caller that wants the inverse Hessian.
  """
  objective, gradient, gradient_hessian = functions

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
    return _SolverState(params, grad, decrement_new, state.iteration + 1 + chords, ~accepted,
                        factor if keep_factor else state.factor)

  factor = (jnp.zeros(_hessian_shape(model), params_init.dtype) if keep_factor else
            jnp.zeros((), params_init.dtype))
  state = _SolverState(params_init, grad_init, jnp.asarray(decrement_init, params_init.dtype),
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_), factor)
  return jax.lax.while_loop(outer_cond, outer_body, state)


def _result(params, grad, decrement, threshold, iterations) -> ERMResult:
  grad_norm = jnp.max(jnp.abs(grad))
  finite = jnp.all(jnp.isfinite(params))
  # A failed Cholesky (ridge 0, saturated separable data) leaves a NaN
  # decrement; report it as inf so the diagnostic stays comparable.
  decrement = jnp.where(jnp.isnan(decrement), jnp.inf, decrement)
  return ERMResult(params, iterations, grad_norm, decrement, (decrement <= threshold) & finite)


def _setup(params_init, data, ridge, tol):
  ridge = jnp.asarray(ridge, params_init.dtype)
  damping = jnp.where(ridge > 0, 0.0, 1e-6).astype(params_init.dtype)
  n_obs = jnp.maximum(jnp.sum(data.mask), 1).astype(params_init.dtype)
  return ridge, damping, tol * n_obs


@full_precision
def fit_erm(model: ModelClass, choice_model: ChoiceModel, params_init: jax.Array,
            data: ChoiceData, ridge, *, tol: float = 1e-12, max_iterations: int = 30,
            max_chord_steps: int = 6, max_backtracks: int = 20,
            block_size: Optional[int] = None, n_rows=None,
            cell_table_from: Optional[int] = None,
            native_gradient: bool = False) -> ERMResult:
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
    cell_table_from: with ``block_size``, the rows from which an
      outer-product class's gradient goes through the cell table (static;
      None: whenever the buffer is large enough; see :func:`_objective_functions`).
    native_gradient: take the gradient from the native kernel
      (:func:`native_user_gradient`; static; CPU only, the kernel registered)
      for the classes it handles; Hessians stay in XLA.

  Returns:
    An :class:`ERMResult`; never raises inside ``jit``.
  """
  ridge, damping, threshold = _setup(params_init, data, ridge, tol)
  functions = _objective_functions(model, choice_model, data, ridge, block_size, n_rows,
                                   params_init.dtype, cell_table_from, native_gradient)
  state = _newton(model, functions, params_init, functions[1](params_init), jnp.inf,
                  threshold, damping, max_iterations=max_iterations,
                  max_chord_steps=max_chord_steps, max_backtracks=max_backtracks)
  return _result(state.params, state.grad, state.decrement, threshold, state.iteration)


# ---------------------------------------------------------------------------
# Exact ERM with a carried inverse Hessian
# ---------------------------------------------------------------------------


class HessianCarry(NamedTuple):
  """An approximate inverse Hessian handed from one refit to the next.

  Attributes:
    inverse: the inverse of the penalised Hessian at a recent estimate, updated
      by the Woodbury identity with every new observation: (m*q, m*q) for
      shared-parameter classes, (U, q, q) for per-user classes.
    valid: () bool, False until the first refresh (the first refit runs Newton).
    params: the estimate the previous refit returned, ``model.param_shape``.
    grad: the penalised gradient over the previous refit's data at ``params``.
      The next refit, warm-started there, starts from ``grad`` plus the new
      observation's term (O(1)) instead of a pass over all data (O(n)).
  """

  inverse: jax.Array
  valid: jax.Array
  params: jax.Array
  grad: jax.Array


def _hessian_shape(model: ModelClass):
  """The Hessian's shape: (U, q, q) per user for per-user classes, (m*q, m*q) otherwise."""
  rows, q = model.param_shape
  return (rows, q, q) if model.per_user else (rows * q, rows * q)


def empty_hessian_carry(model: ModelClass) -> HessianCarry:
  rows, q = model.param_shape
  shape = _hessian_shape(model)
  zeros = jnp.zeros((rows, q), jnp.float32)
  return HessianCarry(jnp.zeros(shape, jnp.float32), jnp.zeros((), jnp.bool_), zeros, zeros)


def _slate_terms(model: ModelClass, choice_model: ChoiceModel, params: jax.Array, context, user,
                 slate, outcome):
  """One observation's slate features (K, q) and the choice model's gradient (K,)
  and Hessian (K, K) in the slate's utilities at ``params``."""
  features = model.features[context, slate]  # (K, q)
  weights = params[user] if model.per_user else model.embedding[user] @ params  # (q,)
  grad_u, hess_u = choice_model.gradient_hessian(features @ weights, outcome)
  return features, grad_u, hess_u


def observation_gradient(model: ModelClass, choice_model: ChoiceModel, params: jax.Array,
                         context, user, slate, outcome) -> jax.Array:
  """Gradient of one observation's negative log-likelihood, ``model.param_shape``.

  The term the observation adds to :func:`fit_erm`'s gradient (no ridge): the
  features of the slate weighted by the choice model's gradient in the
  utilities, placed in the user's row (per-user classes) or spread over the
  user's embedding.
  """
  features, grad_u, _ = _slate_terms(model, choice_model, params, context, user, slate, outcome)
  per_datum = grad_u @ features  # (q,)
  if model.per_user:
    return jnp.zeros_like(params).at[user].set(per_datum)
  return model.embedding[user][:, None] * per_datum[None, :]


def _inverse_from_factor(model, factor):
  """Inverse of a matrix from its (lower) Cholesky factor, symmetrised (batched per user)."""
  eye = jnp.eye(factor.shape[-1], dtype=factor.dtype)
  solve = lambda f: jax.scipy.linalg.cho_solve((f, True), eye)
  inverse = jax.vmap(solve)(factor) if model.per_user else solve(factor)
  return 0.5 * (inverse + jnp.swapaxes(inverse, -1, -2))


def _precondition(model, inverse, grad):
  """The chord direction ``-P grad`` for a carried inverse ``P``."""
  if model.per_user:
    return -jnp.einsum("uqr,ur->uq", inverse, grad)
  return -(inverse @ grad.reshape(-1)).reshape(grad.shape)


def add_observation(model: ModelClass, choice_model: ChoiceModel, inverse: jax.Array,
                    params: jax.Array, context, user, slate, outcome) -> jax.Array:
  """Woodbury update of an inverse Hessian for one new observation.

  The observation adds ``J^T S J`` to the Hessian, with ``J`` (K, p) the
  derivative of the slate's utilities in the parameters and ``S`` (K, K) the
  choice model's Hessian in the utilities at ``params``; then
  ``(H + J^T S J)^-1 = P - P J^T (I + S J P J^T)^-1 S J P`` for ``P = H^-1``
  (valid for singular ``S``), at cost O(K p^2).
  """
  features, _, hess = _slate_terms(model, choice_model, params, context, user, slate, outcome)
  if model.per_user:
    jac, block = features, inverse[user]
  else:
    embedding = model.embedding[user]  # (m,)
    jac = (embedding[None, :, None] * features[:, None, :]).reshape(features.shape[0], -1)
    block = inverse
  projected = jac @ block  # (K, p)
  n = hess.shape[0]
  inner = jnp.eye(n, dtype=hess.dtype) + hess @ (projected @ jac.T)
  core = jnp.linalg.solve(inner, hess)  # (I + S J P J^T)^-1 S: symmetric (K, K)
  core = 0.5 * (core + core.T)
  if n <= 4:
    # P J^T core J P as a sum of terms each symmetric elementwise, so the
    # update keeps P exactly symmetric in one fused pass over it (no transpose).
    change = sum(core[k, k] * jnp.outer(projected[k], projected[k]) for k in range(n))
    for k in range(n):
      for l in range(k + 1, n):
        change = change + core[k, l] * (jnp.outer(projected[k], projected[l]) +
                                        jnp.outer(projected[l], projected[k]))
    updated = block - change
  else:
    updated = block - projected.T @ (core @ projected)
    updated = 0.5 * (updated + updated.T)
  return inverse.at[user].set(updated) if model.per_user else updated


def _secant_update(model, inverse, step, grad, grad_change, floor):
  """BFGS update of an inverse Hessian with one secant pair (per user block if per-user).

  ``P <- (I - r s y^T) P (I - r y s^T) + r s s^T`` with ``r = 1 / s^T y``: the
  updated ``P`` maps ``y`` to ``s`` exactly, so it follows the Hessian's change
  along the step just taken. A block is updated only when its pair carries
  curvature information rather than float32 noise: the step's share of the
  decrement, ``-s^T grad / 2``, is above ``floor`` (a hundred times the
  stopping threshold), ``s^T y > 0`` and ``y^T P y`` is within a factor 4 of
  ``s^T y`` (the carried inverse is already close).

  Args:
    model: the :class:`ModelClass` (per-user classes update (U, q, q) blocks).
    inverse: the carried inverse Hessian.
    step: ``s``, the step just taken (``model.param_shape``).
    grad: the gradient before the step.
    grad_change: ``y``, the gradient after the step minus ``grad``.
    floor: () the smallest decrement share worth an update.
  """
  def update(p, s, g, y):
    sy = jnp.dot(s, y)
    py = p @ y
    ypy = jnp.dot(y, py)
    ok = (-0.5 * jnp.dot(s, g) > floor) & (sy > 0) & (ypy < 4.0 * sy) & (4.0 * ypy > sy)
    r = jnp.where(ok, 1.0 / jnp.where(ok, sy, 1.0), 0.0)
    return (p - r * (jnp.outer(s, py) + jnp.outer(py, s)) +
            (r * r * ypy + r) * jnp.outer(s, s))

  if model.per_user:
    return jax.vmap(update)(inverse, step, grad, grad_change)
  return update(inverse, step.reshape(-1), grad.reshape(-1), grad_change.reshape(-1))


class CarriedFit(NamedTuple):
  """A carried refit between its phases (see :func:`fit_erm_carried`).

  Attributes:
    params, grad: the iterate and the penalised gradient there.
    decrement: the Newton decrement squared / 2 at ``params``, measured with ``inverse``.
    inverse: the inverse Hessian (updated by the observation and the quasi-Newton steps).
    iterations: () int32 steps taken so far (quasi-Newton, then Newton and chord).
    needs_newton: () bool, the quasi-Newton steps stopped short of the
      tolerance: :func:`carried_fallback` must run (it clears the flag).
    threshold: () the stopping threshold ``tol * n``.
  """

  params: jax.Array
  grad: jax.Array
  decrement: jax.Array
  inverse: jax.Array
  iterations: jax.Array
  needs_newton: jax.Array
  threshold: jax.Array


@full_precision
def fit_erm_carried(model: ModelClass, choice_model: ChoiceModel, params_init: jax.Array,
                    carry: HessianCarry, data: ChoiceData, new_observation, ridge, *,
                    tol: float = 1e-12, max_iterations: int = 30, max_chord_steps: int = 8,
                    max_backtracks: int = 20, block_size: Optional[int] = None,
                    n_rows=None, cell_table_from: Optional[int] = None,
                    native_gradient: bool = False):
  """Exact ERM warm-started at ``params_init``, preconditioned by a carried inverse Hessian.

  The same minimiser and the same stopping rule as :func:`fit_erm`
  (decrement^2 / 2 <= tol * n, here measured with the carried inverse), at a
  fraction of the cost when consecutive estimates are close:

  1. the inverse Hessian of the previous refit is updated for the one new
     observation by the Woodbury identity (:func:`add_observation`, O(K p^2)),
     and the gradient at the warm start is the previous refit's plus the new
     observation's term (:func:`observation_gradient`, O(K p)) when the warm
     start is the previous estimate, so no pass over the data is needed yet;
  2. quasi-Newton steps ``theta <- theta - P grad`` follow, one gradient each
     (O(n)), each followed by a BFGS update of ``P`` with the step and the
     gradient change (:func:`_secant_update`, O(p^2)), while the decrement
     keeps falling;
  3. if they stop short of the tolerance, :func:`fit_erm`'s damped Newton
     takes over from there;
  4. the inverse is refreshed only when step 3 ran, which includes the first
     refit: from the Cholesky factor of step 3's last Hessian (a few chord
     steps at most before the solution), so no Hessian is evaluated for it.
     Refreshing without a fallback (a Hessian, its Cholesky and the inverse)
     costs about as much as 30 gradients at n = 1,000, so a few extra quasi-Newton steps
     are cheaper than refreshing whenever the carried inverse is merely
     approximate (refreshing after more than 4 steps was 1.35-2x slower).

  Args:
    model, choice_model, params_init, data, ridge, tol, max_iterations,
      max_backtracks, block_size, n_rows, cell_table_from, native_gradient: as in
      :func:`fit_erm` (``data`` already holds the new observation).
    max_chord_steps: most quasi-Newton steps before the Newton fallback, and
      the fallback's chord steps per Hessian (static).
    carry: the :class:`HessianCarry` of the previous refit.
    new_observation: ``(context, user, slate (K,), outcome (m,))`` of the
      observation added since the previous refit.

  The three phases are also callable apart (:func:`carried_quasi_newton`,
  :func:`carried_fallback`, :func:`carried_result`): a batched caller can run
  step 3, which few refits need, only for the lanes that need it.

  Returns:
    ``(ERMResult, HessianCarry)``; never raises inside ``jit``.
  """
  blocks = dict(block_size=block_size, n_rows=n_rows, cell_table_from=cell_table_from,
                native_gradient=native_gradient)
  fit = carried_quasi_newton(model, choice_model, params_init, carry, data, new_observation,
                             ridge, tol=tol, max_chord_steps=max_chord_steps, **blocks)
  fit = carried_fallback(model, choice_model, fit, data, ridge, max_iterations=max_iterations,
                         max_chord_steps=max_chord_steps, max_backtracks=max_backtracks,
                         **blocks)
  return carried_result(fit)


@full_precision
def carried_quasi_newton(model: ModelClass, choice_model: ChoiceModel, params_init: jax.Array,
                         carry: HessianCarry, data: ChoiceData, new_observation, ridge, *,
                         tol: float = 1e-12, max_chord_steps: int = 8,
                         block_size: Optional[int] = None, n_rows=None,
                         cell_table_from: Optional[int] = None,
                         native_gradient: bool = False) -> CarriedFit:
  """Steps 1-2 of :func:`fit_erm_carried`: the Woodbury update and the quasi-Newton steps."""
  ridge, _, threshold = _setup(params_init, data, ridge, tol)
  _, gradient, _ = _objective_functions(model, choice_model, data, ridge, block_size, n_rows,
                                        params_init.dtype, cell_table_from, native_gradient)
  inverse = jnp.where(carry.valid,
                      add_observation(model, choice_model, carry.inverse, params_init,
                                      *new_observation), carry.inverse)

  # The gradient at the warm start: the previous refit's plus the new
  # observation's term when the warm start is the previous estimate (one
  # O(1) term instead of a pass over all data); a full pass otherwise.
  carried = (carry.valid & jnp.all(params_init == carry.params) &
             jnp.all(jnp.isfinite(carry.grad)))
  grad0 = jax.lax.cond(
      carried,
      lambda: carry.grad + observation_gradient(model, choice_model, params_init,
                                                *new_observation),
      lambda: gradient(params_init))
  direction0 = _precondition(model, inverse, grad0)
  decrement0 = -0.5 * jnp.sum(grad0 * direction0)

  def step_cond(c):
    _, _, _, _, decrement, count, going = c
    return going & (decrement > threshold) & (count < max_chord_steps)

  def step_body(c):
    params, grad, direction, inverse, decrement, count, _ = c
    trial = params + direction
    trial_grad = gradient(trial)
    trial_inverse = _secant_update(model, inverse, direction, grad, trial_grad - grad,
                                   100.0 * threshold)
    trial_direction = _precondition(model, trial_inverse, trial_grad)
    trial_decrement = -0.5 * jnp.sum(trial_grad * trial_direction)
    improved = jnp.isfinite(trial_decrement) & (trial_decrement >= 0) & (
        trial_decrement < decrement)
    pick = lambda new, old: jnp.where(improved, new, old)
    return (pick(trial, params), pick(trial_grad, grad), pick(trial_direction, direction),
            pick(trial_inverse, inverse), pick(trial_decrement, decrement), count + 1, improved)

  usable = carry.valid & jnp.isfinite(decrement0) & (decrement0 >= 0)
  if native_gradient and native_steps_apply(model, data.slates.shape[-1]):
    params, grad, decrement, inverse, chords = native_carried_steps(
        model, data, n_rows, params_init, grad0, direction0, decrement0, inverse, usable, ridge,
        threshold, 100.0 * threshold, max_chord_steps)
  else:
    params, grad, _, inverse, decrement, chords, _ = jax.lax.while_loop(
        step_cond, step_body, (params_init, grad0, direction0, inverse, decrement0, 0, usable))
  solved = usable & (decrement <= threshold)
  return CarriedFit(params, grad, decrement, inverse, jnp.asarray(chords, jnp.int32), ~solved,
                    threshold)


@full_precision
def carried_fallback(model: ModelClass, choice_model: ChoiceModel, fit: CarriedFit,
                     data: ChoiceData, ridge, *, max_iterations: int = 30,
                     max_chord_steps: int = 8, max_backtracks: int = 20,
                     block_size: Optional[int] = None, n_rows=None,
                     cell_table_from: Optional[int] = None,
                     native_gradient: bool = False) -> CarriedFit:
  """Steps 3-4 of :func:`fit_erm_carried`: where ``fit.needs_newton``, damped Newton
  from the quasi-Newton iterate, then a fresh inverse from the Newton's last
  Hessian factor; elsewhere ``fit`` unchanged (both loops make no trip)."""
  ridge, damping, _ = _setup(fit.params, data, ridge, 1.0)
  functions = _objective_functions(model, choice_model, data, ridge, block_size, n_rows,
                                   fit.params.dtype, cell_table_from, native_gradient)
  state = _newton(model, functions, fit.params, fit.grad,
                  jnp.where(fit.needs_newton, jnp.inf, fit.decrement), fit.threshold, damping,
                  max_iterations=max(max_iterations - max_chord_steps, 1),
                  max_chord_steps=max_chord_steps, max_backtracks=max_backtracks,
                  keep_factor=True)

  # Refresh the inverse when the carried one failed, from the factor of the
  # Newton's last Hessian (at its last Newton iterate; only chord steps, inside
  # the quadratic region, follow it). A Hessian at the solution itself cost a
  # pass of Hessian statistics, their assembly and a Cholesky more per
  # fallback; the inverse only preconditions the next refits, which meet the
  # same tolerance. A while loop of 0 or 1 trips, so under vmap it runs only
  # if a lane needs it.
  def refresh(c):
    return _inverse_from_factor(model, state.factor), jnp.zeros((), jnp.bool_)

  inverse, _ = jax.lax.while_loop(lambda c: c[1], refresh, (fit.inverse, fit.needs_newton))
  return CarriedFit(state.params, state.grad, state.decrement, inverse,
                    fit.iterations + state.iteration, jnp.zeros((), jnp.bool_), fit.threshold)


def carried_result(fit: CarriedFit):
  """``(ERMResult, HessianCarry)`` of a carried refit after :func:`carried_fallback`."""
  result = _result(fit.params, fit.grad, fit.decrement, fit.threshold, fit.iterations)
  return result, HessianCarry(fit.inverse, jnp.ones((), jnp.bool_), fit.params, fit.grad)


class Learner(NamedTuple):
  """A learner as a bundle of pure functions (the interface new classes implement).

  Attributes:
    init: ``() -> params`` the estimate before any data (zeros for convex classes).
    fit: ``(params, data, ridge) -> ERMResult`` exact ERM warm-started at ``params``.
    scores: ``(params) -> (n_contexts, n_users, n_actions)`` estimated scores.
    cell_scores: ``(params, context, user) -> (n_actions,)``.
    score_queries: optional ``(params) -> (n_contexts, n_users, r)``, linear in
      ``params``, with ``score_keys`` (n_contexts, n_actions, r): scores are
      ``R(x_c, a, i) = <queries[c, i], score_keys[c, a]>``. With both the
      simulator keeps the exact population regret through
      ``metrics.RegretCache`` (``regret_evaluation='incremental'``) and scores
      every cell through them otherwise.
    score_keys: optional (n_contexts, n_actions, r) action keys.
    fits_in_blocks: ``fit`` accepts ``block_size=`` and ``n_rows=`` (see
      :func:`fit_erm`), so a buffer filled to t rows costs O(t).
    init_carry: optional ``() -> carry``, solver state handed from refit to refit.
    fit_carried: optional ``(params, carry, data, new_observation, ridge,
      block_size=None, n_rows=None) -> (ERMResult, carry)``: the same exact ERM
      as ``fit``, using and updating ``carry`` (see :func:`fit_erm_carried`);
      ``new_observation`` is ``(context, user, slate, outcome)`` of the row
      added since the previous refit.
    carried_phases: optional :class:`CarriedPhases`, ``fit_carried`` split so
      that a batched simulation runs its Newton fallback only for the lanes
      that need it.
    user_vectors: optional ``(params) -> (n_users, q)``, the per-user vectors
      ``score_queries`` is linear in.
    query_scale: optional (n_contexts,) bound ``||queries[c, i] - queries'[c, i]||
      <= query_scale[c] ||w_i - w'_i||`` between any two estimates (rounded
      up). With both, the certified regret pass measures only the cells whose
      user vector has drifted far enough (``metrics.CertifiedCells``); without
      ``user_vectors`` it measures every cell.
  """

  init: Callable
  fit: Callable
  scores: Callable
  cell_scores: Callable
  score_queries: Optional[Callable] = None
  score_keys: Optional[jax.Array] = None
  fits_in_blocks: bool = False
  init_carry: Optional[Callable] = None
  fit_carried: Optional[Callable] = None
  carried_phases: Optional["CarriedPhases"] = None
  user_vectors: Optional[Callable] = None
  query_scale: Optional[jax.Array] = None


class CarriedPhases(NamedTuple):
  """``fit_carried`` in its three phases (see :func:`fit_erm_carried`), for callers
  that batch refits and run the rare Newton fallback only where it is needed:
  ``fit_carried(...) == result(fallback(start(...), data, ridge))``.

  Attributes:
    start: ``(params, carry, data, new_observation, ridge, block_size=None,
      n_rows=None) -> CarriedFit`` (:func:`carried_quasi_newton`).
    fallback: ``(fit, data, ridge, block_size=None, n_rows=None) -> CarriedFit``
      (:func:`carried_fallback`; returns ``fit`` unchanged unless ``fit.needs_newton``).
    result: ``(fit) -> (ERMResult, carry)`` (:func:`carried_result`).
  """

  start: Callable
  fallback: Callable
  result: Callable


def user_vectors(model: ModelClass, params: jax.Array) -> jax.Array:
  """w_i = Theta^T e_i, (n_users, q): R_theta(x, a, i) = <w_i, f(x, a)>."""
  return params if model.per_user else model.embedding @ params


def score_queries(model: ModelClass, params: jax.Array) -> jax.Array:
  """Queries (C, U, r) with scores ``<queries[c, i], score_keys(model)[c, a]>`` (r small).

  Outer-product features ``f(x, a) = x (outer) a`` give ``<w_i, f(x, a)> =
  a^T (W_i^T x)``: the query is ``W_i^T x_c`` and the key the action (r = d
  instead of q = d^2). Otherwise the query is the user vector ``w_i`` and the
  key the feature row (r = q). Linear in ``params``.
  """
  weights = user_vectors(model, params)  # (U, q)
  if model.outer_factors is None:
    return jnp.broadcast_to(weights[None], (model.features.shape[0],) + weights.shape)
  contexts = model.outer_factors[0]
  d = contexts.shape[-1]
  return jnp.einsum("ci,uij->cuj", contexts, weights.reshape(-1, d, d))


def query_scale(model: ModelClass) -> jax.Array:
  """(C,) ``s_c`` with ``||score_queries[c, i] - score_queries'[c, i]|| <= s_c ||w_i - w'_i||``.

  Outer-product features: the query ``W_i^T x_c`` moves at most ``||x_c||``
  times the Frobenius norm of ``W_i``'s move (rounded up by 1e-6); otherwise
  the query is ``w_i`` itself (1).
  """
  if model.outer_factors is None:
    return jnp.ones((model.features.shape[0],), jnp.float32)
  contexts = model.outer_factors[0].astype(jnp.float32)
  return jnp.sqrt(jnp.sum(contexts * contexts, axis=-1)) * (1.0 + 1e-6)


def score_keys(model: ModelClass) -> jax.Array:
  """The action keys (C, A, r) of :func:`score_queries` (constants of the model)."""
  return model.features if model.outer_factors is None else model.outer_factors[1]


def make_learner(model: ModelClass, choice_model: ChoiceModel, *, tol: float = 1e-12,
                 max_iterations: int = 30, cell_table_from: Optional[int] = None,
                 native_gradient: bool = False) -> Learner:
  """Greedy exact-ERM learner over a convex :class:`ModelClass`.

  ``cell_table_from`` (rows, or None) is passed to every blocked refit (see
  :func:`_objective_functions`); give it only where the row count is not
  batched. ``native_gradient`` takes every refit's gradient from the native
  kernel (:func:`native_user_gradient`) where the class allows it; the caller
  makes sure the kernel is registered and the backend is the CPU.
  """
  V.positive_float("tol", tol)
  V.positive_int("max_iterations", max_iterations)
  if cell_table_from is not None:
    V.positive_int("cell_table_from", cell_table_from)
  shape = model.param_shape

  def init():
    return jnp.zeros(shape, jnp.float32)

  def fit(params, data, ridge, block_size=None, n_rows=None):
    return fit_erm(model, choice_model, params, data, ridge, tol=tol,
                   max_iterations=max_iterations, block_size=block_size, n_rows=n_rows,
                   cell_table_from=cell_table_from,
                   native_gradient=native_gradient)

  def fit_carried(params, carry, data, new_observation, ridge, block_size=None, n_rows=None):
    return fit_erm_carried(model, choice_model, params, carry, data, new_observation, ridge,
                           tol=tol, max_iterations=max_iterations, block_size=block_size,
                           n_rows=n_rows, cell_table_from=cell_table_from,
                   native_gradient=native_gradient)

  def start(params, carry, data, new_observation, ridge, block_size=None, n_rows=None):
    return carried_quasi_newton(model, choice_model, params, carry, data, new_observation,
                                ridge, tol=tol, block_size=block_size, n_rows=n_rows,
                                cell_table_from=cell_table_from,
                   native_gradient=native_gradient)

  def fallback(fit, data, ridge, block_size=None, n_rows=None):
    return carried_fallback(model, choice_model, fit, data, ridge,
                            max_iterations=max_iterations, block_size=block_size,
                            n_rows=n_rows, cell_table_from=cell_table_from,
                   native_gradient=native_gradient)

  return Learner(init, fit, lambda params: scores(model, params),
                 lambda params, context, user: cell_scores(model, params, context, user),
                 functools.partial(score_queries, model), score_keys(model), True,
                 lambda: empty_hessian_carry(model), fit_carried,
                 CarriedPhases(start, fallback, carried_result),
                 functools.partial(user_vectors, model), query_scale(model))
