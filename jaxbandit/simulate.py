"""The online greedy exact-ERM loop as one compiled kernel.

One round (for one seed and one population)::

    key_t = fold_in(seed_key, t)                 # draws depend on (seed, t) only
    x ~ d0, i ~ rho                              # context and user
    slate = policy(key, R_hat_{t-1}(x, ., i))    # K actions
    outcome ~ choice_model(R*(x, slate, i))      # feedback from the TRUE scores
    record G(R_hat_{t-1}), realised and KL regret of the deployed estimate
    R_hat_t = exact ERM on rounds 1..t, warm-started at R_hat_{t-1}

Rounds are a ``lax.scan``; seeds and populations are ``vmap`` axes (or a
``lax.map`` on CPU); one ``jit`` compiles the lot. Static sizes and names live
in :class:`SimulationConfig`; numbers one may sweep (``beta``, ``ridge``, ``mixture_weight``, and every
instance array, reward scale included) are traced.

The kernel advances a :class:`SimState` by a chunk of rounds, so a long run is
a sequence of chunk calls with the host touching the state only in between;
since round draws depend only on the seed key and the round index, any
chunking gives the same trajectory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from jaxbandit import choice as choice_lib
from jaxbandit import learners as learners_lib
from jaxbandit import lowering
from jaxbandit import metrics
from jaxbandit import native
from jaxbandit import policies as policies_lib
from jaxbandit import validation as V
from jaxbandit.instance import Instance, cell_weights, true_scores
from jaxbandit.precision import full_precision

# The kernel draws its randomness with Threefry: unrolled on the CPU, the same
# bits in fewer XLA:CPU operations a round (see jaxbandit/lowering.py).
lowering.unroll_threefry_on_cpu()


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
  """Static choices of a simulation (changing one recompiles).

  Attributes:
    horizon: rounds per seed (also the data-buffer capacity).
    slate_size: K >= 2 responses shown per round.
    choice_model: 'bradley_terry' (K=2), 'multinomial_logit' or 'plackett_luce'.
    top_m: Plackett-Luce ranks the top ``top_m`` (None: the full slate).
    model_class: learner class, see ``learners.MODEL_CLASSES``.
    slate_policy: see ``policies.SLATE_POLICIES``.
    erm_tol: exact-ERM tolerance (see ``learners.fit_erm``).
    erm_max_iterations: Newton iteration budget per refit.
    record_kl: also record the KL-regularised regret (one extra softmax over
      every cell per round).
    seed_batching: 'vmap' (seeds and populations vectorised together, the
      rare Newton fallback of a carried refit run only for the lanes that need
      it; best on accelerators), 'map' (one after another inside the same
      kernel, each solver loop and regret update doing only its own work; best
      on a few CPU cores) or 'auto' ('map' on CPU, 'vmap' elsewhere). Results
      agree to floating-point tolerance.
    regret_evaluation: 'full' scores every (context, user, action) each
      round in one fused XLA pass over the actions (always so with
      ``record_kl``, which needs every score anyway); 'certified' (CPU only)
      keeps each cell's greedy value with a radius around the query where it
      was last scored and re-scores, in a native kernel, only the cells whose
      query has left it (1-3% of them late in a run) and never the cells of
      zero weight (``metrics.certified_cell_values``, ``jaxbandit.native``);
      'incremental' keeps the same exact regret from ``regret_candidates``
      scores per cell, re-scoring every action of a cell only once its query
      has moved far enough from where it was last scored to bring a
      non-candidate level with its greedy action (see
      ``metrics.RegretCache``); 'auto' is 'certified' on the CPU when the
      native kernel can be built, else 'full'. All give the same greedy action
      in every cell, up to two actions tied within float32 rounding, which
      two paths may break differently: at paper size 11 of 16,000
      seed-rounds differed between 'certified' and 'full', each in one cell,
      by 1e-4 to 1e-3 of the round's regret. On the 2-core benchmark CPU
      'certified' made late rounds (t = 2,000-4,000) 1.6-1.7x faster than
      'full' at 100 users, one core each (padded users are never scored); it
      is slower over the first ~300 rounds, while most cells move. 'full' was 1.4x faster than the candidate cache at 100
      users x 2,000 rounds; under 'vmap' every branch of the cache's update
      runs each round, which makes the cache about 2.5x slower.
    rescore_budget: cells re-scored one by one before falling back to a full
      evaluation ('incremental' only).
    regret_candidates: K candidate actions kept per cell ('incremental'
      only; at most the number of actions). More candidates cost K scores
      per cell per round but leave a larger radius before a cell must be
      re-scored.
    data_layout: 'buffer' (one row per round: memory and ERM cost grow with the
      horizon) or 'table' (one weighted row per possible (context, user,
      slate, outcome): cost independent of the horizon; for small instances
      and very long horizons, e.g. a million rounds).
    erm_block_size: rows per block of the ERM's sums over the buffer; only
      the blocks holding data are visited, so round t costs O(t), not
      O(horizon). Used when the horizon spans at least 4 blocks (below that
      the loop's overhead outweighs the saving: measured 1.6x faster at
      T=3000, 13% slower at T=1000 with 128-row blocks); 0 disables it.
      Blocks of at most 256 rows also let the outer-product classes'
      gradient go through a (context, user) cell table
      (``learners.cell_table_applies``).
    erm_hessian: 'carried' (each seed carries the inverse Hessian of its last
      refit, updated for the new observation by the Woodbury identity; refits
      then need one or two gradient evaluations and rarely a Hessian, see
      ``learners.fit_erm_carried``) or 'fresh' (every refit evaluates and
      factors the Hessian at its warm start, ``learners.fit_erm``). Both meet
      the same tolerance; 'carried' adds one p x p matrix per seed to the state.
    erm_gradient: how the refit's gradient passes over the data are summed:
      'xla' (XLA operations: per user while the rows are few, then through a
      (context, user) cell table, see ``erm_block_size``), 'native' (CPU only:
      a C++ kernel that visits each row once and nothing per cell,
      ``learners.native_user_gradient``; for the outer-product model classes
      ``known_heads``, ``pooled`` and ``per_user_bilinear``) or 'auto'
      ('native' on the CPU for those classes with Bradley-Terry feedback and
      at most 8 factors, where the kernel's vector path runs, when the native
      kernels build; else 'xla'; see ``resolve_erm_gradient``). Both meet the
      same tolerance; the estimates differ by the rounding of the sums.
  """

  horizon: int = 1000
  slate_size: int = 2
  choice_model: str = "bradley_terry"
  top_m: Optional[int] = None
  model_class: str = "known_heads"
  slate_policy: str = "current_reference"
  erm_tol: float = 1e-12
  erm_max_iterations: int = 30
  record_kl: bool = False
  seed_batching: str = "auto"
  regret_evaluation: str = "auto"
  rescore_budget: int = 512
  regret_candidates: int = 8
  data_layout: str = "buffer"
  erm_block_size: int = 256
  erm_hessian: str = "carried"
  erm_gradient: str = "auto"

  def validate(self, n_actions: Optional[int] = None, min_support: Optional[int] = None):
    V.positive_int("horizon", self.horizon)
    V.one_of("choice_model", self.choice_model, choice_lib.CHOICE_MODELS)
    V.one_of("model_class", self.model_class, learners_lib.MODEL_CLASSES)
    V.one_of("slate_policy", self.slate_policy, policies_lib.SLATE_POLICIES)
    V.positive_float("erm_tol", self.erm_tol)
    V.positive_int("erm_max_iterations", self.erm_max_iterations)
    V.one_of("seed_batching", self.seed_batching, ("auto", "vmap", "map"))
    V.one_of("regret_evaluation", self.regret_evaluation,
             ("auto", "full", "incremental", "certified"))
    V.positive_int("rescore_budget", self.rescore_budget)
    V.positive_int("regret_candidates", self.regret_candidates)
    V.one_of("data_layout", self.data_layout, ("buffer", "table"))
    V.non_negative_int("erm_block_size", self.erm_block_size)
    V.one_of("erm_hessian", self.erm_hessian, ("carried", "fresh"))
    V.one_of("erm_gradient", self.erm_gradient, ("auto", "xla", "native"))
    V.boolean("record_kl", self.record_kl)
    if self.top_m is not None:
      V.positive_int("top_m", self.top_m)
    model = choice_lib.get_choice_model(self.choice_model, self.top_m)
    if n_actions is not None:
      choice_lib.check_slate_size(model, self.slate_size, n_actions)
    else:
      V.int_in_range("slate_size", self.slate_size, 2, 10**9)
    if self.slate_policy == "top_k" and min_support is not None and self.slate_size > min_support:
      raise ValueError(f"slate_size={self.slate_size} is not allowed with slate_policy='top_k' "
                       f"when a context supports only {min_support} actions; allowed: "
                       f"slate_size <= {min_support}")
    return self


class SimulationParams(NamedTuple):
  """Traced numbers of a simulation (vmappable; changing them does not recompile).

  Attributes:
    beta: () temperature of the softened policy and of the KL-regularised regret.
    ridge: () exact-ERM ridge penalty (>= 0).
    mixture_weight: () weight of pi_t in the 'mixture' slate policy.
  """

  beta: jax.Array
  ridge: jax.Array
  mixture_weight: jax.Array

  @staticmethod
  def make(beta: float = 1.0, ridge: float = 1.0, mixture_weight: float = 0.5):
    V.positive_float("beta", beta)
    V.non_negative_float("ridge", ridge)
    V.unit_interval("mixture_weight", mixture_weight)
    f = lambda v: jnp.asarray(v, jnp.float32)
    return SimulationParams(f(beta), f(ridge), f(mixture_weight))


class SimState(NamedTuple):
  """What one seed carries from round to round.

  Attributes:
    params: the learner's current estimate (its ``param_shape``).
    data: :class:`learners.ChoiceData` buffer of capacity ``horizon``.
    round: () int32 number of rounds completed.
    regret_cache: the regret pass's state for ``params``: :class:`metrics.CertifiedCells`
      with ``regret_evaluation`` 'certified', else :class:`metrics.RegretCache`
      (used by 'incremental' only).
    solver: the learner's carried solver state (``learners.HessianCarry`` with
      ``erm_hessian='carried'``; an empty tuple otherwise).
  """

  params: jax.Array
  data: learners_lib.ChoiceData
  round: jax.Array
  regret_cache: metrics.RegretCache
  solver: object = ()


class RoundRecord(NamedTuple):
  """Per-round outputs (the scan's ys), each (..., n_rounds).

  Attributes:
    regret: temperature-zero population regret G of the deployed estimate.
    realised_regret: R*(x, a*, i) - R*(x, a_R_hat, i) for the round's (x, i).
    kl_regret: KL-regularised regret of the training policy (0 unless recorded).
    erm_iterations: Newton iterations of the refit after the round.
    erm_grad_norm: max-abs gradient at the refit.
    erm_converged: the refit met its tolerance.
    context: the round's context index.
    user: the round's user index.
    rescored_cells: (context, user) cells whose scores were evaluated for the
      regret this round (all of them under full evaluation).
  """

  regret: jax.Array
  realised_regret: jax.Array
  kl_regret: jax.Array
  erm_iterations: jax.Array
  erm_grad_norm: jax.Array
  erm_converged: jax.Array
  context: jax.Array
  user: jax.Array
  rescored_cells: jax.Array


def seed_keys(master_seed, seed_ids) -> jax.Array:
  """Per-seed keys ``fold_in(key(master_seed), seed_id)``: independent of the batch."""
  base = jax.random.key(master_seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(seed_ids, jnp.uint32))


# Below this many rows the blocked refit of an outer-product class sums its
# gradient per user rather than through the cell table: measured inside the
# kernel (benchmarks/attribution.py harness, one core, U = 100), medians 16-25%
# lower over rounds 0-1,000 (benchmarks/RESULTS.md, fourteenth session).
CELL_TABLE_FROM_ROWS = 1024


def _components(config: SimulationConfig, instance: Instance):
  choice_model = choice_lib.get_choice_model(config.choice_model, config.top_m)
  model = learners_lib.make_model_class(config.model_class, instance)
  # One seed at a time (map) the row count is a scalar, so the refit can keep
  # the per-user gradient while the data are few (see CELL_TABLE_FROM_ROWS).
  one_at_a_time = resolve_batching(config) == "map"
  learner = learners_lib.make_learner(
      model, choice_model, tol=config.erm_tol, max_iterations=config.erm_max_iterations,
      cell_table_from=CELL_TABLE_FROM_ROWS if one_at_a_time else None,
      native_gradient=resolve_erm_gradient(config, instance.contexts.shape[-1]) == "native")
  policy = policies_lib.make_slate_policy(config.slate_policy, config.slate_size)
  return choice_model, learner, policy


def uses_erm_blocks(config: SimulationConfig) -> bool:
  """Whether the ERM visits the buffer in blocks (see ``erm_block_size``)."""
  return (config.erm_block_size > 0 and config.data_layout == "buffer" and
          config.horizon >= 4 * config.erm_block_size)


def buffer_capacity(config: SimulationConfig) -> int:
  """Rows of the data buffer: the horizon, rounded up to whole ERM blocks when used."""
  block = config.erm_block_size
  return -(-config.horizon // block) * block if uses_erm_blocks(config) else config.horizon


def regret_candidates(config: SimulationConfig, n_actions: int) -> int:
  """Candidate actions per cell of the regret cache (at most ``n_actions``)."""
  return min(config.regret_candidates, n_actions)


def carries_hessian(config: SimulationConfig, learner: learners_lib.Learner) -> bool:
  """Whether refits use the learner's carried inverse Hessian (``erm_hessian='carried'``)."""
  return config.erm_hessian == "carried" and learner.fit_carried is not None


def refits_in_phases(config: SimulationConfig, learner: learners_lib.Learner) -> bool:
  """Whether refits run as ``learner.carried_phases`` (then a batch can run their Newton
  fallback only for the lanes that need it)."""
  return carries_hessian(config, learner) and learner.carried_phases is not None


def init_state(config: SimulationConfig, instance: Instance) -> SimState:
  """The state before round 1 for one seed (estimate at the learner's ``init``)."""
  choice_model, learner, _ = _components(config, instance)
  n_ranked = choice_model.outcome_size(config.slate_size)
  if config.data_layout == "table":
    # Only the counts evolve; the index columns are constants rebuilt in run_rounds.
    rows = learners_lib.table_size(instance.n_contexts, instance.n_users, instance.n_actions,
                                   config.slate_size, n_ranked)
    data = learners_lib.ChoiceData.empty(0, config.slate_size, n_ranked)._replace(
        mask=jnp.zeros((rows,), jnp.float32))
  else:
    data = learners_lib.ChoiceData.empty(buffer_capacity(config), config.slate_size, n_ranked)
  n_factors = 0 if learner.score_keys is None else learner.score_keys.shape[-1]
  if uses_certified_regret(config, learner):
    cache = metrics.empty_certified_cells(instance.n_contexts, instance.n_users, n_factors,
                                          _user_vector_size(learner))
  else:
    cache = metrics.empty_regret_cache(instance.n_contexts, instance.n_users, instance.n_actions,
                                       regret_candidates(config, instance.n_actions), n_factors)
  solver = learner.init_carry() if carries_hessian(config, learner) else ()
  return SimState(learner.init(), data, jnp.zeros((), jnp.int32), cache, solver)


class _Pending(NamedTuple):
  """One seed's round between its refit's first phase and the rest (see
  :func:`_round_functions`): what the round has drawn, scored and recorded so far."""

  data: learners_lib.ChoiceData  # the state's data with the round's observation
  cache: metrics.RegretCache
  fit: object  # learners.CarriedFit (phased carried refit) or learners.ERMResult
  solver: object  # the carry after the refit (unphased carried refit), else ()
  fit_data: learners_lib.ChoiceData  # what the refit fits (``data`` or the table)
  n_rows: jax.Array  # () int32 rows the refit's blocked sums visit
  regret: jax.Array
  realised: jax.Array
  kl_regret: jax.Array
  context: jax.Array
  user: jax.Array
  rescored: jax.Array


class _RoundFunctions(NamedTuple):
  """One seed's round in two pieces around its refit's Newton fallback: the round is
  ``finish(state, pending)`` with ``pending = begin(state)`` and, when
  ``phased``, ``pending.fit`` passed through :func:`_refit_fallback` (which a
  batch runs only for the lanes that need it)."""

  begin: object  # (state) -> _Pending
  finish: object  # (state, _Pending) -> (state, RoundRecord)
  phased: bool  # the refit is a learners.CarriedPhases refit


def _erm_blocks(config: SimulationConfig, learner: learners_lib.Learner, n_rows) -> dict:
  """The refit's ``block_size=``/``n_rows=`` arguments (empty when it visits the whole data)."""
  if learner.fits_in_blocks and uses_erm_blocks(config):  # (only in the buffer layout)
    return dict(block_size=config.erm_block_size, n_rows=n_rows)
  return {}


def _refit_fallback(config: SimulationConfig, learner: learners_lib.Learner, fit, fit_data,
                    ridge, n_rows):
  """A phased carried refit's Newton fallback (``learner.carried_phases.fallback``)."""
  return learner.carried_phases.fallback(fit, fit_data, ridge,
                                         **_erm_blocks(config, learner, n_rows))


def _regret_tables(config: SimulationConfig, instance: Instance, learner: learners_lib.Learner,
                   action_labels: Optional[jax.Array] = None):
  """``(truth, subset, certified)`` of one instance, built once per chunk outside the rounds.

  The truth tables hold R* action-major too, so that the regret pass carries
  each cell's value instead of gathering it afterwards; ``subset`` gathers the
  keys and R* of ``action_labels`` (C, V) (:func:`action_labels`), or is None
  (the pass then visits every action; the regret is the same). ``certified``
  holds the certified pass's constants (:func:`metrics.certified_tables`)
  when this configuration uses it, else None.
  """
  truth = metrics.truth_tables(true_scores(instance), cell_weights(instance),
                               instance.reference_policy, action_major=True)
  subset = certified = None
  if action_labels is not None and learner.score_keys is not None:
    subset = metrics.action_subset(truth, learner.score_keys, action_labels)
  if uses_certified_regret(config, learner):
    visited = subset if subset is not None else metrics.action_subset(
        truth, learner.score_keys, metrics.supported_labels(truth.support))
    certified = metrics.certified_tables(truth, learner.score_keys, visited,
                                         learner.query_scale)
  return truth, subset, certified


def _round_functions(config: SimulationConfig, instance: Instance, params: SimulationParams,
                     key: jax.Array, learner: learners_lib.Learner, tables) -> _RoundFunctions:
  """The pieces of one round for one seed (see :func:`run_rounds`); ``tables`` is
  ``instance``'s :func:`_regret_tables`, computed once by the caller."""
  choice_model, _, policy = _components(config, instance)
  truth, subset, certified = tables
  log_context = jnp.log(instance.context_weights)
  log_user = jnp.log(instance.user_weights)
  policy_params = policies_lib.PolicyParams(params.beta, params.mixture_weight)
  n_ranked = choice_model.outcome_size(config.slate_size)
  carried = carries_hessian(config, learner)
  phases = learner.carried_phases if refits_in_phases(config, learner) else None
  # A constant of the keys, computed once here rather than in every round.
  key_norms = None if learner.score_keys is None else metrics.key_norms(learner.score_keys)
  table = None
  if config.data_layout == "table":
    table = learners_lib.empty_table(instance.n_contexts, instance.n_users, instance.n_actions,
                                     config.slate_size, n_ranked)

  blocks = functools.partial(_erm_blocks, config, learner)

  def begin(state: SimState) -> _Pending:
    key_t = jax.random.fold_in(key, state.round)
    key_context, key_user, key_slate, key_choice = jax.random.split(key_t, 4)
    context = jax.random.categorical(key_context, log_context).astype(jnp.int32)
    user = jax.random.categorical(key_user, log_user).astype(jnp.int32)

    # The KL regret needs every score anyway: then G is read off that same estimate.
    estimate = learner.scores(state.params) if config.record_kl else None
    factored = learner.score_queries is not None and learner.score_keys is not None
    cache = state.regret_cache
    if certified is not None:
      vectors = None if learner.user_vectors is None else learner.user_vectors(state.params)
      cache, value, rescored, _ = metrics.certified_cell_values(
          truth, certified, cache, learner.score_queries(state.params), vectors)
      per_cell = truth.best - value
    elif factored and resolve_regret_evaluation(config) == "incremental" and not config.record_kl:
      cache, per_cell, rescored = metrics.update_regret_cache(
          truth, cache, state.params, learner.score_queries, learner.score_keys,
          config.rescore_budget, key_norms)
    else:
      rescored = jnp.asarray(truth.weights.size, jnp.int32)
      if estimate is None and factored:
        per_cell = metrics.factor_cell_regret(truth, learner.score_queries(state.params),
                                              learner.score_keys, subset)
      else:
        if estimate is None:
          estimate = learner.scores(state.params)
        per_cell = metrics.cell_regret(truth, estimate)  # (C, U)
    regret = jnp.sum(truth.weights * per_cell)
    realised = per_cell[context, user]
    if config.record_kl:
      kl_regret = metrics.kl_regularized_regret(truth, estimate, params.beta)
    else:
      kl_regret = jnp.zeros((), regret.dtype)
    cell_estimate = learner.cell_scores(state.params, context, user)  # (A,)

    slate = policy(key_slate, cell_estimate, truth.log_reference[context],
                   policy_params)
    outcome = choice_model.sample(key_choice, truth.scores[context, user, slate])
    if table is not None:
      row = learners_lib.table_row(context, user, slate, outcome, instance.n_users,
                                   instance.n_actions, config.slate_size, n_ranked)
      counts = state.data.mask.at[row].add(1.0)
      data = state.data._replace(mask=counts)
      fit_data = table._replace(mask=counts)
    else:
      data = fit_data = state.data.write(state.round, context, user, slate, outcome)
    n_rows = state.round + 1
    solver = state.solver
    observation = (context, user, slate, outcome)
    if phases is not None:
      fit = phases.start(state.params, solver, fit_data, observation, params.ridge,
                         **blocks(n_rows))
    elif carried:
      fit, solver = learner.fit_carried(state.params, solver, fit_data, observation,
                                        params.ridge, **blocks(n_rows))
    else:
      fit = learner.fit(state.params, fit_data, params.ridge, **blocks(n_rows))
    return _Pending(data, cache, fit, solver, fit_data, n_rows, regret, realised, kl_regret,
                    context, user, rescored)

  def finish(state: SimState, pending: _Pending):
    if phases is not None:
      fit, solver = phases.result(pending.fit)
    else:
      fit, solver = pending.fit, pending.solver
    record = RoundRecord(pending.regret, pending.realised, pending.kl_regret, fit.iterations,
                         fit.grad_norm, fit.converged, pending.context, pending.user,
                         pending.rescored)
    return SimState(fit.params, pending.data, state.round + 1, pending.cache, solver), record

  return _RoundFunctions(begin, finish, phases is not None)


def run_rounds(config: SimulationConfig, instance: Instance, params: SimulationParams,
               key: jax.Array, state: SimState, n_rounds: int,
               learner: Optional[learners_lib.Learner] = None,
               action_labels: Optional[jax.Array] = None):
  """Advances one seed by ``n_rounds`` rounds (static) with a ``lax.scan``.

  Args:
    config: static configuration.
    instance: one (unbatched) :class:`Instance`.
    params: traced :class:`SimulationParams`.
    key: this seed's key.
    state: the seed's :class:`SimState`.
    n_rounds: rounds to run (static).
    learner: optional :class:`learners.Learner` replacing the configured
      model class (for custom learners and tests).
    action_labels: optional (C, V) int32, the actions the regret pass visits
      (:func:`action_labels` for this instance); every action without it.

  Returns:
    ``(state, records)`` with records a :class:`RoundRecord` of (n_rounds,) arrays.
  """
  learner = _components(config, instance)[1] if learner is None else learner
  return _scan_rounds(config, instance, params, key, state, n_rounds, learner,
                      _regret_tables(config, instance, learner, action_labels))


def _scan_rounds(config, instance, params, key, state, n_rounds, learner, tables):
  """:func:`run_rounds` with the instance's :func:`_regret_tables` given."""
  round_functions = _round_functions(config, instance, params, key, learner, tables)

  def one_round(state: SimState, _):
    pending = round_functions.begin(state)
    if round_functions.phased:
      pending = pending._replace(fit=_refit_fallback(
          config, learner, pending.fit, pending.fit_data, params.ridge, pending.n_rows))
    return round_functions.finish(state, pending)

  return jax.lax.scan(one_round, state, None, length=n_rounds)


# Under 'vmap', at most this fraction of the lanes (rounded up) runs the carried
# refit's Newton fallback at once; more lanes needing it take more groups.
FALLBACK_GROUP_FRACTION = 1 / 16


def fallback_group_size(n_lanes: int) -> int:
  """Lanes per group of the batched Newton fallback (see :func:`_vmapped_rounds`)."""
  return max(1, math.ceil(n_lanes * FALLBACK_GROUP_FRACTION))


def _vmapped_rounds(config: SimulationConfig, n_rounds: int):
  """``(instances (P, ...), params (P,), keys (S,), states (P, S, ...), labels (P, C, V)
  or None) -> (states, records (P, S, n_rounds))``: a ``lax.scan`` over rounds of
  one batched round.

  The round runs vmapped over every lane (population x seed), except the
  carried refit's Newton fallback (Hessian, Cholesky, a fresh inverse), which
  about 2% of refits need. A vmapped ``while_loop`` runs until its slowest lane
  stops, so vmapping the fallback too would make every lane pay for it in
  almost every round once there are a hundred lanes. Instead the lanes that
  need it are gathered, ``fallback_group_size(P * S)`` at a time, and only
  those run it. Each lane's arithmetic is the same as in :func:`run_rounds`.
  """

  def run(instances, params, keys, states, labels=None):
    n_populations, n_seeds = states.round.shape[:2]
    n_lanes = n_populations * n_seeds
    learner_of = lambda instance: _components(config, instance)[1]
    # Once per population (not per lane and round): truth tables and the pass's actions.
    tables = jax.vmap(lambda inst, lab: _regret_tables(config, inst, learner_of(inst), lab))(
        instances, labels)

    def functions(instance, lane_tables, lane_params, key):
      return _round_functions(config, instance, lane_params, key, learner_of(instance),
                              lane_tables)

    over_lanes = lambda fn: jax.vmap(jax.vmap(fn, in_axes=(None, None, None, 0, 0, 0)),
                                     in_axes=(0, 0, 0, None, 0, 0))
    begin = over_lanes(lambda i, t, p, k, s, _: functions(i, t, p, k).begin(s))
    finish = over_lanes(lambda i, t, p, k, s, pending: functions(i, t, p, k).finish(s, pending))
    # A question of the config, asked of the first population's learner at trace time.
    phased = refits_in_phases(config, learner_of(
        jax.tree_util.tree_map(lambda x: x[0], instances)))
    group = fallback_group_size(n_lanes)
    population = jnp.repeat(jnp.arange(n_populations), n_seeds)
    flat = lambda x: x.reshape((n_lanes,) + x.shape[2:])

    def fallback_one(instance, ridge, fit, fit_data, n_rows):
      return _refit_fallback(config, learner_of(instance), fit, fit_data, ridge, n_rows)

    def fallback_where_needed(pending: _Pending):
      fits, fit_data, n_rows = (jax.tree_util.tree_map(flat, x) for x in
                                (pending.fit, pending.fit_data, pending.n_rows))

      def one_group(carry):
        fits, waiting = carry
        lanes = jnp.nonzero(waiting, size=group, fill_value=n_lanes)[0]
        real = lanes < n_lanes
        safe = jnp.where(real, lanes, 0)
        take = lambda tree, rows: jax.tree_util.tree_map(lambda x: x[rows], tree)
        owner = population[safe]
        part = take(fits, safe)._replace(needs_newton=fits.needs_newton[safe] & real)
        done = jax.vmap(fallback_one)(take(instances, owner), params.ridge[owner], part,
                                      take(fit_data, safe), n_rows[safe])
        fits = jax.tree_util.tree_map(lambda x, y: x.at[lanes].set(y, mode="drop"), fits, done)
        return fits, waiting.at[lanes].set(False, mode="drop")

      fits, _ = jax.lax.while_loop(lambda carry: jnp.any(carry[1]), one_group,
                                   (fits, fits.needs_newton))
      return pending._replace(fit=jax.tree_util.tree_map(
          lambda x: x.reshape((n_populations, n_seeds) + x.shape[1:]), fits))

    def one_round(states, _):
      pending = begin(instances, tables, params, keys, states, states.round)
      if phased:
        pending = fallback_where_needed(pending)
      return finish(instances, tables, params, keys, states, pending)

    states, records = jax.lax.scan(one_round, states, None, length=n_rounds)
    return states, jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, -1), records)

  return run


