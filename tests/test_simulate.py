"""Tests of the simulation kernel (jaxbandit.simulate) against NumPy references.

Re-fitting the exact ERM in the test would be as heavy as the package, so the
per-round regret record is checked through custom learners whose estimates
are known (the truth, or zeros, never updated): their records must equal a
float64 NumPy brute force of G, the realised regret and the KL-regularised
regret. The real learner is then checked for what it must satisfy whatever
its estimates: round 1 deploys the zero estimate, ERM converges, regrets are
non-negative, and its trajectories are deterministic, independent of the
batch, the chunking and padding, and compiled once per configuration.

Compilation dominates (6-10 s per exact-ERM kernel on 2 CPU cores; eight
kernels by default, one more with ``-m slow``), so every run is tiny (4
contexts, 5 actions, d=2, J=2, 2 users, 14 rounds, 5 seeds), shared through
module-scoped fixtures, and repeated runs must reuse the cached kernel of
``make_chunk_kernel``.

Tolerances: records built from float32 scores vs float64 NumPy, 1e-6 relative
plus 1e-6 absolute (scores are O(reward_scale)); KL regrets 1e-5; runs that
should be identical up to float32 reassociation (a different vmap batch,
padding with zero-weight users), 1e-6; vmapped vs a loop of unbatched calls,
1e-5 (STYLE.md). Draws (context, user) are compared exactly everywhere, and a
rerun or a chunked run must reproduce every record bit for bit.

This module does not use the strict rank-promotion mode of the component tests:
the kernel composes every component, and the per-user Hessian and incremental
regret code broadcast by rank on purpose. (A jit cache is keyed on that mode
too, so a module must not mix modes around shared compiled kernels.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl
from scipy import special

from jaxbandit import instance as instance_lib
from jaxbandit import learners
from jaxbandit import simulate as S

HORIZON = 14
CHUNK = 7
N_SEEDS = 5
MASTER_SEED = 3
# Non-uniform pi0 with zeros; context 0 has its lowest index off the support.
REFERENCE = np.array([
    [0.0, 0.4, 0.2, 0.3, 0.1],
    [0.3, 0.1, 0.2, 0.1, 0.3],
    [0.25, 0.25, 0.0, 0.3, 0.2],
    [0.1, 0.2, 0.3, 0.4, 0.0],
])
CONTEXT_WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])
USER_WEIGHTS = np.array([0.6, 0.4])
SIZES = dict(n_contexts=4, n_actions=5, dim=2, latent_dim=2, n_users=2)

# The paper protocol: Bradley-Terry, one draw from pi_t and one from pi0.
# Seeds vectorised with vmap (the accelerator path; 'auto' picks 'map' on CPU,
# which the option runs below exercise).
CONFIG = S.SimulationConfig(horizon=HORIZON, slate_size=2, choice_model="bradley_terry",
                            model_class="known_heads", slate_policy="current_reference",
                            record_kl=True, seed_batching="vmap")
PARAMS = S.SimulationParams.make(beta=0.7, ridge=1.0, mixture_weight=0.5)
OTHER_PARAMS = S.SimulationParams.make(beta=2.0, ridge=0.3, mixture_weight=0.9)

FLOAT_FIELDS = ("regret", "realised_regret", "kl_regret", "erm_grad_norm")


def make_tiny_instance(seed):
  return instance_lib.make_instance(jax.random.key(seed), reward_scale=2.0,
                                    context_weights=CONTEXT_WEIGHTS, user_weights=USER_WEIGHTS,
                                    reference_policy=REFERENCE, **SIZES)


@pytest.fixture(scope="module")
def instance():
  return make_tiny_instance(1)


@pytest.fixture(scope="module")
def batch(instance):
  """The reference run: seeds 0..4 in one batch, whole horizon in one chunk."""
  return S.simulate(instance, CONFIG, PARAMS, n_seeds=N_SEEDS, master_seed=MASTER_SEED)


def records_of(result, seed_index):
  """Records of one seed of the single population, as a dict of NumPy arrays."""
  return {name: np.asarray(value)[0, seed_index] for name, value in
          result.records._asdict().items()}


# ---------------------------------------------------------------------------
# NumPy references (float64, from the instance arrays only)
# ---------------------------------------------------------------------------


def np_true_scores(instance):
  """R*[x, i, a] = s * sum_j h_ij x^T M_j a_{x,a}, (C, U, A) in float64."""
  arrays = [np.asarray(a, np.float64) for a in
            (instance.heads, instance.contexts, instance.maps, instance.actions)]
  return float(instance.reward_scale) * np.einsum("uj,cp,jpq,caq->cua", *arrays)


def np_zero_estimate_tables(instance):
  """Per-cell regret of the all-zero estimate (lowest supported index) and G of it."""
  scores = np_true_scores(instance)
  support = np.asarray(instance.reference_policy) > 0
  first = np.argmax(support, axis=1)  # lowest supported action of each context
  best = np.where(support[:, None, :], scores, -np.inf).max(axis=-1)
  per_cell = best - scores[np.arange(len(first)), :, first]
  weights = (np.asarray(instance.context_weights, np.float64)[:, None] *
             np.asarray(instance.user_weights, np.float64)[None, :])
  return per_cell, float(np.sum(weights * per_cell))


def np_kl_regret_of_pi0(instance, beta):
  """KL-regularised regret of pi_t = pi0 (zero estimate): beta log E_pi0 e^{R*/beta} - E_pi0 R*."""
  scores = np_true_scores(instance)
  reference = np.asarray(instance.reference_policy, np.float64)
  total = 0.0
  for x in range(scores.shape[0]):
    on = reference[x] > 0
    for i in range(scores.shape[1]):
      w = float(instance.context_weights[x]) * float(instance.user_weights[i])
      optimum = beta * special.logsumexp(scores[x, i, on] / beta, b=reference[x, on])
      total += w * (optimum - np.sum(reference[x, on] * scores[x, i, on]))
  return total


def np_min_gap(instance):
  scores = np.sort(np.where(np.asarray(instance.reference_policy)[:, None, :] > 0,
                            np_true_scores(instance), -np.inf), axis=-1)
  return float(np.min(scores[..., -1] - scores[..., -2]))


# ---------------------------------------------------------------------------
# Custom learners with known estimates
# ---------------------------------------------------------------------------

FROZEN_TRACES = []


def frozen_learner(model, theta):
  """A learner that starts at ``theta`` and never updates (fit returns its input).

  It offers score factors, so the simulator keeps its regret through the
  incremental ``metrics.RegretCache`` (the default ``regret_evaluation``);
  the option runs below cover 'full'.
  """

  def fit(params, data, ridge):
    del data, ridge
    return learners.ERMResult(params, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                              jnp.zeros((), jnp.float32), jnp.ones((), jnp.bool_))

  def cell_scores(params, context, user):
    return learners.cell_scores(model, params, context, user)

  return learners.Learner(lambda: theta, fit, lambda p: learners.scores(model, p), cell_scores,
                          lambda p: learners.score_queries(model, p), learners.score_keys(model))


@jax.jit
def run_frozen(instance, params, key, theta):
  """run_rounds over the whole horizon with the estimate frozen at ``theta`` (known_heads)."""
  FROZEN_TRACES.append(1)
  model = learners.make_model_class("known_heads", instance)
  state = S.init_state(CONFIG, instance)._replace(params=theta)
  _, records = S.run_rounds(CONFIG, instance, params, key, state, HORIZON,
                            learner=frozen_learner(model, theta))
  return records


@pytest.fixture(scope="module")
def frozen_runs(instance):
  """{kind: [records of seeds 0, 1, 2]} for the true ('oracle') and the zero estimate."""
  model = learners.make_model_class("known_heads", instance)
  thetas = {"oracle": learners.true_parameters(model, instance),
            "zero": jnp.zeros(model.param_shape, jnp.float32)}
  keys = S.seed_keys(MASTER_SEED, np.arange(3))
  return {kind: [jax.device_get(run_frozen(instance, params, keys[s], theta))
                 for s, params in zip(range(3), (PARAMS, OTHER_PARAMS, PARAMS))]
          for kind, theta in thetas.items()}


def test_oracle_learner_has_exactly_zero_regret(instance, frozen_runs):
  # A gap far above float32 rounding: the true parameters choose a* in every cell.
  assert np_min_gap(instance) > 1e-3
  for records in frozen_runs["oracle"]:
    assert records.regret.shape == (HORIZON,)
    np.testing.assert_array_equal(records.regret, 0.0)
    np.testing.assert_array_equal(records.realised_regret, 0.0)
    # pi_t = pi*_beta up to float32 rounding of the scores.
    assert np.all(np.abs(records.kl_regret) <= 1e-5)


def test_zero_learner_regret_equals_numpy_brute_force(instance, frozen_runs):
  per_cell, regret_of_zero = np_zero_estimate_tables(instance)
  assert regret_of_zero > 0.1  # the zero estimate is wrong somewhere
  kl_of_pi0 = {float(p.beta): np_kl_regret_of_pi0(instance, float(p.beta))
               for p in (PARAMS, OTHER_PARAMS)}
  for records, params in zip(frozen_runs["zero"], (PARAMS, OTHER_PARAMS, PARAMS)):
    np.testing.assert_allclose(records.regret, np.full(HORIZON, regret_of_zero), rtol=1e-6,
                               atol=1e-6)
    # Realised regret: best minus chosen for the round's own (context, user).
    want = per_cell[records.context, records.user]
    np.testing.assert_allclose(records.realised_regret, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(records.kl_regret, kl_of_pi0[float(params.beta)], rtol=1e-5,
                               atol=1e-5)


def test_frozen_runs_traced_once_and_draws_independent_of_learner(batch, frozen_runs):
  # Six calls with new keys, estimates and (beta, ridge, mixture_weight): one trace.
  assert len(FROZEN_TRACES) == 1
  # A round's (context, user) depends only on (seed, round), not on the learner.
  for runs in frozen_runs.values():
    for s in range(3):
      np.testing.assert_array_equal(runs[s].context, records_of(batch, s)["context"])
      np.testing.assert_array_equal(runs[s].user, records_of(batch, s)["user"])


# ---------------------------------------------------------------------------
# The exact-ERM learner
# ---------------------------------------------------------------------------


def assert_erm_records_sound(result, instance, config, n_seeds):
  records = result.records
  shape = (1, n_seeds, config.horizon)
  for name, value in records._asdict().items():
    assert value.shape == shape, name
  for name in FLOAT_FIELDS:
    assert np.all(np.isfinite(getattr(records, name))), name
  assert records.erm_converged.dtype == np.bool_ and np.all(records.erm_converged)
  # Converged refits sit at the float32 floor (<= 4e-4 seen over 14 observations);
  # one unfitted observation alone has a gradient of order 0.5 |features| ~ 1.
  assert np.all(records.erm_grad_norm <= 2e-3)
  assert np.all((records.erm_iterations >= 0) &
                (records.erm_iterations <= config.erm_max_iterations))
  assert np.all(records.regret >= 0) and np.all(records.realised_regret >= 0)
  cumulative = result.cumulative_regret()
  np.testing.assert_allclose(cumulative, np.cumsum(records.regret.astype(np.float64), -1))
  assert np.all(np.diff(cumulative, axis=-1) >= 0)
  assert np.all((records.context >= 0) & (records.context < instance.n_contexts))
  assert np.all((records.user >= 0) & (records.user < instance.n_users))
  # Round 1 deploys the learner's initial (all-zero) estimate.
  per_cell, regret_of_zero = np_zero_estimate_tables(instance)
  np.testing.assert_allclose(records.regret[..., 0], regret_of_zero, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(records.realised_regret[..., 0],
                             per_cell[records.context[..., 0], records.user[..., 0]],
                             rtol=1e-6, atol=1e-6)


def test_erm_records_are_sound(batch, instance):
  assert_erm_records_sound(batch, instance, CONFIG, N_SEEDS)
  assert np.all(batch.records.kl_regret >= 0)
  np.testing.assert_array_equal(batch.seed_ids, np.arange(N_SEEDS))
  # The learner learns: the last round's regret is below the zero estimate's.
  _, regret_of_zero = np_zero_estimate_tables(instance)
  assert np.mean(batch.records.regret[..., -1]) < regret_of_zero
  # The final state holds exactly the recorded observations.
  state = batch.final_state
  np.testing.assert_array_equal(np.asarray(state.round), HORIZON)
  assert np.all(np.asarray(state.data.mask))
  np.testing.assert_array_equal(np.asarray(state.data.contexts), batch.records.context)
  np.testing.assert_array_equal(np.asarray(state.data.users), batch.records.user)


def test_rerun_is_bit_identical_and_does_not_recompile(batch, instance):
  kernel = S.make_chunk_kernel(CONFIG, HORIZON)
  traced = kernel._cache_size()
  again = S.simulate(instance, CONFIG, PARAMS, n_seeds=N_SEEDS, master_seed=MASTER_SEED)
  for name in S.RoundRecord._fields:
    np.testing.assert_array_equal(getattr(again.records, name), getattr(batch.records, name),
                                  err_msg=name)
  assert S.make_chunk_kernel(CONFIG, HORIZON) is kernel
  assert kernel._cache_size() == traced


def test_different_seeds_give_different_trajectories(batch, instance):
  for name in ("context", "user"):
    rows = getattr(batch.records, name)[0]
    for a in range(N_SEEDS):
      for b in range(a):
        assert not np.array_equal(rows[a], rows[b]), (name, a, b)
  other_master = S.simulate(instance, CONFIG, PARAMS, n_seeds=N_SEEDS,
                            master_seed=MASTER_SEED + 1)
  assert not np.array_equal(other_master.records.context, batch.records.context)


def test_solo_seed_matches_the_same_seed_inside_a_batch(batch, instance):
  solo = S.simulate(instance, CONFIG, PARAMS, n_seeds=1, master_seed=MASTER_SEED, first_seed=2)
  np.testing.assert_array_equal(solo.seed_ids, [2])
  got, want = records_of(solo, 0), records_of(batch, 2)
  for name in ("context", "user", "erm_converged"):
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for name in ("regret", "realised_regret", "kl_regret"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_chunked_run_matches_whole_horizon(batch, instance):
  calls = []
  chunked = S.simulate(instance, CONFIG, PARAMS, n_seeds=N_SEEDS, master_seed=MASTER_SEED,
                       chunk_size=CHUNK, callback=lambda progress: calls.append((progress.rounds_done,
                                                                progress.horizon)))
  assert calls == [(CHUNK, HORIZON), (HORIZON, HORIZON)]
  # Every chunk runs the same compiled round on the same state: bit-identical records.
  for name in S.RoundRecord._fields:
    np.testing.assert_array_equal(getattr(chunked.records, name), getattr(batch.records, name),
                                  err_msg=name)
  np.testing.assert_array_equal(np.asarray(chunked.final_state.params),
                                np.asarray(batch.final_state.params))


def test_kernel_runs_with_one_blas_thread_and_the_limit_is_restored(batch, instance):
  """SciPy's OpenBLAS (jaxlib's CPU LAPACK) has one thread while the chunks run, so no idle
  BLAS thread spins beside XLA's; the caller's limits come back afterwards."""
  blas_threads = lambda: [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                          if lib["user_api"] == "blas"]
  before = blas_threads()
  assert before, "jaxlib's CPU LAPACK should have loaded a BLAS library"
  during = []
  result = S.simulate(instance, CONFIG, PARAMS, n_seeds=N_SEEDS, master_seed=MASTER_SEED,
                      chunk_size=CHUNK, callback=lambda progress: during.append(blas_threads()))
  assert during == [[1] * len(before)] * 2
  assert blas_threads() == before
  np.testing.assert_array_equal(result.records.regret, batch.records.regret)


def test_stop_and_resume_in_process_matches_whole_horizon(batch, instance):
  saved = []

  def stop_after_first_chunk(progress):
    # The callback sees the records of the rounds done so far, (P, S, rounds_done).
    assert progress.records.regret.shape[-1] == progress.rounds_done
    saved.append(S.Progress(progress.rounds_done, progress.horizon,
                            jax.device_get(progress.states),
                            jax.tree_util.tree_map(np.copy, progress.records)))
    return True

  stopped = S.simulate(instance, CONFIG, PARAMS, n_seeds=N_SEEDS, master_seed=MASTER_SEED,
                       chunk_size=CHUNK, callback=stop_after_first_chunk)
  assert stopped.rounds_done == CHUNK and stopped.records.regret.shape[-1] == CHUNK
  resumed = S.simulate(instance, CONFIG, PARAMS, n_seeds=N_SEEDS, master_seed=MASTER_SEED,
                       chunk_size=CHUNK, resume_from=saved[0])
  assert resumed.rounds_done == HORIZON
  for name in S.RoundRecord._fields:
    np.testing.assert_array_equal(getattr(resumed.records, name), getattr(batch.records, name),
                                  err_msg=name)


def test_vmapped_seeds_equal_a_loop_of_unbatched_run_rounds(batch, instance):
  traces = []

  def one_seed(instance, params, key, state):
    traces.append(1)
    return S.run_rounds(CONFIG, instance, params, key, state, HORIZON)

  step = jax.jit(one_seed)
  keys = S.seed_keys(MASTER_SEED, np.arange(N_SEEDS))
  for s in range(N_SEEDS):
    state, records = step(instance, PARAMS, keys[s], S.init_state(CONFIG, instance))
    want = records_of(batch, s)
    for name in ("context", "user"):
      np.testing.assert_array_equal(np.asarray(getattr(records, name)), want[name])
    for name in ("regret", "realised_regret", "kl_regret"):
      np.testing.assert_allclose(np.asarray(getattr(records, name)), want[name], rtol=1e-5,
                                 atol=1e-5, err_msg=f"seed {s} {name}")
    np.testing.assert_allclose(np.asarray(state.params),
                               np.asarray(batch.final_state.params)[0, s], rtol=1e-5, atol=1e-5)
  assert len(traces) == 1


def test_chunk_kernel_traced_once_for_new_values(batch, instance):
  """New instance values and params of the same shapes reuse the compiled kernel."""
  kernel = S.make_chunk_kernel(CONFIG, HORIZON)
  traced = kernel._cache_size()
  assert traced >= 1  # the ``batch`` run compiled it
  other = make_tiny_instance(2)
  keys = S.seed_keys(MASTER_SEED, np.arange(N_SEEDS))
  results = []
  for inst, params in ((other, PARAMS), (instance, OTHER_PARAMS), (other, OTHER_PARAMS)):
    stacked = jax.tree_util.tree_map(lambda x: x[None], inst)
    states = S.init_states(CONFIG, stacked, N_SEEDS)
    results.append(jax.device_get(kernel(stacked, params, keys, states)[1]))
  assert kernel._cache_size() == traced
  # ... and the new values were used.
  assert not np.allclose(results[0].regret, batch.records.regret)
  assert not np.allclose(results[0].regret, results[2].regret)
  # simulate() with new params goes through the same compiled kernel.
  S.simulate(other, CONFIG, OTHER_PARAMS, n_seeds=N_SEEDS, master_seed=MASTER_SEED + 7)
  assert kernel._cache_size() == traced


def test_stacked_populations_match_each_population_run_alone(batch, instance):
  """Under vmap the refits' Newton fallbacks run on lanes gathered from every
  population (every lane needs one in round 1): each must use its own
  population's instance and ridge."""
  other = make_tiny_instance(2)
  stacked = instance_lib.stack_instances([instance, other])
  params = S.SimulationParams(*(jnp.asarray([a, b], jnp.float32)
                                for a, b in zip(PARAMS, OTHER_PARAMS)))
  both = S.simulate(stacked, CONFIG, params, n_seeds=N_SEEDS, master_seed=MASTER_SEED)
  alone = [batch, S.simulate(other, CONFIG, OTHER_PARAMS, n_seeds=N_SEEDS,
                             master_seed=MASTER_SEED)]
  for lane, single in enumerate(alone):
    for name in ("context", "user", "erm_converged"):
      np.testing.assert_array_equal(getattr(both.records, name)[lane],
                                    getattr(single.records, name)[0], err_msg=name)
    for name in ("regret", "realised_regret", "kl_regret"):
      np.testing.assert_allclose(getattr(both.records, name)[lane],
                                 getattr(single.records, name)[0], rtol=1e-6, atol=1e-6,
                                 err_msg=f"lane {lane} {name}")
    np.testing.assert_allclose(np.asarray(both.final_state.params)[lane],
                               np.asarray(single.final_state.params)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~12 s; stacked populations (padded to the largest) are checked above
def test_padding_with_zero_weight_users_changes_nothing(batch, instance):
  padded = instance_lib.pad_users(instance, 4)
  assert padded.n_users == 4
  result = S.simulate(padded, CONFIG, PARAMS, n_seeds=N_SEEDS, master_seed=MASTER_SEED)
  for name in ("context", "user"):
    np.testing.assert_array_equal(getattr(result.records, name), getattr(batch.records, name),
                                  err_msg=name)
  assert np.all(result.records.user < instance.n_users)
  assert np.all(result.records.erm_converged)
  for name in ("regret", "realised_regret", "kl_regret"):
    np.testing.assert_allclose(getattr(result.records, name), getattr(batch.records, name),
                               rtol=1e-6, atol=1e-6, err_msg=name)


# Many actions in two dimensions: each context's keys have 6-12 hull vertices of
# 40, so the regret pass visits 16 actions (metrics.extreme_actions).
WIDE_SIZES = dict(SIZES, n_actions=40)
WIDE_CONFIG = dataclasses.replace(CONFIG, record_kl=False)


@pytest.fixture(scope="module")
def wide_instance():
  reference = np.ones((SIZES["n_contexts"], WIDE_SIZES["n_actions"]))
  reference[0, :3] = 0.0  # context 0 starts off the support
  return instance_lib.make_instance(jax.random.key(5), reward_scale=2.0,
                                    context_weights=CONTEXT_WEIGHTS, user_weights=USER_WEIGHTS,
                                    reference_policy=reference / reference.sum(1, keepdims=True),
                                    **WIDE_SIZES)


@pytest.mark.parametrize("evaluation", ["full", "certified"])
def test_regret_over_extreme_actions_equals_numpy_brute_force(wide_instance, evaluation):
  """A frozen random estimate, its regret kept over the actions that can be greedy
  (the simulator's labels), against every action scored in float64: by the fused pass
  over every cell, and by the certified pass, which scores every cell of positive
  weight in round 1 and none after (the estimate never moves)."""
  config = dataclasses.replace(WIDE_CONFIG, seed_batching="map", regret_evaluation=evaluation)
  labels = S.action_labels(config, wide_instance)
  assert labels is not None and labels.shape[-1] < WIDE_SIZES["n_actions"]
  model = learners.make_model_class("known_heads", wide_instance)
  theta = jax.random.normal(jax.random.key(9), model.param_shape)

  @jax.jit
  def run(labels):
    state = S.init_state(config, wide_instance)._replace(params=theta)
    return S.run_rounds(config, wide_instance, PARAMS, jax.random.key(0), state, HORIZON,
                        learner=frozen_learner(model, theta), action_labels=labels)[1]

  records = jax.device_get(run(jnp.asarray(labels[0])))
  d = SIZES["dim"]
  estimate = np.einsum("uj,cp,jpq,caq->cua", np.asarray(wide_instance.heads, np.float64),
                       np.asarray(wide_instance.contexts, np.float64),
                       np.asarray(theta, np.float64).reshape(-1, d, d),
                       np.asarray(wide_instance.actions, np.float64))
  truth = np_true_scores(wide_instance)
  support = np.asarray(wide_instance.reference_policy) > 0
  weights = (np.asarray(wide_instance.context_weights, np.float64)[:, None] *
             np.asarray(wide_instance.user_weights, np.float64)[None, :])
  regret = 0.0
  for c in range(SIZES["n_contexts"]):
    for i in range(SIZES["n_users"]):
      greedy = np.flatnonzero(support[c])[np.argmax(estimate[c, i, support[c]])]
      regret += weights[c, i] * (truth[c, i, support[c]].max() - truth[c, i, greedy])
  assert regret > 0.1  # a random estimate is wrong somewhere
  np.testing.assert_allclose(records.regret, regret, rtol=1e-6)
  if evaluation == "certified":
    assert records.rescored_cells[0] == np.sum(weights > 0)
    assert np.all(records.rescored_cells[1:] == 0)


@pytest.mark.parametrize("batching", [
    "map", pytest.param("vmap", marks=pytest.mark.slow)])  # vmap: two more compiles, ~20 s
def test_certified_regret_equals_the_full_pass(wide_instance, batching):
  """The exact ERM's moving estimates: the certified pass (native kernel; under vmap it
  runs lane by lane) records the same regret as the fused pass over every cell, bit for
  bit (this instance has no two actions tied within float32 rounding, which the two
  passes could break differently), with the same trajectories, and scores every cell
  only in round 1."""
  runs = {}
  for evaluation in ("full", "certified"):
    config = dataclasses.replace(WIDE_CONFIG, seed_batching=batching,
                                 regret_evaluation=evaluation)
    assert S.resolve_regret_evaluation(config) == evaluation
    runs[evaluation] = S.simulate(wide_instance, config, PARAMS, n_seeds=2,
                                  master_seed=MASTER_SEED).records
  full, certified = runs["full"], runs["certified"]
  for name in S.RoundRecord._fields:
    if name != "rescored_cells":
      np.testing.assert_array_equal(getattr(certified, name), getattr(full, name), err_msg=name)
  cells = SIZES["n_contexts"] * SIZES["n_users"]
  assert np.all(certified.rescored_cells[..., 0] == cells)
  assert np.all(certified.rescored_cells <= cells)
  assert np.all(full.regret[..., -1] < full.regret[..., 0])  # it learns


@pytest.mark.slow  # ~15 s: an XLA-gradient kernel more; every default kernel test runs 'native'
def test_native_gradient_reaches_the_xla_gradients_estimates(wide_instance):
  """erm_gradient='native' (the C++ row loop) against 'xla' (per-user sums, cell
  table) in the whole kernel: every refit converges either way, the estimates agree
  to the ERM's tolerance, and so every greedy action and hence every recorded regret
  is the same (this instance has no near-tie the rounding could flip). The
  gradient norms at the solutions differ, in the rounding of the sums."""
  runs = {}
  for gradient in ("xla", "native"):
    config = dataclasses.replace(WIDE_CONFIG, seed_batching="map", erm_gradient=gradient)
    assert S.resolve_erm_gradient(config) == gradient
    runs[gradient] = S.simulate(wide_instance, config, PARAMS, n_seeds=2,
                                master_seed=MASTER_SEED)
  xla, native = runs["xla"].records, runs["native"].records
  assert np.all(xla.erm_converged) and np.all(native.erm_converged)
  for name in ("regret", "realised_regret", "context", "user", "rescored_cells"):
    np.testing.assert_array_equal(getattr(native, name), getattr(xla, name), err_msg=name)
  assert not np.array_equal(native.erm_grad_norm, xla.erm_grad_norm)  # two summations
  xla_params = np.asarray(runs["xla"].final_state.params)
  np.testing.assert_allclose(np.asarray(runs["native"].final_state.params), xla_params,
                             rtol=1e-4, atol=1e-4 * np.abs(xla_params).max())
  assert np.all(xla.regret[..., -1] < xla.regret[..., 0])  # it learns


@pytest.mark.slow  # ~26 s on 2 cores; the map path's labels are checked against NumPy above
def test_vmapped_kernel_gives_the_same_records_with_and_without_labels(wide_instance):
  """The labels change no cell's regret: simulate() (which passes them) against the
  kernel called without them. Every record is the same bit for bit except the
  population regret, a weighted sum over the cells that XLA may reassociate
  when the pass before it changes (1e-6)."""
  result = S.simulate(wide_instance, WIDE_CONFIG, PARAMS, n_seeds=2, master_seed=MASTER_SEED)
  instances = jax.tree_util.tree_map(lambda x: x[None], wide_instance)
  states = S.init_states(WIDE_CONFIG, instances, 2)
  _, records = S.make_chunk_kernel(WIDE_CONFIG, HORIZON)(
      instances, PARAMS, S.seed_keys(MASTER_SEED, np.arange(2)), states)
  for name in S.RoundRecord._fields:
    if name != "regret":
      np.testing.assert_array_equal(getattr(result.records, name),
                                    np.asarray(getattr(records, name)), err_msg=name)
  np.testing.assert_allclose(result.records.regret, np.asarray(records.regret), rtol=1e-6)
  assert np.all(result.records.regret[..., -1] < result.records.regret[..., 0])  # it learns


@pytest.mark.slow  # one more exact-ERM compile (~10 s); the frozen learners cover the cache
def test_incremental_regret_equals_full_rescoring(batch, instance):
  """The incremental regret cache records the same regret as re-scoring every cell.

  ``batch`` runs CONFIG, whose vmap batching makes 'auto' mean 'full'; this
  runs the same seeds with the cache forced on. At this size every cell is due
  in every round, so this checks the cache's re-scoring branches inside the
  simulator; tests/test_metrics.py's random walk covers its quiet rounds.
  """
  assert S.resolve_regret_evaluation(CONFIG) == "full"
  cached_config = dataclasses.replace(CONFIG, regret_evaluation="incremental")
  assert S.resolve_regret_evaluation(cached_config) == "incremental"
  cached = S.simulate(instance, cached_config, PARAMS, n_seeds=N_SEEDS,
                      master_seed=MASTER_SEED)
  for name in ("context", "user", "erm_converged"):
    np.testing.assert_array_equal(getattr(cached.records, name), getattr(batch.records, name),
                                  err_msg=name)
  for name in ("regret", "realised_regret", "kl_regret"):
    np.testing.assert_allclose(getattr(cached.records, name), getattr(batch.records, name),
                               rtol=1e-6, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------
# Slate sizes, choice models, model classes and slate policies
# ---------------------------------------------------------------------------

OPTION_HORIZON = 10
OPTIONS = {
    "mnl3-known_directions-top_k":
        dict(slate_size=3, choice_model="multinomial_logit", model_class="known_directions",
             slate_policy="top_k"),
    "pl3_full-per_user_bilinear-softened":
        dict(slate_size=3, choice_model="plackett_luce", model_class="per_user_bilinear",
             slate_policy="softened"),
    "pl3_top2-pooled-mixture-full_regret":
        dict(slate_size=3, choice_model="plackett_luce", top_m=2, model_class="pooled",
             slate_policy="mixture", regret_evaluation="full"),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_choice_models_and_model_classes_run(option, batch, instance):
  config = S.SimulationConfig(horizon=OPTION_HORIZON, record_kl=True, **OPTIONS[option])
  result = S.simulate(instance, config, PARAMS, n_seeds=2, master_seed=MASTER_SEED)
  assert_erm_records_sound(result, instance, config, 2)
  assert np.all(result.records.kl_regret >= 0)
  # Draws of (context, user) depend only on (seed, round), whatever the configuration.
  for name in ("context", "user"):
    np.testing.assert_array_equal(getattr(result.records, name)[0],
                                  getattr(batch.records, name)[0, :2, :OPTION_HORIZON])
  assert result.final_state.data.slates.shape[-1] == config.slate_size
  n_ranked = (config.top_m or config.slate_size) if config.choice_model == "plackett_luce" else 1
  assert result.final_state.data.outcomes.shape[-1] == n_ranked
