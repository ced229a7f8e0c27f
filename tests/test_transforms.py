"""Public array functions: jitted equals unjitted, vmapped equals a loop of unbatched calls.

References are the same functions called eagerly one example at a time (the
transformations must not change results); the values themselves are checked
against NumPy in the component tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbandit import instance as I
from jaxbandit import learners as L
from jaxbandit import metrics as M
from jaxbandit import policies as P


def _instances(count):
  return [I.make_instance(jax.random.key(k), n_contexts=3, n_actions=4, dim=2, latent_dim=2,
                          n_users=2) for k in range(count)]


def _stack(items):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *items)


def _truth(inst):
  return M.truth_tables(I.true_scores(inst), I.cell_weights(inst), inst.reference_policy)


def _estimate(inst):
  return I.true_scores(inst) + 0.3 * jnp.cos(jnp.arange(4.0))


def _factors(inst):
  """Score factors (queries, keys) of the known-heads model at its true parameters."""
  model = L.make_model_class("known_heads", inst)
  return L.score_queries(model, L.true_parameters(model, inst)), L.score_keys(model)


CASES = {
    "true_scores": lambda inst: I.true_scores(inst),
    "latent_features": lambda inst: I.latent_features(inst),
    "gaps": lambda inst: I.gaps(inst),
    "cell_weights": lambda inst: I.cell_weights(inst),
    "greedy_actions": lambda inst: I.greedy_actions(_estimate(inst), I.support_mask(inst)),
    "population_regret": lambda inst: M.population_regret(_truth(inst), _estimate(inst)),
    "cell_regret": lambda inst: M.cell_regret(_truth(inst), _estimate(inst)),
    "kl_regularized_regret": lambda inst: M.kl_regularized_regret(_truth(inst), _estimate(inst),
                                                                  0.7),
    "rescore_all": lambda inst: M.rescore_all(_truth(inst), *_factors(inst), 3),
    "model_scores": lambda inst: L.scores(L.make_model_class("known_heads", inst),
                                          L.true_parameters(L.make_model_class("known_heads",
                                                                               inst), inst)),
    "cell_scores": lambda inst: L.cell_scores(L.make_model_class("per_user_bilinear", inst),
                                              jnp.ones((2, 4)), 1, 0),
    "softened_logits": lambda inst: P.softened_logits(_estimate(inst)[0, 0],
                                                      jnp.log(inst.reference_policy[0]), 0.5),
}


# rescore_all (the incremental regret's cache, an option) takes ~15 s on 2 cores: slow set.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "rescore_all"
                                  else n for n in sorted(CASES)])
def test_jit_and_vmap_agree_with_eager_calls(name):
  function = CASES[name]
  instances = _instances(3)
  eager = [function(inst) for inst in instances]
  jitted = [jax.jit(function)(inst) for inst in instances]
  batched = jax.vmap(function)(_stack(instances))
  for one, two in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_allclose(np.asarray(one), np.asarray(two), rtol=1e-6, atol=1e-6)
  looped = _stack(eager)
  for one, two in zip(jax.tree_util.tree_leaves(looped), jax.tree_util.tree_leaves(batched)):
    np.testing.assert_allclose(np.asarray(one), np.asarray(two), rtol=1e-6, atol=1e-6)