# ---------------------------------------------------------------------------
# Batched kernel and host driver
# ---------------------------------------------------------------------------


def resolve_batching(config: SimulationConfig) -> str:
  """'map' or 'vmap' for this configuration on the default backend."""
  if config.seed_batching != "auto":
    return config.seed_batching
  return "map" if jax.default_backend() == "cpu" else "vmap"


def resolve_regret_evaluation(config: SimulationConfig) -> str:
  """'certified', 'incremental' or 'full' for this configuration on the default backend.

  'auto' is 'certified' on the CPU when the native kernel is available
  (:mod:`jaxbandit.native`) and the KL regret is not recorded, else 'full'.
  An explicit 'certified' that cannot run is an error (raised here, before
  anything compiles).
  """
  if config.regret_evaluation == "auto":
    if config.record_kl or jax.default_backend() != "cpu" or not native.available():
      return "full"
    return "certified"
  if config.regret_evaluation == "certified":
    if config.record_kl:
      raise ValueError("regret_evaluation='certified' cannot be combined with record_kl=True "
                       "(the KL regret scores every cell anyway); use 'auto' or 'full'")
    _require_native_cpu("regret_evaluation='certified'", "'auto' or 'full'")
  return config.regret_evaluation


def _require_native_cpu(setting: str, instead: str) -> None:
  """Raises ValueError unless the default backend is the CPU and the native kernels are
  available; the message names ``setting``, why, and the settings to use ``instead``."""
  if jax.default_backend() != "cpu":
    raise ValueError(f"{setting} runs on the CPU only (the default backend is "
                     f"{jax.default_backend()!r}); use {instead}")
  status = native.status()
  if not status.available:
    raise ValueError(f"{setting} needs the native CPU kernels, which are not available: "
                     f"{status.reason}; use {instead}")


