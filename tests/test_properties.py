"""Property tests of the simulation kernel over random small problems (hypothesis).

Every property runs through one compiled kernel per configuration: the
instance values, reward scale, temperature, ridge and seeds vary between
examples, the shapes never do, so a test compiles once
(``simulate.make_chunk_kernel`` is built once per module fixture and fed
``(instances (1, ...), params, keys (S,), states (1, S, ...))``, as
``simulate.simulate`` does).

What must hold whatever the values:

* no NaN or infinity in any record (regret, realised regret, KL regret,
  ERM gradient norm) nor in the final estimate, even at reward_scale 1e3
  where Bradley-Terry choice probabilities saturate to 0 and 1;
* 0 <= regret <= the largest true gap of a weighted cell (best minus worst
  supported score), and likewise for the realised regret;
* the ERM diagnostics are reported honestly: ``erm_converged`` is a bool,
  iterations are within the budget, and a converged refit has a finite
  gradient;
* ties: ``instance.greedy_actions`` takes the lowest index among maximisers,
  and the regret is exactly 0 when the tied actions are all optimal.

Hypothesis runs derandomized with a few examples and no database, so CI sees
the same examples every run. Tolerances: the bounds hold in exact arithmetic;
float32 scores are compared with float64 NumPy bounds to 1e-5 relative plus
1e-6 * reward_scale absolute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jaxbandit import instance as instance_lib
from jaxbandit import metrics
from jaxbandit import simulate as S

PROPERTY_SETTINGS = settings(deadline=None, max_examples=12, derandomize=True, database=None,
                             print_blob=True)

# One shape for the main kernel: 3 contexts x 4 actions, d=2, J=2, 2 users.
N_CONTEXTS, N_ACTIONS, DIM, LATENT_DIM, N_USERS = 3, 4, 2, 2, 2
HORIZON = 6
N_SEEDS = 2
BT_CONFIG = S.SimulationConfig(horizon=HORIZON, slate_size=2, choice_model="bradley_terry",
                               model_class="known_heads", slate_policy="current_reference",
                               record_kl=True)
FLOAT_FIELDS = ("regret", "realised_regret", "kl_regret", "erm_grad_norm")

log_uniform = lambda low, high: st.floats(np.log10(low), np.log10(high)).map(lambda e: 10.0**e)


def random_arrays(seed, n_contexts=N_CONTEXTS, n_actions=N_ACTIONS, n_users=N_USERS):
  """Gaussian instance arrays from a NumPy seed (host only: no compilation)."""
  rng = np.random.default_rng(seed)
  return dict(contexts=rng.normal(size=(n_contexts, DIM)),
              actions=rng.normal(size=(n_contexts, n_actions, DIM)),
              maps=rng.normal(size=(LATENT_DIM, DIM, DIM)) / DIM,
              heads=rng.normal(size=(n_users, LATENT_DIM)) / np.sqrt(LATENT_DIM))


def run_kernel(kernel, config, instance, params, master_seed=0):
  """One population, ``N_SEEDS`` seeds, the whole horizon: (final states, NumPy records)."""
  instances = jax.tree_util.tree_map(lambda x: x[None], instance)
  keys = S.seed_keys(master_seed, np.arange(N_SEEDS))
  states = S.init_states(config, instances, N_SEEDS)
  states, records = kernel(instances, params, keys, states)
  return states, jax.tree_util.tree_map(np.asarray, jax.device_get(records))


def np_scores(instance):
  """R*(x, a, i) in float64 NumPy from the (float32) instance arrays, (C, U, A)."""
  a = {k: np.asarray(v, np.float64) for k, v in instance._asdict().items()}
  return a["reward_scale"] * np.einsum("uj,cp,jpq,caq->cua", a["heads"], a["contexts"],
                                       a["maps"], a["actions"])


def max_gap(instance):
  """Largest best-minus-worst supported true score over cells of positive weight."""
  scores = np_scores(instance)
  support = np.asarray(instance.reference_policy) > 0
  best = np.where(support[:, None, :], scores, -np.inf).max(axis=-1)
  worst = np.where(support[:, None, :], scores, np.inf).min(axis=-1)
  weights = (np.asarray(instance.context_weights)[:, None] *
             np.asarray(instance.user_weights)[None, :])
  return float(np.max(np.where(weights > 0, best - worst, 0.0)))


def check_records(records, states, config, instance):
  """The invariants every run must satisfy, whatever its values."""
  for name in FLOAT_FIELDS:
    value = getattr(records, name)
    assert value.shape == (1, N_SEEDS, config.horizon), name
    assert np.all(np.isfinite(value)), f"{name} has non-finite entries: {value}"
  assert np.all(np.isfinite(np.asarray(states.params))), "final estimate is not finite"
  scale = float(instance.reward_scale)
  bound = max_gap(instance) * (1 + 1e-5) + 1e-6 * scale
  for name in ("regret", "realised_regret"):
    value = getattr(records, name)
    assert np.all(value >= 0), f"{name} negative: {value.min()}"
    assert np.all(value <= bound), f"{name} {value.max()} above the largest gap {bound}"
  assert np.all(records.kl_regret >= 0)
  assert records.erm_converged.dtype == np.bool_
  assert np.all((records.erm_iterations >= 0) &
                (records.erm_iterations <= config.erm_max_iterations))
  # A refit reported converged must have a finite gradient (a NaN never passes as converged).
  assert np.all(np.isfinite(records.erm_grad_norm[records.erm_converged]))


@pytest.fixture(scope="module")
def bt_kernel():
  return S.make_chunk_kernel(BT_CONFIG, HORIZON)


# ---------------------------------------------------------------------------
# Random values, one compiled shape
# ---------------------------------------------------------------------------


@st.composite
def bt_problems(draw):
  arrays = random_arrays(draw(st.integers(0, 2**16)))
  ties = draw(st.sampled_from(["none", "heads", "actions", "both"]))
  if ties in ("heads", "both"):  # both users share one head: exact ties across users
    arrays["heads"][1] = arrays["heads"][0]
  if ties in ("actions", "both"):  # actions 0 and 1 identical: tied true rewards
    arrays["actions"][:, 1] = arrays["actions"][:, 0]
  user_weights = draw(st.sampled_from([None, [1.0, 0.0], [0.3, 0.7]]))
  context_weights = draw(st.sampled_from([None, [0.0, 0.5, 0.5], [0.6, 0.3, 0.1]]))
  reference = draw(st.sampled_from([None, [0.4, 0.0, 0.3, 0.3]]))
  instance = instance_lib.from_arrays(
      **arrays, reward_scale=draw(log_uniform(1e-3, 1e3)), user_weights=user_weights,
      context_weights=context_weights, reference_policy=reference)
  params = S.SimulationParams.make(beta=draw(log_uniform(1e-2, 1e2)),
                                   ridge=draw(log_uniform(1e-3, 10.0)),
                                   mixture_weight=draw(st.floats(0.0, 1.0)))
  return instance, params, draw(st.integers(0, 2**32 - 1))


def _saturated_problem():
  """reward_scale 1e3 with the smallest ridge and beta: BT probabilities saturate."""
  instance = instance_lib.from_arrays(**random_arrays(11), reward_scale=1e3)
  return instance, S.SimulationParams.make(beta=1e-2, ridge=1e-3, mixture_weight=0.5), 5


@PROPERTY_SETTINGS
@given(problem=bt_problems())
@example(problem=_saturated_problem())
def test_records_are_finite_and_bounded(bt_kernel, problem):
  instance, params, master_seed = problem
  states, records = run_kernel(bt_kernel, BT_CONFIG, instance, params, master_seed)
  check_records(records, states, BT_CONFIG, instance)


def test_separable_data_without_ridge_stays_finite(bt_kernel):
  """ridge=0 on (nearly) deterministic choices: the ERM has no minimiser.

  The solver must report it (converged=False somewhere) or stop at a finite
  estimate; it never returns NaN.
  """
  instance = instance_lib.from_arrays(**random_arrays(3), reward_scale=1e3)
  params = S.SimulationParams.make(beta=1.0, ridge=0.0)
  states, records = run_kernel(bt_kernel, BT_CONFIG, instance, params)
  check_records(records, states, BT_CONFIG, instance)
  assert np.all(np.isfinite(records.erm_grad_norm))


def test_all_actions_tied_gives_zero_regret(bt_kernel):
  """Within each context every action is the same response: every estimate is optimal."""
  arrays = random_arrays(4)
  arrays["actions"][:] = arrays["actions"][:, :1]
  instance = instance_lib.from_arrays(**arrays, reward_scale=10.0)
  states, records = run_kernel(bt_kernel, BT_CONFIG, instance, S.SimulationParams.make())
  check_records(records, states, BT_CONFIG, instance)
  assert np.all(records.regret == 0) and np.all(records.realised_regret == 0)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**16), tied=st.integers(1, N_ACTIONS - 1),
       scale=log_uniform(1e-3, 1e3))
def test_greedy_tie_rule_lowest_index_and_zero_regret_when_tied_optimal(seed, tied, scale):
  """Action ``tied`` copies action 0: greedy picks the lower index; picking either costs 0."""
  arrays = random_arrays(seed)
  arrays["actions"][:, tied] = arrays["actions"][:, 0]
  instance = instance_lib.from_arrays(**arrays, reward_scale=scale)
  truth_scores = np.asarray(instance_lib.true_scores(instance))
  assert np.array_equal(truth_scores[..., tied], truth_scores[..., 0])
  support = np.ones((N_CONTEXTS, N_ACTIONS), bool)
  chosen = np.asarray(instance_lib.greedy_actions(jnp.asarray(truth_scores),
                                                  jnp.asarray(support)))
  # NumPy reference: first index of the maximum (np.argmax documents lowest-index ties).
  np.testing.assert_array_equal(chosen, np.argmax(truth_scores, axis=-1))
  assert not np.any(chosen == tied)  # the copy never wins over action 0
  # An estimate that prefers the copy wherever action 0 is optimal loses nothing.
  truth = metrics.truth_tables(jnp.asarray(truth_scores),
                               instance_lib.cell_weights(instance), instance.reference_policy)
  prefer_copy = truth_scores.copy()
  prefer_copy[..., tied] += np.where(chosen == 0, 1.0 + abs(scale), 0.0)
  regret = np.asarray(metrics.cell_regret(truth, jnp.asarray(prefer_copy)))
  assert np.all(regret[chosen == 0] == 0)
  assert np.all(regret >= 0)


# ---------------------------------------------------------------------------
# Edge shapes: one user and one context; slates of every action
# ---------------------------------------------------------------------------


def _run_single_config(config, arrays, scales=(1e-3, 1.0, 1e3)):
  kernel = S.make_chunk_kernel(config, HORIZON)
  for scale in scales:
    instance = instance_lib.from_arrays(**arrays, reward_scale=scale)
    for params in (S.SimulationParams.make(beta=0.1, ridge=1e-3),
                   S.SimulationParams.make(beta=10.0, ridge=10.0)):
      states, records = run_kernel(kernel, config, instance, params, master_seed=7)
      check_records(records, states, config, instance)
  return states, records


def test_one_user_one_context():
  """A single cell (1 context x 1 user): records stay finite and bounded."""
  config = BT_CONFIG
  _, records = _run_single_config(config, random_arrays(5, n_contexts=1, n_users=1))
  assert np.all(records.context == 0) and np.all(records.user == 0)


@pytest.mark.parametrize("choice_model", ["multinomial_logit", "plackett_luce"])
def test_slate_of_every_action(choice_model):
  """slate_size == n_actions (multinomial logit K=A, full Plackett-Luce ranking).

  With ``top_k`` every slate is a permutation of all the actions, and a full
  Plackett-Luce outcome a permutation of all the slate positions.
  """
  config = S.SimulationConfig(horizon=HORIZON, slate_size=N_ACTIONS, choice_model=choice_model,
                              model_class="known_heads", slate_policy="top_k", record_kl=True)
  config.validate(N_ACTIONS, N_ACTIONS)
  states, _ = _run_single_config(config, random_arrays(6))
  data = jax.tree_util.tree_map(np.asarray, states.data)
  assert data.mask.all()
  every = np.arange(N_ACTIONS)
  assert np.all(np.sort(data.slates, axis=-1) == every)
  n_ranked = N_ACTIONS if choice_model == "plackett_luce" else 1
  assert data.outcomes.shape[-1] == n_ranked
  if choice_model == "plackett_luce":
    assert np.all(np.sort(data.outcomes, axis=-1) == every)
  assert np.all((data.outcomes >= 0) & (data.outcomes < N_ACTIONS))


@pytest.mark.slow
@pytest.mark.parametrize("n_contexts,n_users", [(3, 1), (1, 2)], ids=["one-user", "one-context"])
def test_one_user_or_one_context_separately(n_contexts, n_users):
  """The two edge shapes apart (the default run covers them together)."""
  _, records = _run_single_config(BT_CONFIG,
                                  random_arrays(8, n_contexts=n_contexts, n_users=n_users))
  assert np.all(records.context < n_contexts) and np.all(records.user < n_users)


SLOW_CONFIGS = [
    S.SimulationConfig(horizon=HORIZON, model_class=model_class, record_kl=True)
    for model_class in ("known_directions", "per_user_bilinear", "pooled")
] + [
    S.SimulationConfig(horizon=HORIZON, record_kl=True, seed_batching="vmap"),
    S.SimulationConfig(horizon=HORIZON, record_kl=True, regret_evaluation="full"),
    S.SimulationConfig(horizon=HORIZON, slate_size=3, choice_model="plackett_luce", top_m=2,
                       slate_policy="mixture", record_kl=True),
]


@pytest.mark.slow
@pytest.mark.parametrize("config", SLOW_CONFIGS,
                         ids=["known_directions", "per_user_bilinear", "pooled", "vmap",
                              "full-regret", "plackett_luce-top2-mixture"])
def test_records_are_finite_and_bounded_other_configs(config):
  kernel = S.make_chunk_kernel(config, HORIZON)

  @settings(deadline=None, max_examples=10, derandomize=True, database=None)
  @given(problem=bt_problems())
  @example(problem=_saturated_problem())
  def check(problem):
    instance, params, master_seed = problem
    states, records = run_kernel(kernel, config, instance, params, master_seed)
    check_records(records, states, config, instance)

  check()
