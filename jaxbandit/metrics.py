"""Regret of an estimate: temperature-zero (exact population average), realised, KL-regularised.

All score tensors are (n_contexts, n_users, n_actions); ``weights`` are the
population cell weights d0[x] * rho[i], (n_contexts, n_users); ``support`` is
(n_contexts, n_actions) booleans (pi0 > 0).

References:
  P1 (arXiv 2605.09119) and P2 (arXiv 2604.17207): G(R) and N_eps0 (P1),
  J_beta and the KL-regularised regret (P2).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxbandit.instance import greedy_actions


class TruthTables(NamedTuple):
  """What the metrics need from the truth, computed once per instance.

  Attributes:
    scores: (n_contexts, n_users, n_actions) true scores R*.
    best: (n_contexts, n_users) max over the support of R*.
    weights: (n_contexts, n_users) cell weights d0 x rho.
    support: (n_contexts, n_actions) decision set.
    log_reference: (n_contexts, n_actions) log pi0, -inf off the support.
    action_planes: (n_actions, n_contexts, n_users) the same R*, action-major,
      or None: where present, :func:`factor_cell_regret` carries each cell's
      value through its one pass, reading one contiguous (C, U) plane per
      action, instead of gathering it afterwards (``truth_tables(...,
      action_major=True)``; the simulator's kernels ask for it).
  """

  scores: jax.Array
  best: jax.Array
  weights: jax.Array
  support: jax.Array
  log_reference: jax.Array
  action_planes: Optional[jax.Array] = None


def truth_tables(true_scores, weights, reference_policy, action_major: bool = False) -> TruthTables:
  support = reference_policy > 0
  masked = jnp.where(support[:, None, :], true_scores, -jnp.inf)
  log_reference = jnp.where(support, jnp.log(jnp.where(support, reference_policy, 1.0)),
                            -jnp.inf)
  return TruthTables(true_scores, jnp.max(masked, axis=-1), weights, support, log_reference,
                     jnp.moveaxis(true_scores, -1, 0) if action_major else None)


def cell_regret(truth: TruthTables, estimated_scores) -> jax.Array:
  """Per-cell regret of the greedy selector of an estimate, (n_contexts, n_users)."""
  return greedy_regret(truth, greedy_actions(estimated_scores, truth.support))


def population_regret(truth: TruthTables, estimated_scores) -> jax.Array:
  """Temperature-zero regret G(R_hat) = E_{d0 x rho}[R*(a*) - R*(a_R_hat)], exact."""
  return jnp.sum(truth.weights * cell_regret(truth, estimated_scores))


def kl_value(true_scores, logits_policy, log_reference, beta):
  """J_beta(pi) per cell for pi = softmax(logits_policy): E_pi[R*] - beta KL(pi || pi0)."""
  log_pi = jax.nn.log_softmax(logits_policy, axis=-1)
  pi = jnp.exp(log_pi)
  on_support = jnp.isfinite(log_reference)
  log_ratio = jnp.where(on_support, log_pi - jnp.where(on_support, log_reference, 0.0), 0.0)
  safe_scores = jnp.where(on_support, true_scores, 0.0)
  return jnp.sum(pi * (safe_scores - beta * log_ratio), axis=-1)


def kl_regularized_regret(truth: TruthTables, estimated_scores, beta) -> jax.Array:
  """J_beta(pi*_beta) - J_beta(pi_t) averaged over d0 x rho.

  ``pi_t ∝ pi0 exp(R_hat / beta)`` is the training policy of the estimate and
  ``J_beta(pi*_beta) = beta log E_{pi0}[exp(R* / beta)]`` in closed form.
  """
  log_ref = truth.log_reference[:, None, :]
  optimum = beta * jax.nn.logsumexp(log_ref + truth.scores / beta, axis=-1)
  logits = jnp.where(jnp.isfinite(log_ref), log_ref + estimated_scores / beta, -jnp.inf)
  achieved = kl_value(truth.scores, logits, log_ref, beta)
  return jnp.sum(truth.weights * jnp.maximum(optimum - achieved, 0.0))


# ---------------------------------------------------------------------------
# Exact regret through score factors: every cell, or a candidate cache
# ---------------------------------------------------------------------------
#
# A learner whose scores are inner products R(x_c, a, i) = <g_ci, k_ca> of a
# per-cell query g (C, U, r), linear in its parameters, and a fixed per-action
# key k (C, A, r) (for bilinear models r = d: g = W_i^T x_c, k = a) lets the
# regret be evaluated exactly at a fraction of the cost of scoring every
# (cell, action) in every round.


def _sum_of_products(query_factors, key_factors) -> jax.Array:
  """``sum_j query_factors[j] * key_factors[j]`` (broadcast), summed in index order.

  The one place a score's factors are summed: every regret path (every cell,
  a few cells, the candidates, the running pass over the actions) calls it,
  so they all sum in the same order, whatever layout their factors come in.
  """
  total = query_factors[0] * key_factors[0]
  for query, key in zip(query_factors[1:], key_factors[1:]):
    total = total + query * key
  return total


def factor_scores(queries: jax.Array, keys: jax.Array) -> jax.Array:
  """Scores ``<queries, keys>`` over the last axis, broadcast over the others.

  Written as an explicit sum over the (short) factor axis in a fixed order
  (:func:`_sum_of_products`), so the same (query, key) pair gets the same
  float32 score whichever path (every cell, a few cells, the candidates)
  evaluates it, up to the FMA contraction noted in docs/architecture.md.
  """
  n_factors = queries.shape[-1]
  return _sum_of_products([queries[..., j] for j in range(n_factors)],
                          [keys[..., j] for j in range(n_factors)])


def _first_maximiser(values, labels, n_actions: int):
  """Max over the leading axis and the lowest label among its maximisers ``(top, first)``.

  ``labels`` (broadcastable to ``values``) are action indices; ``n_actions``
  exceeds every one of them.
  """
  top = jnp.max(values, axis=0)
  return top, jnp.min(jnp.where(values == top[None], labels, n_actions), axis=0)


def _scores_by_action(truth: TruthTables, queries, keys):
  """Every cell's scores (A, C, U), actions leading, -inf off the support."""
  by_action = jnp.swapaxes(keys, 0, 1)[:, :, None, :]  # (A, C, 1, r)
  scores = factor_scores(queries[None], by_action)
  return jnp.where(truth.support.T[:, :, None], scores, -jnp.inf), by_action


