"""Choice models over a slate: Bradley-Terry, multinomial logit, Plackett-Luce.

All three are one family. An outcome is the ordered list of the first
``n_ranked`` slate positions the user ranks (best first):

* Bradley-Terry: slate of 2, ``n_ranked = 1`` (the chosen position);
* multinomial-logit choice: slate of K, ``n_ranked = 1``;
* Plackett-Luce: slate of K, ``n_ranked = m`` (top-m) or ``K`` (full ranking).

Probability of an outcome ``o`` given utilities ``u``::

    P(o) = prod_{s < m} exp(u[o_s]) / sum_{k not in o_{<s}} exp(u[k])

Sampling uses the Gumbel-max trick (the top-m of ``u + Gumbel`` is an exact
Plackett-Luce draw); log-likelihoods use masked ``logsumexp``, finite for
utilities up to +-1e4 and beyond.

Each model is a bundle of pure functions for one slate; batch with ``vmap``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxbandit import validation as V


class ChoiceModel(NamedTuple):
  """A choice model for slates of ``slate_size`` (None: any size >= 2).

  Attributes:
    name: 'bradley_terry', 'multinomial_logit' or 'plackett_luce'.
    n_ranked: how many positions an outcome ranks (``None`` for a full
      Plackett-Luce ranking: the slate size).
    sample: ``(key, utilities (K,)) -> outcome (m,) int32`` slate positions.
    log_likelihood: ``(utilities (K,), outcome (m,)) -> ()`` log P(outcome).
    gradient_hessian: ``(utilities (K,), outcome (m,)) -> (grad (K,), hess (K, K))``
      of the negative log-likelihood with respect to the utilities.
  """

  name: str
  n_ranked: int | None
  sample: Callable
  log_likelihood: Callable
  gradient_hessian: Callable

  def outcome_size(self, slate_size: int) -> int:
    return slate_size if self.n_ranked is None else self.n_ranked


CHOICE_MODELS = ("bradley_terry", "multinomial_logit", "plackett_luce")


def _remaining_masks(outcome: jax.Array, slate_size: int) -> jax.Array:
  """(m, K) booleans: position k is still unranked at stage s."""
  ranked = jax.nn.one_hot(outcome, slate_size, dtype=jnp.bool_)  # (m, K)
  before = jnp.cumsum(ranked, axis=0) - ranked  # ranked strictly before stage s
  return before == 0


def _stage_log_probs(utilities, outcome):
  slate_size = utilities.shape[-1]
  masks = _remaining_masks(outcome, slate_size)
  masked = jnp.where(masks, utilities[None, :], -jnp.inf)
  log_norm = jax.nn.logsumexp(masked, axis=-1)
  return utilities[outcome] - log_norm, masks, masked, log_norm


def _log_likelihood(utilities: jax.Array, outcome: jax.Array) -> jax.Array:
  stage, *_ = _stage_log_probs(utilities, outcome)
  return jnp.sum(stage)


def _gradient_hessian(utilities: jax.Array, outcome: jax.Array):
  """Analytic derivatives of -log P(outcome): a sum of masked softmax terms."""
  _, masks, masked, log_norm = _stage_log_probs(utilities, outcome)
  probs = jnp.where(masks, jnp.exp(masked - log_norm[:, None]), 0.0)  # (m, K)
  chosen = jax.nn.one_hot(outcome, utilities.shape[-1], dtype=utilities.dtype)
  grad = jnp.sum(probs - chosen, axis=0)
  hess = jnp.diag(jnp.sum(probs, axis=0)) - jnp.einsum("sk,sl->kl", probs, probs)
  return grad, hess


def _make_sampler(n_ranked):
  def sample(key: jax.Array, utilities: jax.Array) -> jax.Array:
    m = utilities.shape[-1] if n_ranked is None else n_ranked
    perturbed = utilities + jax.random.gumbel(key, utilities.shape, utilities.dtype)
    return jax.lax.top_k(perturbed, m)[1].astype(jnp.int32)

  return sample


def bradley_terry() -> ChoiceModel:
  """Pairwise Bradley-Terry: P(choose k) = sigmoid(u_k - u_other); slates of exactly 2."""
  return ChoiceModel("bradley_terry", 1, _make_sampler(1), _log_likelihood, _gradient_hessian)


def multinomial_logit() -> ChoiceModel:
  """Multinomial-logit choice of one item: P(choose k) = softmax(u)_k."""
  return ChoiceModel("multinomial_logit", 1, _make_sampler(1), _log_likelihood,
                     _gradient_hessian)


def plackett_luce(top_m: int | None = None) -> ChoiceModel:
  """Plackett-Luce ranking of the top ``top_m`` items (``None``: the full ranking)."""
  if top_m is not None:
    V.positive_int("top_m", top_m)
  return ChoiceModel("plackett_luce", top_m, _make_sampler(top_m), _log_likelihood,
                     _gradient_hessian)


def get_choice_model(name: str, top_m: int | None = None) -> ChoiceModel:
  """Looks a choice model up by name (see ``CHOICE_MODELS``)."""
  V.one_of("choice_model", name, CHOICE_MODELS)
  if name == "bradley_terry":
    return bradley_terry()
  if name == "multinomial_logit":
    return multinomial_logit()
  return plackett_luce(top_m)


def check_slate_size(model: ChoiceModel, slate_size: int, n_actions: int) -> None:
  """Validates a slate size for a model and a number of actions."""
  V.int_in_range("slate_size", slate_size, 2, n_actions, f"n_actions={n_actions}")
  if model.name == "bradley_terry" and slate_size != 2:
    raise ValueError(f"slate_size={slate_size} is not allowed for bradley_terry; allowed: 2 "
                     f"(use multinomial_logit or plackett_luce for larger slates)")
  if model.n_ranked is not None and model.n_ranked > slate_size:
    raise ValueError(f"top_m={model.n_ranked} is not allowed for slate_size={slate_size}; "
                     f"allowed: 1 <= top_m <= slate_size")
