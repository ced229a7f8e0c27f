"""Regret of an estimate: temperature-zero (exact population average), realised, KL-regularised.

All score tensors are (n_contexts, n_users, n_actions); ``weights`` are the
population cell weights d0[x] * rho[i], (n_contexts, n_users); ``support`` is
(n_contexts, n_actions) booleans (pi0 > 0).

References:
  P1 (arXiv 2605.09119) and P2 (arXiv 2604.17207): G(R) and N_eps0 (P1),
  J_beta and the KL-regularised regret (P2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbandit.instance import first_maximiser, greedy_actions


class TruthTables(NamedTuple):
  """What the metrics need from the truth, computed once per instance.

  Attributes:
    scores: (n_contexts, n_users, n_actions) true scores R*.
    best: (n_contexts, n_users) max over the support of R*.
    weights: (n_contexts, n_users) cell weights d0 x rho.
    support: (n_contexts, n_actions) decision set.
    log_reference: (n_contexts, n_actions) log pi0, -inf off the support.
  """

  scores: jax.Array
  best: jax.Array
  weights: jax.Array
  support: jax.Array
  log_reference: jax.Array


def truth_tables(true_scores, weights, reference_policy) -> TruthTables:
  support = reference_policy > 0
  masked = jnp.where(support[:, None, :], true_scores, -jnp.inf)
  log_reference = jnp.where(support, jnp.log(jnp.where(support, reference_policy, 1.0)),
                            -jnp.inf)
  return TruthTables(true_scores, jnp.max(masked, axis=-1), weights, support, log_reference)


def cell_regret(truth: TruthTables, estimated_scores) -> jax.Array:
  """Per-cell regret of the greedy selector of an estimate, (n_contexts, n_users)."""
  chosen = greedy_actions(estimated_scores, truth.support)
  value = jnp.take_along_axis(truth.scores, chosen[..., None], axis=-1)[..., 0]
  return truth.best - value


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
# Incremental exact regret
# ---------------------------------------------------------------------------


class RegretCache(NamedTuple):
  """Per-cell greedy decisions of the current estimate, kept exact between rounds.

  A cell's greedy action cannot change while every score moves by less than
  half its margin (best minus second-best estimated score). Drift is measured
  from one *reference* estimate (the estimate of the last full evaluation)
  rather than summed round by round: with ``D(a, b)`` the learner's bound on
  how far any score of a cell moves between estimates ``a`` and ``b``,
  ``D(scored, now) <= D(scored, ref) + D(ref, now)``. A cell scored at
  ``scored`` keeps ``slack = margin - 2 D(scored, ref)`` (minus a float32
  rounding allowance) and is re-scored only once ``slack <= 2 D(ref, now)``,
  so the recorded regret equals the full re-scoring's. Estimates that wander
  back and forth (as a refitted ERM does) cost the net distance from the
  reference, not the path length.

  Attributes:
    greedy: (n_contexts, n_users) int32 greedy action of each cell.
    cell_regret: (n_contexts, n_users) R*(best) - R*(greedy).
    slack: (n_contexts, n_users) remaining slack; +inf for cells of zero weight,
      -inf to force re-scoring.
    reference: the reference estimate (the learner's parameter shape).
  """

  greedy: jax.Array
  cell_regret: jax.Array
  slack: jax.Array
  reference: jax.Array


def empty_regret_cache(n_contexts: int, n_users: int, reference: jax.Array) -> RegretCache:
  """A cache whose every cell must be scored before use (``reference``: any estimate)."""
  shape = (n_contexts, n_users)
  return RegretCache(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32),
                     jnp.full(shape, -jnp.inf, jnp.float32), jnp.asarray(reference))


def _decide(scores, support, best_true, true_scores):
  """Greedy action, margin, regret for score rows (..., A) with support rows (..., A)."""
  masked = jnp.where(support, scores, -jnp.inf)
  top, chosen = first_maximiser(masked)
  index = jnp.arange(masked.shape[-1], dtype=jnp.int32).reshape(
      (1,) * (masked.ndim - 1) + (-1,))
  second = jnp.max(jnp.where(index == chosen[..., None], -jnp.inf, masked), axis=-1)
  value = jnp.take_along_axis(true_scores, chosen[..., None], axis=-1)[..., 0]
  # Rounding allowance: two float32 evaluations of one score may differ by a few ulps.
  allowance = 1e-5 * (1.0 + jnp.abs(top))
  margin = jnp.where(jnp.isfinite(second), top - second, jnp.inf) - allowance
  return chosen, best_true - value, margin


def refresh_all(truth: TruthTables, estimated_scores=None, context_scores=None,
                reference=None) -> RegretCache:
  """Scores every cell (the full evaluation).

  Args:
    truth: the :class:`TruthTables`.
    reference: the estimate being scored (becomes the cache's reference; may
      be None when only ``cell_regret`` is wanted).
    estimated_scores: (C, U, A) scores, or None to use ``context_scores``.
    context_scores: ``context -> (U, A)`` scores of one context; the cells are
      then evaluated one context at a time (``lax.map``), which keeps each
      block in cache and is about twice as fast on CPU.
  """
  if estimated_scores is not None:
    chosen, regret, margin = _decide(estimated_scores, truth.support[:, None, :], truth.best,
                                     truth.scores)
  else:
    def one_context(args):
      context, support, best, true_scores = args
      return _decide(context_scores(context), support[None, :], best, true_scores)

    n_contexts = truth.support.shape[0]
    chosen, regret, margin = jax.lax.map(
        one_context, (jnp.arange(n_contexts), truth.support, truth.best, truth.scores))
  slack = jnp.where(truth.weights > 0, margin, jnp.inf)
  return RegretCache(chosen, regret, slack, reference)


def refresh_cells(truth: TruthTables, cache: RegretCache, cells, cell_scores,
                  drift) -> RegretCache:
  """Re-scores the flat cell indices ``cells`` (B,) given their scores (B, n_actions).

  ``drift`` (C, U) bounds how far each cell's scores are from the reference's.
  """
  n_users = truth.weights.shape[1]
  contexts, users = cells // n_users, cells % n_users
  chosen, regret, margin = _decide(cell_scores, truth.support[contexts],
                                   truth.best[contexts, users], truth.scores[contexts, users])
  slack = jnp.where(truth.weights[contexts, users] > 0,
                    margin - 2.0 * drift[contexts, users], jnp.inf)
  return cache._replace(greedy=cache.greedy.at[contexts, users].set(chosen),
                        cell_regret=cache.cell_regret.at[contexts, users].set(regret),
                        slack=cache.slack.at[contexts, users].set(slack))


def update_regret_cache(truth: TruthTables, cache: RegretCache, estimate, drift, all_scores,
                        cells_scores, budget: int, context_scores=None):
  """Brings the cache up to ``estimate``: nothing, the dirty cells (<= budget), or everything.

  Args:
    truth: the instance's :class:`TruthTables`.
    cache: the cache of an earlier estimate.
    estimate: the current estimate (the reference after a full evaluation).
    drift: (C, U) the learner's bound on ``max_a |R_estimate - R_reference|``
      per cell (``Learner.score_drift_bound(cache.reference, estimate)``).
    all_scores: ``() -> (C, U, A)`` full estimated scores (called only if needed).
    cells_scores: ``(contexts (B,), users (B,)) -> (B, A)``.
    context_scores: optional ``context -> (U, A)``; if given, the full
      evaluation goes context by context instead of calling ``all_scores``.
    budget: most cells re-scored individually before a full evaluation (static).

  Returns:
    ``(cache, rescored)``: the updated cache and how many cells were scored
    (all ``n_contexts * n_users`` for a full evaluation).
  """
  dirty = cache.slack <= 2.0 * drift
  n_dirty = jnp.sum(dirty)
  n_users = truth.weights.shape[1]

  def partial(cache):
    cells = jnp.nonzero(dirty.reshape(-1), size=budget, fill_value=0)[0].astype(jnp.int32)
    scores = cells_scores(cells // n_users, cells % n_users)
    return refresh_cells(truth, cache, cells, scores, drift)

  def full(cache):
    del cache
    if context_scores is not None:
      return refresh_all(truth, context_scores=context_scores, reference=estimate)
    return refresh_all(truth, all_scores(), reference=estimate)

  cache = jax.lax.cond(
      n_dirty > budget, full,
      lambda c: jax.lax.cond(n_dirty > 0, partial, lambda c2: c2, c), cache)
  rescored = jnp.where(n_dirty > budget, dirty.size, n_dirty).astype(jnp.int32)
  return cache, rescored