def _index_bits(n_actions: int) -> int:
  return max(1, (n_actions - 1).bit_length())


def _rescore(scores, support, keys, best_keys_of, query_norm, key_norm, n_candidates):
  """Greedy action, candidate set and safe radius of score columns.

  Args:
    scores: (A, *N) estimated scores of cells of shape N (actions on the
      leading axis, so every reduction below runs across cells in SIMD lanes).
    support: the decision set, broadcastable to (A, *N).
    keys: the action keys, broadcastable to (A, *N, r).
    best_keys_of: ``(*N) int32 first-maximiser index -> (*N, r)`` keys of it.
    query_norm: (*N) ``||g||``; key_norm: ``max_a ||k_a||`` broadcastable to N.
    n_candidates: K, static.

  Returns:
    ``(candidates (K, *N) int32, radius (*N))``: slot 0 is the first maximiser
    a*; slots 1.. are the K - 1 actions that a move of the query could bring
    level with a* soonest, i.e. smallest ``(R(a*) - R(b)) / ||k_b - k_a*||``;
    ``radius`` is that ratio's minimum over every other supported action,
    less a float32 rounding allowance. While the query moves by less than
    ``radius`` (Euclidean norm), no action outside the candidates can reach
    a*'s score: ``R'(b) - R'(a*) = -(R(a*) - R(b)) + <g' - g, k_b - k_a*>``.
  """
  n_actions = scores.shape[0]
  masked = jnp.where(support, scores, -jnp.inf)
  index = jnp.arange(n_actions, dtype=jnp.int32).reshape((-1,) + (1,) * (scores.ndim - 1))
  top, best = _first_maximiser(masked, index, n_actions)  # (*N)
  best_keys = best_keys_of(best)  # (*N, r)
  distance = jnp.sqrt(sum((keys[..., j] - best_keys[None, ..., j])**2
                          for j in range(keys.shape[-1])))  # (A, *N)
  # Two float32 evaluations of a score differ by a few ulps of |g| max ||k||.
  allowance = 1e-5 * (1.0 + query_norm * key_norm)
  ratio = jnp.where(distance > 0, (top[None] - masked - allowance[None]) /
                    (distance * (1.0 + 1e-6)), jnp.inf)
  ratio = jnp.where(support, ratio, jnp.inf)  # off the support: never greedy
  # Selection key: the ratio's float bits with the action index in the low
  # bits (the ratio only orders the candidates; the radius uses it exactly).
  bits = _index_bits(n_actions)
  code = jax.lax.bitcast_convert_type(jnp.maximum(ratio, 0.0), jnp.int32)
  code = (code & ~((1 << bits) - 1)) | index
  taken = jnp.iinfo(jnp.int32).max
  code = jnp.where(index == best[None], taken, code)
  chosen = [best]
  for _ in range(n_candidates - 1):
    low = jnp.min(code, axis=0)
    chosen.append(low & ((1 << bits) - 1))
    code = jnp.where(code == low[None], taken, code)
  radius = jnp.min(jnp.where(code == taken, jnp.inf, ratio), axis=0)
  # With fewer than K supported actions the last slots hold unsupported ones:
  # they repeat a* instead, so choosing among candidates needs no support mask.
  supported = jnp.take_along_axis(jnp.broadcast_to(support, masked.shape),
                                  jnp.stack(chosen), axis=0)
  return jnp.where(supported, jnp.stack(chosen), best[None]).astype(jnp.int32), radius


# Anchors are stored in half precision (their rounding error is taken off the
# radius): 2 bytes per factor per cell, 98 MiB less than float32 at 1,024
# seeds x 100 x 100 cells x d = 5.
ANCHOR_DTYPE = jnp.float16


