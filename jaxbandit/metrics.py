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

from jaxbandit.instance import greedy_actions


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
