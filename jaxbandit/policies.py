"""Slate policies: how the learner chooses the K responses it shows.

A slate policy is a pure function for one round::

    slate = policy(key, estimated_scores, log_reference, params)  # (K,) int32

with ``estimated_scores`` (n_actions,) the current estimate for the round's
(context, user), ``log_reference`` (n_actions,) ``log pi0(.|x)`` (``-inf``
off the support) and ``params`` a :class:`PolicyParams` of traced numbers
(changing them does not recompile; they can be vmapped).

Slate coordinates are drawn independently (with replacement) from their laws,
each absolutely continuous with respect to ``pi0`` as P1 Lemma D.9 requires;
``top_k`` is deterministic (ties to the lowest action index).

=================  ===========================================================
name               slate
=================  ===========================================================
reference          K draws from pi0
softened           K draws from pi_t ∝ pi0 exp(R_hat / beta)
top_k              the K best supported actions of R_hat (on-policy top-K)
current_reference  one draw from pi_t, K-1 from pi0 (P2's experiments)
mixture            each draw from pi_t with prob. mixture_weight, else pi0
=================  ===========================================================

References:
  E. H. Kang, Demystifying the Unreasonable Effectiveness of Online Alignment
  Methods (arXiv 2604.17207), experiments.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxbandit import validation as V

SLATE_POLICIES = ("reference", "softened", "top_k", "current_reference", "mixture")


class PolicyParams(NamedTuple):
  """Traced slate-policy numbers.

  Attributes:
    beta: () temperature of the softened policy (> 0).
    mixture_weight: () probability that a ``mixture`` coordinate follows pi_t.
  """

  beta: jax.Array
  mixture_weight: jax.Array


def softened_logits(estimated_scores, log_reference, beta):
  """Logits of pi_t ∝ pi0 exp(R_hat / beta): (n_actions,), -inf off the support."""
  return jnp.where(jnp.isfinite(log_reference), log_reference + estimated_scores / beta,
                   -jnp.inf)


def make_slate_policy(name: str, slate_size: int) -> Callable:
  """Returns the slate policy ``name`` for slates of ``slate_size`` (static)."""
  V.one_of("slate_policy", name, SLATE_POLICIES)
  V.positive_int("slate_size", slate_size)

  def draw(key, logits, count):
    return jax.random.categorical(key, logits, shape=(count,)).astype(jnp.int32)

  if name == "reference":

    def policy(key, estimated_scores, log_reference, params):
      del estimated_scores, params
      return draw(key, log_reference, slate_size)

  elif name == "softened":

    def policy(key, estimated_scores, log_reference, params):
      return draw(key, softened_logits(estimated_scores, log_reference, params.beta),
                  slate_size)

  elif name == "top_k":

    def policy(key, estimated_scores, log_reference, params):
      del key, params
      masked = jnp.where(jnp.isfinite(log_reference), estimated_scores, -jnp.inf)
      # lax.top_k breaks ties towards the lower index.
      return jax.lax.top_k(masked, slate_size)[1].astype(jnp.int32)

  elif name == "current_reference":

    def policy(key, estimated_scores, log_reference, params):
      key_current, key_reference = jax.random.split(key)
      current = draw(key_current,
                     softened_logits(estimated_scores, log_reference, params.beta), 1)
      reference = draw(key_reference, log_reference, slate_size - 1)
      return jnp.concatenate([current, reference])

  else:  # mixture

    def policy(key, estimated_scores, log_reference, params):
      key_pick, key_current, key_reference = jax.random.split(key, 3)
      current = draw(key_current,
                     softened_logits(estimated_scores, log_reference, params.beta),
                     slate_size)
      reference = draw(key_reference, log_reference, slate_size)
      use_current = jax.random.uniform(key_pick, (slate_size,)) < params.mixture_weight
      return jnp.where(use_current, current, reference)

  return policy