class RegretCache(NamedTuple):
  """What keeps the exact population regret cheap between rounds (one seed).

  Each cell keeps K candidate actions, a radius and an *anchor*: the query at
  which the cell was last scored. While its query ``g`` stays within
  ``radius`` of the anchor, its greedy action is among the candidates, so the
  round's greedy action and regret are exact from K scores instead of A. A
  cell whose query has reached its radius is re-scored alone (in tiers of up
  to ``budget`` cells) and re-anchored there; when more than ``budget`` are
  due, every cell is re-scored, rebuilding the cache unless it was rebuilt in
  the last 8 rounds. Distances are measured from each cell's own anchor, so
  a cell is due only when its own query has moved, not when the estimate has
  drifted elsewhere. See :func:`update_regret_cache`.

  Attributes:
    candidates: (K, n_contexts, n_users) uint8/int16/int32 candidate actions, slot 0
      the greedy action when the cell was scored (candidates lead, so that
      choosing among them reduces across cells in SIMD lanes).
    radius: (n_contexts, n_users) radius around the stored anchor; +inf for
      cells of zero weight, -inf before the first scoring.
    anchor: (r, n_contexts, n_users) float16 query of each cell when it was
      last scored (factor-major: one plane per factor). The radius stored
      is the scored one less the anchor's rounding error ``||g - anchor||``,
      so a query within it of the stored anchor is within the scored radius
      of the exact one (triangle inequality); a query beyond float16's range
      leaves the cell due every round, which is slow but still exact.
    age: () int32 rounds since every cell was last re-scored together.
  """

  candidates: jax.Array
  radius: jax.Array
  anchor: jax.Array
  age: jax.Array


def candidate_dtype(n_actions: int):
  """The smallest integer type of the candidate table: uint8 up to 256 actions, int16 up
  to 32,767, int32 beyond."""
  if n_actions <= jnp.iinfo(jnp.uint8).max + 1:
    return jnp.uint8
  return jnp.int16 if n_actions <= jnp.iinfo(jnp.int16).max else jnp.int32


def empty_regret_cache(n_contexts: int, n_users: int, n_actions: int, n_candidates: int,
                       n_factors: int) -> RegretCache:
  """A cache whose every cell must be scored before use (queries of ``n_factors`` numbers)."""
  shape = (n_contexts, n_users)
  return RegretCache(jnp.zeros((n_candidates,) + shape, candidate_dtype(n_actions)),
                     jnp.full(shape, -jnp.inf, jnp.float32),
                     jnp.zeros((n_factors,) + shape, ANCHOR_DTYPE),
                     jnp.asarray(_REBUILD_AFTER, jnp.int32))


def _distance(planes, anchor):
  """Euclidean distance (...) between factor-major queries ``planes`` (r, ...) and stored
  ``anchor`` planes, summed plane by plane (contiguous, unlike the short factor axis)."""
  return jnp.sqrt(sum((planes[j] - anchor[j].astype(planes.dtype))**2
                      for j in range(planes.shape[0])))


def _anchored(planes, radius):
  """Anchors ``planes`` (r, ...) in ``ANCHOR_DTYPE`` and the radius less their rounding error."""
  anchor = planes.astype(ANCHOR_DTYPE)
  return anchor, radius - _distance(planes, anchor)


def key_norms(keys):
  """``max_a ||k_ca||`` per context (C,): a constant of the keys (C, A, r)."""
  return jnp.max(jnp.linalg.norm(keys, axis=-1), axis=-1)  # (C,)


def rescore_all(truth: TruthTables, queries, keys, n_candidates: int, norms=None):
  """Candidates (K, C, U) and radii (C, U) of every cell.

  ``norms``: :func:`key_norms` of ``keys``, computed here when not given.
  """
  n_contexts = keys.shape[0]
  norms = key_norms(keys) if norms is None else norms
  scores, by_action = _scores_by_action(truth, queries, keys)  # (A, C, U)
  rows = jnp.arange(n_contexts)[:, None]
  candidates, radius = _rescore(scores, truth.support.T[:, :, None], by_action,
                                lambda best: keys[rows, best], jnp.linalg.norm(queries, axis=-1),
                                norms[:, None], n_candidates)
  return candidates, jnp.where(truth.weights > 0, radius, jnp.inf)


def rescore_cells(truth: TruthTables, contexts, users, queries, keys, n_candidates: int,
                  norms=None):
  """Candidates (K, B) and radii (B,) of the cells ``(contexts (B,), users (B,))``
  (``norms`` as in :func:`rescore_all`)."""
  norms = key_norms(keys) if norms is None else norms
  query = queries[contexts, users]  # (B, r)
  key = jnp.swapaxes(keys[contexts], 0, 1)  # (A, B, r)
  scores = factor_scores(query[None, :, :], key)  # (A, B)
  candidates, radius = _rescore(
      scores, truth.support[contexts].T, key,
      lambda best: jnp.take_along_axis(key, best[None, :, None], axis=0)[0],
      jnp.linalg.norm(query, axis=-1), norms[contexts], n_candidates)
  return candidates, jnp.where(truth.weights[contexts, users] > 0, radius, jnp.inf)