# The model classes whose features are outer products x (outer) a, which the
# native gradient handles (learners.native_gradient_applies), and the most
# factors per context its Bradley-Terry vector path takes (csrc/user_gradient.cc).
NATIVE_GRADIENT_CLASSES = ("known_heads", "pooled", "per_user_bilinear")
NATIVE_GRADIENT_VECTOR_FACTORS = 8


def resolve_erm_gradient(config: SimulationConfig, n_factors: Optional[int] = None) -> str:
  """'native' or 'xla' for this configuration on the default backend.

  'auto' is 'native' where the native kernel's vector path applies and was
  measured faster than XLA's: on the CPU, for the outer-product model classes
  (``NATIVE_GRADIENT_CLASSES``), Bradley-Terry feedback and at most 8 factors
  per context (``n_factors``, the instance's ``dim``; None: not checked),
  when the native kernels are available (:mod:`jaxbandit.native`); else 'xla'.
  An explicit 'native' also runs the kernel's float64 loop for the other
  choice models and sizes (measured slower than XLA for multinomial logit,
  faster for full Plackett-Luce rankings). An explicit 'native' that cannot
  run is an error (raised here, before anything compiles).
  """
  applies = config.model_class in NATIVE_GRADIENT_CLASSES and config.slate_size <= 16
  if config.erm_gradient == "auto":
    fast = (config.choice_model == "bradley_terry" and
            (n_factors is None or n_factors <= NATIVE_GRADIENT_VECTOR_FACTORS))
    if not (applies and fast) or jax.default_backend() != "cpu" or not native.available():
      return "xla"
    return "native"
  if config.erm_gradient == "native":
    if not applies:
      raise ValueError(f"erm_gradient='native' is not allowed for model_class="
                       f"{config.model_class!r} with slate_size={config.slate_size}; allowed: "
                       f"model_class in {NATIVE_GRADIENT_CLASSES} with slate_size <= 16, or "
                       f"erm_gradient 'auto' or 'xla'")
    _require_native_cpu("erm_gradient='native'", "'auto' or 'xla'")
  return config.erm_gradient