def candidate_greedy(queries, keys, candidates) -> jax.Array:
  """Greedy action of every cell among its candidates (K, C, U) (lowest index on ties), (C, U)."""
  return _candidate_greedy(jnp.moveaxis(queries, -1, 0), keys, candidates)


def _candidate_greedy(planes, keys, candidates) -> jax.Array:
  """:func:`candidate_greedy` from factor-major queries ``planes`` (r, C, U).

  One candidate slot at a time, each score summed factor by factor by
  :func:`_sum_of_products` from scalar gathers, keeping a running first
  maximiser: every step is elementwise over the (C, U) cells, so the whole
  choice is one fused pass (a reduction over the short K axis was not).
  """
  n_contexts, n_actions, n_factors = keys.shape
  flat_keys = keys.reshape(n_contexts * n_actions, n_factors).T  # (r, C * A)
  offset = jnp.arange(n_contexts, dtype=jnp.int32)[:, None] * n_actions
  best_score = best = None
  for slot in range(candidates.shape[0]):
    label = candidates[slot].astype(jnp.int32)  # (C, U)
    index = offset + label
    score = _sum_of_products([planes[j] for j in range(n_factors)],
                             [flat_keys[j][index] for j in range(n_factors)])
    if best is None:
      best_score, best = score, label
    else:
      better = (score > best_score) | ((score == best_score) & (label < best))
      best_score = jnp.where(better, score, best_score)
      best = jnp.where(better, label, best)
  return best


def greedy_regret(truth: TruthTables, greedy) -> jax.Array:
  """Per-cell regret ``R*(best) - R*(greedy)`` of greedy actions (C, U)."""
  value = jnp.take_along_axis(truth.scores, greedy[..., None], axis=-1)[..., 0]
  return truth.best - value


# ---------------------------------------------------------------------------
# The actions a query can make greedy: extreme points of each context's keys
# ---------------------------------------------------------------------------
#
# For every query g, max_a <g, k_a> over a context's supported actions is
# attained at an extreme point of their keys' convex hull. An action whose key
# lies at depth delta inside the hull (the largest ball around it inside the
# hull has radius delta) scores at least ||g|| delta below some hull vertex,
# for every g, so it can never be the greedy action once ||g|| delta exceeds
# float32's rounding of two scores (a few ulps of ||g|| max ||k||). Such
# actions are left out of the regret pass; every action that could tie for
# the maximum stays, and so does each context's first supported action (the
# greedy one of the zero query, where every score ties). The pass over the
# rest gives every cell the same greedy action and regret as the pass over
# every action, bit for bit. For d = 5 Gaussian keys, 100 actions a context
# have 50-67 extreme points.

# Hulls are computed for keys of at most this many factors; beyond it every
# supported action is kept. Qhull's cost and the share of extreme points both
# grow fast with the dimension: for 100 Gaussian keys, 2.5 ms a context and 57
# extreme points at r = 5, 43 ms and 72 at r = 6, 194 ms and 85 at r = 7.
EXTREME_MAX_FACTORS = 5
# An action is left out only at a depth beyond this fraction of the context's
# largest key norm: far above float32's rounding of two scores (~1e-6 of
# ||g|| max ||k|| for sums of a few products).
_DEPTH_ALLOWANCE = 1e-5


def extreme_actions(keys, support, max_factors: int = EXTREME_MAX_FACTORS) -> list:
  """Per context, the supported actions some query could make greedy, ascending.

  Computed on the host (NumPy and Qhull through ``scipy.spatial``), once per
  instance: about 2.5 ms a context for 100 actions with r = 5. An action is
  kept unless its key lies deeper inside the convex hull of the context's
  supported keys than ``1e-5 max ||k||`` (see the note above); the context's
  first supported action is always kept. Contexts
  whose keys have more than ``max_factors`` factors, too few actions or a
  flat hull (Qhull's error) keep every supported action.

  Args:
    keys: (C, A, r) action keys (``learner.score_keys``).
    support: (C, A) booleans, the decision set.
    max_factors: largest r for which hulls are computed.

  Returns:
    A list of C int32 arrays of action indices, each ascending and non-empty.
  """
  from scipy.spatial import ConvexHull, QhullError

  keys = np.asarray(keys, np.float64)
  support = np.asarray(support, bool)
  n_factors = keys.shape[-1]
  kept = []
  for context_keys, supported in zip(keys, support):
    actions = np.flatnonzero(supported).astype(np.int32)
    points = context_keys[actions]
    if n_factors > max_factors or len(actions) <= n_factors + 1:
      kept.append(actions)
      continue
    try:
      hull = ConvexHull(points)
    except (QhullError, ValueError):
      kept.append(actions)
      continue
    # Facets n . x + b <= 0 with unit normals: the depth is min_f -(n . x + b).
    depth = -np.max(points @ hull.equations[:, :-1].T + hull.equations[:, -1], axis=1)
    allowance = _DEPTH_ALLOWANCE * np.max(np.linalg.norm(points, axis=1))
    keep = depth <= allowance
    keep[0] = True
    kept.append(actions[keep])
  return kept


def label_width(kept: list, multiple: int = 8) -> int:
  """The longest row of ``kept`` (lists of actions) rounded up to a ``multiple``:
  the table width of :func:`subset_labels` (fewer distinct kernel shapes)."""
  return -(-max(len(row) for row in kept) // multiple) * multiple


def subset_labels(kept: list, n_actions: int, width: Optional[int] = None) -> Optional[np.ndarray]:
  """The kept actions of :func:`extreme_actions` as one (C, V) int32 table, or None.

  Each row holds a context's kept actions in ascending order, padded by
  repeating its last one (a repeat never beats an earlier equal score, so the
  pass's first maximiser is unchanged). ``V`` is ``width`` if given (shared by
  several populations), else :func:`label_width` of ``kept``. None when ``V``
  would reach ``n_actions``: nothing to save.
  """
  longest = max(len(row) for row in kept)
  if width is None:
    width = label_width(kept)
  if width < longest:
    raise ValueError(f"width={width} is shorter than the longest kept row ({longest})")
  if width >= n_actions:
    return None
  return np.stack([np.concatenate([row, np.full(width - len(row), row[-1], np.int32)])
                   for row in kept]).astype(np.int32)


class ActionSubset(NamedTuple):
  """The actions the regret pass visits per context (see :func:`extreme_actions`).

  Attributes:
    labels: (C, V) int32 action indices, ascending in each row (repeats last).
    key_planes: (r, C, V) their keys, factor-major.
    value_planes: (V, C, U) their true scores ``R*``, or None without
      ``truth.action_planes``.
  """

  labels: jax.Array
  key_planes: jax.Array
  value_planes: Optional[jax.Array] = None


def action_subset(truth: TruthTables, keys, labels) -> ActionSubset:
  """Gathers the keys (and true scores) of ``labels`` (C, V); once per instance."""
  labels = jnp.asarray(labels, jnp.int32)
  key_planes = jnp.moveaxis(jnp.take_along_axis(keys, labels[:, :, None], axis=1), -1, 0)
  values = None
  if truth.action_planes is not None:
    values = jnp.moveaxis(jnp.take_along_axis(truth.scores, labels[:, None, :], axis=2), -1, 0)
  return ActionSubset(labels, key_planes, values)


def factor_greedy(truth: TruthTables, queries, keys) -> jax.Array:
  """Greedy action of every cell (lowest index on ties), every action scored, (C, U).

  One pass over the actions keeping a running first maximiser per cell: each
  step is elementwise over the (C, U) cells (factor-major planes, scores summed
  by :func:`_sum_of_products` like every other path), so XLA fuses the whole choice into one
  loop. Two reductions over the action axis of a (A, C, U) score tensor took
  1.5 ms at 100 x 100 cells x 100 actions on the benchmark CPU; this takes
  0.4 ms. A strict ``>`` keeps the lowest index among maximisers, and actions
  off the support score ``-inf``.
  """
  return _greedy_pass(truth, queries, keys, track_value=False)[0]


def _greedy_pass(truth: TruthTables, queries, keys, track_value: bool,
                 subset: Optional[ActionSubset] = None):
  """:func:`factor_greedy`, and with ``track_value`` also the true score ``R*`` of
  each cell's greedy action, ``(greedy, value)``, both (C, U).

  With ``subset`` the pass visits only its actions (each context's own, in
  ascending order), which gives the same result (see :func:`extreme_actions`).

  The value is carried through the pass (a select per action from
  ``truth.action_planes``) rather than gathered afterwards: XLA:CPU fuses the
  whole pass into the index operand of such a gather, and a fused gather is
  emitted as scalar code. Under ``vmap`` that fusion took 17-23 ms of a 28-35 ms
  round at four lanes (U = 100, the benchmark CPU).
  """
  planes = jnp.moveaxis(queries, -1, 0)  # (r, C, U)
  take = lambda array, slot, axis: jax.lax.dynamic_index_in_dim(array, slot, axis, False)
  if subset is None:  # every action, in index order; unsupported ones score -inf
    key_planes = jnp.moveaxis(keys, -1, 0)  # (r, C, A)
    n_slots = keys.shape[1]
    visit = lambda action: (take(key_planes, action, 2), action,
                            take(truth.support, action, 1),
                            take(truth.action_planes, action, 0) if track_value else None)
  else:  # slot v holds action labels[c, v] of context c, every one supported
    n_slots = subset.labels.shape[1]
    visit = lambda slot: (take(subset.key_planes, slot, 2), take(subset.labels, slot, 1)[:, None],
                          None, take(subset.value_planes, slot, 0) if track_value else None)

  def step(slot, carry):
    best_score, best, value = carry
    column, label, supported, plane = visit(slot)  # (r, C), label, (C,) or None, (C, U)
    score = _sum_of_products([planes[j] for j in range(planes.shape[0])],
                             [column[j][:, None] for j in range(planes.shape[0])])
    if supported is not None:
      score = jnp.where(supported[:, None], score, -jnp.inf)
    better = score > best_score
    if track_value:
      value = jnp.where(better, plane, value)
    return jnp.where(better, score, best_score), jnp.where(better, label, best), value

  # Action 0 until one scores above -inf, as the selector's index and its value.
  init = (jnp.full(planes.shape[1:], -jnp.inf, planes.dtype),
          jnp.zeros(planes.shape[1:], jnp.int32),
          truth.action_planes[0] if track_value else jnp.zeros((), planes.dtype))
  # Unrolled (up to 128 slots a trip) so that consecutive steps fuse.
  _, greedy, value = jax.lax.fori_loop(0, n_slots, step, init, unroll=min(n_slots, 128))
  return greedy, value


def factor_cell_regret(truth: TruthTables, queries, keys,
                       subset: Optional[ActionSubset] = None) -> jax.Array:
  """Per-cell regret of the greedy selector, every cell scored (C, U) (no cache):
  ``greedy_regret(truth, factor_greedy(truth, queries, keys))``.

  With ``truth.action_planes`` the pass carries each cell's ``R*`` at its
  running maximiser instead of gathering it afterwards (the same numbers, bit
  for bit). On XLA:CPU that is 2-4x faster under ``vmap`` (see
  :func:`_greedy_pass`) and, one seed at a time, as fast on an AVX-512 CPU
  and 4.4x faster on an AVX2 one (0.73 against 3.2 ms at 100 x 100 cells x
  100 actions), so every simulator kernel builds the planes. With ``subset``
  (:func:`action_subset`) the pass visits only the actions that some query
  could make greedy, with the same result (see :func:`extreme_actions`).
  """
  if truth.action_planes is not None:
    return truth.best - _greedy_pass(truth, queries, keys, True, subset)[1]
  return greedy_regret(truth, _greedy_pass(truth, queries, keys, False, subset)[0])


class CertifiedTables(NamedTuple):
  """Constants of the certified regret pass for one instance (:func:`certified_tables`).

  Attributes:
    subset: the :class:`ActionSubset` the pass visits.
    key_norm: (C,) ``max_a ||k_ca||`` over every action (the rounding allowance).
    inverse_gap: (C, V, V) ``1 / (||k_v - k_w|| (1 + 1e-6))`` between the slots'
      keys, 0 where they are equal.
    query_scale: (C,) how far a query of context c can move per unit of its
      user vector's move: ``||g_cu - g'_cu|| <= query_scale[c] ||w_u - w'_u||``
      (``learners.Learner.query_scale``); ``inf`` where nothing is known, so
      every cell's distance is measured every round.
  """

  subset: ActionSubset
  key_norm: jax.Array
  inverse_gap: jax.Array
  query_scale: jax.Array


def supported_labels(support) -> jax.Array:
  """(C, V) int32: each context's supported actions ascending, padded to a multiple
  of 8 by repeating the last (the certified pass's labels when no hull was computed)."""
  n_contexts, n_actions = support.shape
  width = -(-n_actions // 8) * 8
  index = jnp.arange(n_actions, dtype=jnp.int32)[None]
  ordered = jnp.sort(jnp.where(support, index, n_actions), axis=1)  # supported first
  last = jnp.maximum(jnp.max(jnp.where(support, index, -1), axis=1), 0)[:, None]
  padded = jnp.concatenate([ordered, jnp.full((n_contexts, width - n_actions), n_actions,
                                              jnp.int32)], axis=1)
  return jnp.where(padded == n_actions, last, padded)


def certified_tables(truth: TruthTables, keys, subset: ActionSubset,
                     query_scale=None) -> CertifiedTables:
  """The certified pass's constants for ``subset`` (labels a multiple of 8 wide, as
  :func:`subset_labels` and :func:`supported_labels` make them); once per instance.
  ``query_scale`` (C,): see :class:`CertifiedTables` (None: unknown, ``inf``)."""
  if subset.labels.shape[1] % 8:
    raise ValueError(f"the certified pass needs label rows a multiple of 8 wide, "
                     f"got {subset.labels.shape[1]}")
  slot_keys = jnp.moveaxis(subset.key_planes, 0, -1)  # (C, V, r)
  gap = jnp.sqrt(sum((slot_keys[:, :, None, j] - slot_keys[:, None, :, j])**2
                     for j in range(slot_keys.shape[-1])))  # (C, V, V)
  inverse = jnp.where(gap > 0, 1.0 / (jnp.where(gap > 0, gap, 1.0) * (1.0 + 1e-6)), 0.0)
  n_contexts = subset.labels.shape[0]
  if query_scale is None:
    query_scale = jnp.full((n_contexts,), jnp.inf, jnp.float32)
  query_scale = jnp.asarray(query_scale, jnp.float32)
  if query_scale.shape != (n_contexts,):
    raise ValueError(f"query_scale must have shape ({n_contexts},), got {query_scale.shape}")
  return CertifiedTables(subset, key_norms(keys), inverse, query_scale)


class CertifiedCells(NamedTuple):
  """What keeps the certified regret pass exact between rounds (one seed).

  Each cell keeps the true score ``value`` of its greedy action, and the
  query at which it was last scored (``anchor``) with a ``radius``: while the
  cell's query stays closer than the radius to its anchor, no other action can
  have reached the greedy one's score, so the value still holds. Cells whose
  query has moved that far are re-scored (:func:`certified_cell_values`).
  ``allowance`` and ``previous`` spare most cells even the distance: a query
  moves at most ``query_scale[c]`` times as far as its user's vector, so a
  cell's query is still inside its radius while the user vector's drift since
  the cell's last test stays below its allowance.

  Attributes:
    anchor: (C, U, r) float32 query of each cell when last scored.
    radius: (C, U) float32; -inf before a cell's first scoring.
    value: (C, U) float32 ``R*(x, a_hat, i)`` of the cell's greedy action (0
      for cells of zero weight, which are never scored).
    allowance: (C, U) float32 how much further (summed, in the norm of the
      user vectors) the user's vector may drift before the cell's distance
      must be measured again; <= 0 (or -inf) when it must be this round.
    previous: (U, q) float32 the user vectors of the last round.
  """

  anchor: jax.Array
  radius: jax.Array
  value: jax.Array
  allowance: jax.Array
  previous: jax.Array


def empty_certified_cells(n_contexts: int, n_users: int, n_factors: int,
                          n_user_params: int = 1) -> CertifiedCells:
  """Cells that must all be scored before use (queries of ``n_factors`` numbers,
  user vectors of ``n_user_params``)."""
  shape = (n_contexts, n_users)
  return CertifiedCells(jnp.zeros(shape + (n_factors,), jnp.float32),
                        jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                        jnp.full(shape, -jnp.inf, jnp.float32),
                        jnp.zeros((n_users, n_user_params), jnp.float32))


def certified_cell_values(truth: TruthTables, tables: CertifiedTables, cells: CertifiedCells,
                          queries, user_vectors=None):
  """Brings ``cells`` up to ``queries`` (C, U, r); the true score of every cell's
  greedy action, exactly as :func:`factor_cell_regret` finds it.

  A cell of positive weight is *due* when its query has moved as far as its
  radius from its anchor (or is not finite). The native CPU kernel
  (:mod:`jaxbandit.native`, ``csrc/certified_rescan.cc``) finds the due cells
  and re-scores them alone: greedy slot, its R*, the query as the new anchor
  and a new radius, the distance the query may move before any other slot's
  score could reach the greedy one's, ``min_b (R(a) - R(b) - allowance) /
  ||k_b - k_a||`` (as :func:`_rescore`, with one candidate). The other cells
  keep their value. Late in a run 1-3% of the cells are due a round.

  ``user_vectors`` (U, q), the vectors the queries are linear in (with
  ``tables.query_scale``), let the kernel skip measuring the distance of cells
  whose user vector has drifted less than their allowance since their last
  test; they must be the vectors ``queries`` were computed from. None: every
  cell's distance is measured (the same cells, values and counts re-scored).

  Returns:
    ``(cells, value (C, U), n_due (), n_measured ())``: the updated cells, each
    cell's greedy true score (``truth.best - value`` is
    :func:`factor_cell_regret`'s regret wherever the weight is positive), how
    many cells were re-scored and how many had their distance measured.
  """
  from jaxbandit import native

  subset = tables.subset
  scale = tables.query_scale
  if user_vectors is None:  # nothing bounds the queries' moves: measure every cell
    user_vectors = jnp.zeros(cells.previous.shape, jnp.float32)
    scale = jnp.full(scale.shape, jnp.inf, jnp.float32)
  rescan = jax.ffi.ffi_call(
      native.TARGET, (jax.ShapeDtypeStruct(cells.anchor.shape, jnp.float32),
                      jax.ShapeDtypeStruct(cells.radius.shape, jnp.float32),
                      jax.ShapeDtypeStruct(cells.value.shape, jnp.float32),
                      jax.ShapeDtypeStruct(cells.allowance.shape, jnp.float32),
                      jax.ShapeDtypeStruct(cells.previous.shape, jnp.float32),
                      jax.ShapeDtypeStruct((2,), jnp.int32)),
      vmap_method="sequential", input_output_aliases={9: 0, 10: 1, 11: 2, 12: 3, 13: 4})
  anchor, radius, value, allowance, previous, counts = rescan(
      queries.astype(jnp.float32), user_vectors.astype(jnp.float32), scale,
      truth.weights.astype(jnp.float32), subset.key_planes,
      subset.labels, truth.scores, tables.key_norm, tables.inverse_gap,
      cells.anchor, cells.radius, cells.value, cells.allowance, cells.previous)
  return CertifiedCells(anchor, radius, value, allowance, previous), value, counts[0], counts[1]


def _first_true(mask, size: int):
  """Flat indices of the first ``size`` True entries of ``mask``, in order, padded with 0.

  ``jnp.nonzero(..., size=size)`` without its cumulative sums over the whole
  mask (about 100 us for 10,000 cells on XLA:CPU): ranks within blocks of 128
  come from one matrix product with a triangular matrix (exact: counts of at
  most 128 in float32), and only the block totals are summed cumulatively.
  """
  flat = mask.reshape(-1)
  n = flat.shape[0]
  block = 128
  padded = jnp.pad(flat, (0, -n % block)).reshape(-1, block)
  upper = jnp.triu(jnp.ones((block, block), jnp.float32))
  within = (padded.astype(jnp.float32) @ upper).astype(jnp.int32)  # inclusive ranks
  totals = within[:, -1]
  offsets = jnp.cumsum(totals) - totals
  rank = (within + offsets[:, None]).reshape(-1)[:n] - 1
  slot = jnp.where(flat, rank, size)  # not wanted, or beyond `size`: dropped
  return jnp.zeros((size,), jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32),
                                                    mode="drop")


# A cache rebuilt fewer rounds ago than this is not rebuilt again: while the
# estimate moves fast the round scores every cell without candidates instead
# (about 4x cheaper than a rebuild), and the cache waits.
_REBUILD_AFTER = 8


def update_regret_cache(truth: TruthTables, cache: RegretCache, estimate, queries_of, keys,
                        budget: int, norms=None):
  """Brings the cache up to ``estimate`` and returns the exact per-cell regret.

  Args:
    truth: the instance's :class:`TruthTables`.
    cache: the cache of an earlier estimate.
    estimate: the current estimate.
    queries_of: ``params -> (C, U, r)`` the learner's queries (linear in params).
    keys: (C, A, r) the learner's action keys.
    budget: most cells re-scored individually before every cell is (static).
    norms: :func:`key_norms` of ``keys``; pass it from outside the round loop
      (a constant), or it is computed here.

  Returns:
    ``(cache, cell_regret (C, U), rescored)``: the updated cache, the regret of
    every cell's greedy action (equal to scoring every action of every cell;
    0 for cells of zero weight, which are never re-scored) and how many cells
    were re-scored this round (all for a full evaluation).
  """
  n_candidates = cache.candidates.shape[0]
  queries = queries_of(estimate)
  # Factor-major (r, C, U) planes: the move is then a sum of r contiguous planes
  # (XLA:CPU took over ten times longer over the short trailing factor axis).
  planes = jnp.moveaxis(queries, -1, 0)
  moved = _distance(planes, cache.anchor)  # (C, U) from each cell's anchor
  dirty = cache.radius <= moved
  n_dirty = jnp.sum(dirty)
  n_users = truth.weights.shape[1]
  dtype = cache.candidates.dtype
  norms = key_norms(keys) if norms is None else norms

  no_greedy = jnp.zeros(dirty.shape, jnp.int32)

  def quiet(cache):
    return cache, no_greedy

  def partial(size):
    def rescore(cache):
      cells = _first_true(dirty, size)
      contexts, users = cells // n_users, cells % n_users
      candidates, radius = rescore_cells(truth, contexts, users, queries, keys, n_candidates,
                                         norms)
      anchor, radius = _anchored(planes[:, contexts, users], radius)
      return cache._replace(
          candidates=cache.candidates.at[:, contexts, users].set(candidates.astype(dtype)),
          radius=cache.radius.at[contexts, users].set(radius),
          anchor=cache.anchor.at[:, contexts, users].set(anchor)), no_greedy
    return rescore

  def rebuild(cache):
    candidates, radius = rescore_all(truth, queries, keys, n_candidates, norms)
    anchor, radius = _anchored(planes, radius)
    return RegretCache(candidates.astype(dtype), radius, anchor, cache.age), no_greedy

  def score_every_cell(cache):
    return cache, factor_greedy(truth, queries, keys)

  # Most rounds need a few cells: a small tier keeps them from paying for `budget`.
  small = max(budget // 8, 1)
  many = jnp.where(cache.age >= _REBUILD_AFTER, 3, 4)
  branch = jnp.where(n_dirty == 0, 0, jnp.where(n_dirty <= small, 1,
                                                jnp.where(n_dirty <= budget, 2, many)))
  # The branches only bring the cache up to date (or, for branch 4, score every
  # cell without it); the choice among the candidates stays outside the switch,
  # where XLA fuses it with the rest of the round.
  cache, every_cell = jax.lax.switch(
      branch, [quiet, partial(small), partial(budget), rebuild, score_every_cell], cache)
  greedy = jnp.where(branch == 4, every_cell, _candidate_greedy(planes, keys, cache.candidates))
  cache = cache._replace(age=jnp.where(branch == 3, 0, jnp.minimum(cache.age + 1, 2**30)))
  regret = jnp.where(truth.weights > 0, greedy_regret(truth, greedy), 0.0)  # no weight: 0
  rescored = jnp.where(n_dirty > budget, dirty.size, n_dirty).astype(jnp.int32)
  return cache, regret, rescored