def _user_vector_size(learner: learners_lib.Learner) -> int:
  """q of the learner's user vectors (U, q), or 1 when it has none (the certified
  pass then measures every cell's distance)."""
  if learner.user_vectors is None:
    return 1
  return int(jax.eval_shape(learner.user_vectors, jax.eval_shape(learner.init)).shape[-1])


def uses_certified_regret(config: SimulationConfig, learner: learners_lib.Learner) -> bool:
  """Whether the kernel keeps the regret with the certified pass (:func:`metrics.certified_cell_values`):
  ``resolve_regret_evaluation`` says 'certified' and the learner scores through factors."""
  return (resolve_regret_evaluation(config) == "certified" and
          learner.score_queries is not None and learner.score_keys is not None)


def _map_in_place(fn, states):
  """``fn(i, states[i]) -> (state, records)`` for each i in turn, updating ``states`` in place.

  Like ``lax.map`` over the leading axis, but the states are the scan's carry,
  written back row by row (``dynamic_update_index_in_dim``), so XLA updates
  the donated buffers in place instead of stacking a second copy of every
  seed's state (data buffer, regret cache, carried inverse Hessian) as the
  loop's output. The records are the scan's stacked outputs.
  """
  n = jax.tree_util.tree_leaves(states)[0].shape[0]

  def body(states, i):
    state, record = fn(i, jax.tree_util.tree_map(lambda x: x[i], states))
    put = lambda stacked, value: jax.lax.dynamic_update_index_in_dim(stacked, value, i, 0)
    return jax.tree_util.tree_map(put, states, state), record

  return jax.lax.scan(body, states, jnp.arange(n))


@functools.lru_cache(maxsize=32)
def make_chunk_kernel(config: SimulationConfig, n_rounds: int, n_devices: int = 1):
  """``jit(vmap_populations(vmap_seeds(run_rounds)))`` for chunks of ``n_rounds``.

  The returned function maps ``(instances, params, keys, states, labels=None)``
  with instances stacked on a leading population axis (P, ...) (a "population"
  lane may be a population size or a sweep grid point), params whose leaves
  are scalars (shared) or (P,) arrays (one value per lane), keys (S,) shared
  by every lane, states (P, S, ...) and the regret pass's actions ``labels``
  (P, C, V) of :func:`action_labels` (None: every action) to ``(states,
  records)`` with records (P, S, n_rounds). ``states`` is donated. The labels
  change no cell's regret, only the time (the population sum over cells may
  move in its last bit): pass ``action_labels(config, instances)``.

  With ``n_devices > 1`` the seed axis is split over the first ``n_devices``
  local devices with ``jax.shard_map`` (each device runs its seeds; nothing
  is communicated); ``S`` must then be a multiple of ``n_devices``.

  Kernels are cached per ``(config, n_rounds, n_devices)``: repeated :func:`simulate`
  calls that change only traced values (instance arrays, params, seeds of the
  same shapes) reuse one compiled kernel instead of recompiling.
  """

  if resolve_batching(config) == "vmap":
    over_populations = _vmapped_rounds(config, n_rounds)
  else:  # "map": one after another, each loop and branch doing only its own work

    def over_seeds(instance, params, keys, states, labels):
      learner = _components(config, instance)[1]
      tables = _regret_tables(config, instance, learner, labels)  # once per population, not per seed
      return _map_in_place(lambda i, state: _scan_rounds(
          config, instance, params, keys[i], state, n_rounds, learner, tables), states)

    def over_populations(instances, params, keys, states, labels=None):
      pick = lambda tree, i: jax.tree_util.tree_map(lambda x: x[i], tree)
      return _map_in_place(
          lambda i, state: over_seeds(pick(instances, i), pick(params, i), keys, state,
                                      pick(labels, i)), states)
  if n_devices > 1:
    from jax.sharding import PartitionSpec

    mesh = seed_mesh(n_devices)
    over_populations = jax.shard_map(
        over_populations, mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec("seeds"),
                  PartitionSpec(None, "seeds"), PartitionSpec()),
        out_specs=(PartitionSpec(None, "seeds"), PartitionSpec(None, "seeds")),
        check_vma=False)  # per-seed loops start from constants; nothing is communicated
  @full_precision  # float32 products at full precision on every backend (precision.py)
  def lanes(instances, params, keys, states, labels=None):
    n_lanes = instances.contexts.shape[0]
    params = jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (n_lanes,)), params)
    return over_populations(instances, params, keys, states, labels)

  return jax.jit(lanes, donate_argnums=(3,))


def action_labels(config: SimulationConfig, instances: Instance) -> Optional[np.ndarray]:
  """(P, C, V) int32: per population and context, the actions the regret pass visits.

  The actions some query could make greedy (:func:`metrics.extreme_actions`,
  Qhull on the host), for every kernel of ``config`` that scores every cell
  through the learner's factors; None where there is nothing to leave out
  (other regret paths, keys of more than ``metrics.EXTREME_MAX_FACTORS``
  factors, or hulls whose vertices are nearly every action). ``V`` is the
  longest context's count over every population, rounded up to a multiple of
  8. Populations with the same keys and support share one computation.
  """
  if config.record_kl or resolve_regret_evaluation(config) not in ("full", "certified"):
    return None
  stacked = instances.contexts.ndim == 3
  n_populations = instances.contexts.shape[0] if stacked else 1
  n_actions = instances.actions.shape[-2]
  on_host = jax.tree_util.tree_map(np.asarray, instances)  # one copy, not one per population
  kept, seen = [], {}
  for population in range(n_populations):
    instance = (jax.tree_util.tree_map(lambda x: x[population], on_host)
                if stacked else on_host)
    learner = _components(config, instance)[1]
    if learner.score_keys is None or learner.score_queries is None:
      return None
    keys = np.asarray(learner.score_keys, np.float32)
    support = np.asarray(instance.reference_policy) > 0
    fingerprint = (keys.tobytes(), support.tobytes())
    if fingerprint not in seen:
      seen[fingerprint] = metrics.extreme_actions(keys, support)
    kept.append(seen[fingerprint])
  width = metrics.label_width([row for rows in kept for row in rows])
  tables = [metrics.subset_labels(rows, n_actions, width) for rows in kept]
  if any(table is None for table in tables):
    return None
  return np.stack(tables)


def one_blas_thread():
  """A context in which BLAS/LAPACK libraries (SciPy's OpenBLAS among them) use one thread.

  On the CPU, jaxlib runs ``jnp.linalg`` (the refit's Cholesky factors and
  inverses) through SciPy's OpenBLAS. OpenBLAS keeps a thread per core and its
  idle threads spin for a while after each call; a kernel that calls it every
  few rounds keeps them spinning, competing with XLA for the cores. With one
  thread none spin (the paper-users figure on 2 cores: 46-53 against 68-72 s).
  The previous limits return on exit (``threadpoolctl``).
  """
  return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def seed_mesh(n_devices: int):
  """The one-axis ``("seeds",)`` mesh of the first ``n_devices`` local devices."""
  from jax.sharding import Mesh

  return Mesh(np.asarray(jax.local_devices()[:n_devices]), ("seeds",))


def place_on_devices(n_devices: int, instances, params, keys, states):
  """``(instances, params, keys, states)`` laid out as ``make_chunk_kernel(...,
  n_devices)`` splits them: instances and params on every device, keys (S,) and
  states (P, S, ...) split along the seeds. A compiled kernel then runs
  without moving its inputs first."""
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = seed_mesh(n_devices)
  instances, params = replicate_on_devices(n_devices, (instances, params))
  return (instances, params,
          jax.device_put(keys, NamedSharding(mesh, PartitionSpec("seeds"))),
          jax.device_put(states, NamedSharding(mesh, PartitionSpec(None, "seeds"))))


def replicate_on_devices(n_devices: int, tree):
  """``tree`` (e.g. :func:`action_labels`) on every one of the first ``n_devices``."""
  from jax.sharding import NamedSharding, PartitionSpec

  return jax.device_put(tree, NamedSharding(seed_mesh(n_devices), PartitionSpec()))


def init_states(config: SimulationConfig, instances: Instance, n_seeds: int) -> SimState:
  """Initial states (P, S, ...) for stacked instances."""
  one = jax.vmap(lambda inst: init_state(config, inst))(instances)
  return jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], n_seeds) + x.shape[1:]), one)


def estimate_memory_bytes(config: SimulationConfig, n_populations: int, n_users: int,
                          n_contexts: int, n_actions: int, n_params: int, n_seeds: int,
                          chunk_size: int, n_solver: int = 0, n_factors: int = 0) -> dict:
  """Rough peak-memory estimate of a run, by component (bytes).

  State per seed: the data buffer (horizon rows of context, user, slate,
  outcome, mask), the regret pass's state (K candidates, a radius and a
  float16 anchor query of ``n_factors`` numbers per cell; with 'certified',
  a radius, a value, an allowance and a float32 anchor, and the last user
  vectors, at most ``n_factors**2`` numbers per user), the estimate and
  ``n_solver`` numbers of carried solver state (the inverse Hessian);
  records: 9 numbers per seed-round kept on the host for the whole horizon,
  plus one chunk of them on the device; truth tables per population.
  """
  n_ranked = config.slate_size if (config.choice_model == "plackett_luce" and
                                   config.top_m is None) else (config.top_m or 1)
  row = 4 * (2 + config.slate_size + n_ranked) + 1
  certified = resolve_regret_evaluation(config) == "certified"
  if certified:  # radius, value, allowance and a float32 anchor query per cell, user vectors
    cache = n_contexts * n_users * (12 + 4 * n_factors) + 4 * n_users * n_factors**2
  else:
    candidate_bytes = jnp.dtype(metrics.candidate_dtype(n_actions)).itemsize
    anchor_bytes = jnp.dtype(metrics.ANCHOR_DTYPE).itemsize
    cache = n_contexts * n_users * (4 + candidate_bytes * regret_candidates(config, n_actions) +
                                    anchor_bytes * n_factors)
  per_seed = (config.horizon * row + cache + 8 * n_params +
              4 * n_solver)
  lanes = n_populations * n_seeds
  # 'map' updates the donated states in place; under 'vmap' XLA may hold an
  # input and an output copy.
  copies = 1 if resolve_batching(config) == "map" else 2
  estimate = {
      "state": lanes * per_seed * copies,
      # the whole-horizon host buffer, plus a chunk in transit when chunked
      "records_host": lanes * (config.horizon + chunk_size * (chunk_size < config.horizon)) * 36,
      "records_device": lanes * chunk_size * 9 * 4,
      # R*, R* action-major, the R* of the actions the regret pass visits (at
      # most all of them) and the per-cell tables; the certified pass's
      # inverse key gaps between the visited actions (C, V, V)
      "truth": n_populations * 4 * (n_contexts * n_users * (3 * n_actions + 4) +
                                    certified * n_contexts * n_actions * n_actions),
  }
  if resolve_batching(config) == "vmap":
    # vmapped temporaries per lane: the regret pass's (C, U) planes (queries,
    # running maximum, index and value), about ten copies of the carried
    # solver state (the while loops' carries and selects, the BFGS update, the
    # batched Newton fallback) and the ERM's per-row temporaries over the rows
    # one sum visits at a time. Calibrated on XLA's temp allocation (which
    # also holds the truth tables the kernel builds, counted above) at U = 100
    # (the solver state is 246 KiB a lane): 1.3-1.4 MiB a lane on the CPU
    # (16-1,024 lanes, horizons 2,000 and 10,000) and 2.4 MiB on an H200 (256
    # lanes, horizon 2,000); this counts 2.8 MiB.
    rows = config.erm_block_size if uses_erm_blocks(config) else config.horizon
    estimate["vmap_temporaries"] = lanes * 4 * (8 * n_contexts * n_users + 10 * n_solver +
                                                64 * rows)
  estimate["total"] = sum(estimate.values())
  return estimate


def available_memory_bytes() -> Optional[int]:
  """MemAvailable from /proc/meminfo (None where unknown)."""
  try:
    with open("/proc/meminfo") as handle:
      for line in handle:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def device_memory_bytes(device) -> Optional[int]:
  """Free memory of an accelerator, ``bytes_limit - bytes_in_use`` of its allocator
  (None where the backend keeps no statistics, as on a CPU)."""
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def device_share_bytes(estimate: dict, n_devices: int) -> int:
  """What one of ``n_devices`` devices (over every process) holds of an estimate:
  everything but the host's record buffer, the seeds' part split over the devices
  and the truth replicated."""
  on_devices = estimate["total"] - estimate["records_host"] - estimate["truth"]
  return int(-(-on_devices // n_devices) + estimate["truth"])


def check_memory(config: SimulationConfig, instances: Instance, n_seeds: int, chunk_size: int,
                 n_params: int, n_solver: int = 0, n_factors: int = 0,
                 devices: Sequence = (), n_processes: int = 1) -> dict:
  """Refuses, before compiling, a run whose estimated memory exceeds what is available:
  the whole estimate against the host's available memory and, on accelerators that
  report their allocator's statistics (``devices``, the ones the seeds are split
  over in each of ``n_processes`` processes), each device's share against its free
  memory."""
  n_populations = instances.contexts.shape[0]
  n_contexts, n_users = instances.contexts.shape[-2], instances.heads.shape[-2]
  estimate = estimate_memory_bytes(config, n_populations, n_users, n_contexts,
                                   instances.actions.shape[-2], n_params, n_seeds, chunk_size,
                                   n_solver, n_factors)
  breakdown = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate.items() if k != "total")

  def refuse(needed, available, where, seeds_fitting):
    raise ValueError(
        f"n_seeds={n_seeds} x horizon={config.horizon} needs about {needed / 2**30:.1f} GiB "
        f"{where} (of {estimate['total'] / 2**30:.1f} GiB in all: {breakdown} GiB) but "
        f"{available / 2**30:.1f} GiB is available there; allowed: at most about "
        f"{max(seeds_fitting, 0)} seeds per run at this horizon (run the rest with "
        f"first_seed), or a shorter horizon")

  available = available_memory_bytes()
  if available is not None and estimate["total"] > 0.8 * available:
    per_seed = estimate["total"] / max(n_seeds, 1)
    refuse(estimate["total"], available, "on the host", int(0.8 * available // max(per_seed, 1)))
  n_devices = len(devices) * n_processes
  share = device_share_bytes(estimate, n_devices) if devices else 0
  for device in devices:
    free = device_memory_bytes(device)
    if free is not None and share > 0.8 * free:
      per_seed = (share - estimate["truth"]) * n_devices / max(n_seeds, 1)
      refuse(share, free, f"on each of {n_devices} device(s), here {device}",
             int(max(0.8 * free - estimate["truth"], 0) * n_devices // max(per_seed, 1)))
  return estimate


class SimulationResult(NamedTuple):
  """Host copies of every per-round record, each (n_populations, n_seeds, rounds_done).

  Attributes:
    records: :class:`RoundRecord` of NumPy arrays.
    final_state: the last :class:`SimState` (device arrays).
    seed_ids: (n_seeds,) the seed ids used.
    rounds_done: rounds completed (the horizon unless stopped early).
  """

  records: RoundRecord
  final_state: SimState
  seed_ids: np.ndarray
  rounds_done: int

  def cumulative_regret(self) -> np.ndarray:
    """Cumulative temperature-zero regret in float64, (P, S, rounds_done)."""
    return np.cumsum(self.records.regret.astype(np.float64), axis=-1)


def _preallocate_records(chunk: RoundRecord, horizon: int,
                         resume_from: Optional["Progress"]) -> RoundRecord:
  """Host arrays (..., horizon) shaped and typed like ``chunk``, holding the
  records of ``resume_from`` (if any) in their first rounds."""
  history = RoundRecord(*(np.empty(np.shape(x)[:-1] + (horizon,), np.asarray(x).dtype)
                          for x in chunk))
  if resume_from is not None:
    done = int(resume_from.rounds_done)
    for field, values in zip(history, resume_from.records):
      saved = min(np.shape(values)[1], field.shape[1])  # seeds saved (padding may differ)
      field[:, :saved, :done] = np.asarray(values)[:, :saved]
  return history


def _resumed_states(config: SimulationConfig, instances: Instance, saved: SimState,
                    lanes: int) -> SimState:
  """Saved states (P, S_saved, ...) on ``lanes`` seed lanes.

  A checkpoint holds the real seeds (and any padding of the device count it
  was written under); padding lanes for this process's device count are
  fresh states: their seed ids are beyond the run's and their records are
  dropped, so they change no result.
  """
  saved = jax.tree_util.tree_map(jnp.asarray, saved)
  n_saved = jax.tree_util.tree_leaves(saved)[0].shape[1]
  if n_saved >= lanes:
    return jax.tree_util.tree_map(lambda x: x[:, :lanes], saved)
  extra = init_states(config, instances, lanes - n_saved)
  return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], axis=1), saved, extra)


def _first_rounds(records: RoundRecord, rounds: int) -> RoundRecord:
  """Views of the first ``rounds`` rounds of host records (no copy)."""
  return RoundRecord(*(x[..., :rounds] for x in records))


class Progress(NamedTuple):
  """What :func:`simulate` hands its callback after every chunk.

  Attributes:
    rounds_done: rounds completed so far.
    horizon: total rounds.
    states: the current :class:`SimState` (P, S, ...), device arrays.
    records: :class:`RoundRecord` of NumPy arrays (P, S, rounds_done), the
      records so far (views into the run's host buffer: copy them to keep them
      past the callback).
  """

  rounds_done: int
  horizon: int
  states: SimState
  records: RoundRecord


def simulate(instances: Instance, config: SimulationConfig,
             params: Optional[SimulationParams] = None, *, n_seeds: int = 1,
             master_seed: int = 0, first_seed: int = 0, chunk_size: Optional[int] = None,
             callback=None, resume_from: Optional[Progress] = None,
             n_devices: Optional[int] = None) -> SimulationResult:
  """Runs the greedy exact-ERM loop for every population and seed.

  Args:
    instances: an :class:`Instance`, or instances stacked with
      :func:`instance.stack_instances` (leading population axis).
    config: the static :class:`SimulationConfig`.
    params: traced :class:`SimulationParams` (defaults of ``SimulationParams.make``).
    n_seeds: Monte Carlo seeds per population.
    master_seed: base of every seed key.
    first_seed: seed ids are ``first_seed, ..., first_seed + n_seeds - 1``; a
      seed's trajectory depends only on ``(master_seed, seed id)``.
    chunk_size: rounds per compiled call (default: the whole horizon).
    callback: optional ``callback(progress: Progress) -> bool`` called between
      chunks (progress display, checkpoints); returning True stops the run
      after that chunk.
    resume_from: a :class:`Progress` saved earlier; the run continues from it
      and gives the same records as an uninterrupted run.
    n_devices: local devices to split the seeds over (default: all of them).
      The seed count is padded up to a multiple with extra seed ids whose
      results are dropped, so every seed's draws stay those of a one-device run.
      Under ``jax.distributed`` (several processes), each process runs a
      contiguous share of the seed ids on its own devices and the records are
      gathered so that every process returns all of them.

  Returns:
    A :class:`SimulationResult`.
  """
  # Every check runs on the host before the first JAX operation.
  n_actions = instances.actions.shape[-2]
  min_support = int(np.min(np.sum(np.asarray(instances.reference_policy) > 0, axis=-1)))
  config.validate(n_actions, min_support)
  V.instance_values(instances)
  V.positive_int("n_seeds", n_seeds)
  V.seed("master_seed", master_seed)
  V.seed("first_seed", first_seed, n_seeds, "n_seeds")
  if params is None:
    params = SimulationParams.make()
  else:  # params built directly bypass make()'s checks; (P,) arrays give one value per lane
    n_lanes = instances.contexts.shape[0] if instances.contexts.ndim == 3 else 1
    for values in zip(*(np.broadcast_to(np.asarray(v, np.float64), (n_lanes,))
                        if np.ndim(v) <= 1 and np.size(v) in (1, n_lanes) else
                        V.host_scalar(k, v) for k, v in params._asdict().items())):
      SimulationParams.make(*(float(v) for v in values))
  chunk_size = config.horizon if chunk_size is None else V.int_in_range(
      "chunk_size", chunk_size, 1, config.horizon, f"horizon={config.horizon}")
  n_local = V.int_in_range("n_devices", n_devices, 1, jax.local_device_count(),
                           f"local devices={jax.local_device_count()}") \
      if n_devices is not None else jax.local_device_count()
  # An explicit erm_gradient='native' that cannot run fails here, after the
  # arguments' own checks: the first call in a process may build the native
  # kernels (seconds), and a mistyped argument should not wait for that.
  resolve_erm_gradient(config, instances.contexts.shape[-1])
  if instances.contexts.ndim == 2:
    instances = jax.tree_util.tree_map(lambda x: x[None], instances)
  if config.data_layout == "table":
    n_ranked = choice_lib.get_choice_model(config.choice_model,
                                           config.top_m).outcome_size(config.slate_size)
    rows = learners_lib.table_size(instances.contexts.shape[-2], instances.heads.shape[-2],
                                   n_actions, config.slate_size, n_ranked)
    if rows > 2**20:
      raise ValueError(f"data_layout='table' needs {rows:,} rows (contexts x users x "
                       f"n_actions^slate_size x rankings); allowed: at most {2**20:,} "
                       f"(use data_layout='buffer' for instances this large)")
    if config.horizon >= 2**24:
      raise ValueError(f"horizon={config.horizon} is not allowed with data_layout='table'; "
                       f"allowed: horizon < 2^24 = {2**24} (float32 counts stay exact)")
  dim, latent_dim = instances.contexts.shape[-1], instances.maps.shape[-3]
  n_users = instances.heads.shape[-2]
  n_params = {"known_heads": latent_dim * dim * dim, "pooled": dim * dim,
              "known_directions": n_users * latent_dim,
              "per_user_bilinear": n_users * dim * dim}[config.model_class]
  per_user = config.model_class in ("known_directions", "per_user_bilinear")
  n_solver = 0
  if config.erm_hessian == "carried":
    # the inverse Hessian, plus the estimate and gradient the next refit starts from
    n_solver = (n_params * (n_params // n_users) if per_user else n_params**2) + 2 * n_params
  # the regret cache's anchor queries: d numbers for bilinear classes, J otherwise
  n_factors = latent_dim if config.model_class == "known_directions" else dim
  n_processes, process = jax.process_count(), jax.process_index()
  n_local = min(n_local, max(1, -(-n_seeds // n_processes)))
  check_memory(config, instances, n_seeds, chunk_size, n_params, n_solver, n_factors,
               devices=jax.local_devices()[:n_local], n_processes=n_processes)
  per_process = -(-n_seeds // n_processes)  # ceil
  per_process = -(-per_process // n_local) * n_local  # a multiple of the local devices
  seed_ids = np.arange(first_seed + process * per_process,
                       first_seed + (process + 1) * per_process, dtype=np.int64)
  keys = seed_keys(master_seed, seed_ids)
  lanes = len(seed_ids)
  done = 0 if resume_from is None else int(resume_from.rounds_done)
  states = (init_states(config, instances, lanes) if resume_from is None else
            _resumed_states(config, instances, resume_from.states, lanes))
  labels = action_labels(config, instances)  # the same numbers, a shorter regret pass
  if n_local > 1:
    # Inputs laid out as the kernel returns its states, so that every chunk calls
    # the kernel with the same shardings: unplaced first inputs compiled it twice
    # (once for them, once for the sharded states of the second chunk).
    instances, params, keys, states = place_on_devices(n_local, instances, params, keys,
                                                       states)
    labels = replicate_on_devices(n_local, labels)
  # Records of the whole horizon live in one preallocated host array per field,
  # each chunk copied into its slice: no list of chunks and no concatenation,
  # so the host holds the records once (plus one chunk in transit).
  history = None
  kernels = {}
  # jaxlib's CPU LAPACK calls (the refit's Cholesky factors) run on SciPy's
  # OpenBLAS, whose idle threads spin between calls: one thread, see one_blas_thread.
  with one_blas_thread():
    while done < config.horizon:
      n_rounds = min(chunk_size, config.horizon - done)
      if n_rounds not in kernels:
        # One device: the two-argument call, so callers share the cached kernel.
        kernels[n_rounds] = (make_chunk_kernel(config, n_rounds) if n_local == 1 else
                             make_chunk_kernel(config, n_rounds, n_local))
      # Without labels, the four-argument call: a None fifth argument would trace
      # the kernel once more for callers that pass four.
      states, chunk = kernels[n_rounds](instances, params, keys, states,
                                        *(() if labels is None else (labels,)))
      chunk = jax.device_get(chunk)
      if n_rounds == config.horizon:  # one whole-horizon chunk: its host copy is the history
        history = chunk
      else:
        if history is None:
          history = _preallocate_records(chunk, config.horizon, resume_from)
        for field, values in zip(history, chunk):
          field[..., done:done + n_rounds] = values
      del chunk
      done += n_rounds
      if callback is not None and callback(
          Progress(done, config.horizon, states, _first_rounds(history, done))):
        break
  if history is None and resume_from is not None:
    history = resume_from.records  # resumed at the horizon: nothing left to run
  records = None if history is None else _first_rounds(history, done)
  if n_processes > 1 and records is not None:
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(records, tiled=False)  # (procs, P, S_p, T)
    records = jax.tree_util.tree_map(
        lambda x: np.concatenate(list(np.asarray(x)), axis=1), gathered)
    seed_ids = np.arange(first_seed, first_seed + n_processes * per_process, dtype=np.int64)
  if records is not None and records.regret.shape[1] != n_seeds:
    records = jax.tree_util.tree_map(lambda x: x[:, :n_seeds], records)
  return SimulationResult(records, states, seed_ids[:n_seeds], done)
