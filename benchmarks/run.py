"""Speed, memory and floating-point throughput of the jaxbandit kernel.

Usage::

    python benchmarks/run.py --quick             # ~1-2 min: 100x100 instance, 10 users
    python benchmarks/run.py                     # ~5-10 min: paper-users size, 100 users
    python benchmarks/run.py --scaling           # time against horizon and seeds (PNG)
    python benchmarks/run.py --breakdown --horizon 5000   # one round's pieces, timed
    python benchmarks/run.py --memory            # 1024 seeds x 10000 rounds: analytic + XLA
    python benchmarks/run.py --figure            # the full paper-users figure, projected
    python benchmarks/run.py --repeatability     # same key, same result: reruns, batches
    python benchmarks/run.py --seeds 16 --horizon 1000 --users 50 --out results/bench

Every run prints ONE table and writes it as ``bench.csv`` / ``bench.json``
(``scaling.*`` and ``scaling.png`` with ``--scaling``, ``breakdown.*`` with
``--breakdown``, ``memory.*`` with ``--memory``, ``figure.*`` with
``--figure``) into ``--out`` (default ``results/bench``). Measured tables and
their reading: ``benchmarks/RESULTS.md``.

What a row measures (STYLE.md, "benchmarks"):

* compile seconds: ``make_chunk_kernel(config, horizon).lower(...).compile()``
  of the whole-horizon chunk kernel, measured apart from the run;
* run seconds: one call of the compiled kernel on fresh states, timed to
  ``block_until_ready`` (wall clock; the process CPU seconds are in the JSON);
* seed-rounds per second = seeds * horizon / run seconds;
* peak resident memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the
  process that ran the row. It is process-wide (the JAX runtime, compiled code,
  the instance and the host copies of the records count too), so each row runs
  in a fresh subprocess; ``base MiB`` is the same figure just before compiling
  and ``XLA temp MiB`` is XLA's own scratch estimate for the kernel
  (``compiled.memory_analysis()``);
* analytic MFLOP per seed-round (formula below), achieved GFLOP/s and the
  fraction of a float32 ``jnp.matmul`` peak (2048 x 2048, best of 5) measured
  in the same run;
* the row ``main, N devices`` (N = the available cores, when N > 1 and it
  divides the seeds) is the main row's kernel with the seeds split over one
  host device per core, as the ``jaxbandit`` console script runs it;
* the speedup over ``benchmarks/numpy_reference.py`` on the same instance at
  the same horizon. The reference is a loop over seeds whose seeds cost the
  same in expectation, so it runs on fewer seeds (``ref seeds``) and its time
  is scaled linearly to the row's seed count; the table says so.

Analytic floating-point operations (known-heads learner, Bradley-Terry):

    C contexts, A actions, U users, d features, q = d^2, m = J (latent dim),
    P = m q parameters, K = 2 slate size, n = data rows a gradient visits.

    regret (per round)  scores are <g, a> with the query g = W_i^T x (d numbers):
        queries Q = 2 C U d^2 + 2 U m q (user matrices, then every cell's g);
        'full':        Q + C U V 2d (every cell, the V actions per context
                       that can be greedy, simulate.action_labels; V = A
                       where nothing is left out);
        'certified':   Q + C U_w 3d (each cell of positive weight, U_w of
                       them per context: its move from its anchor)
                       + cells_scored * V (2d + 4) (a re-scored cell's
                       scores over the visited actions and its radius:
                       a difference, a product and a minimum per action),
                       cells_scored = the round's rescored_cells;
        'incremental': Q + C U 3d (the queries and each cell's move from
                       its anchor)
                       + C U K 2d (K = regret_candidates scores per cell)
                       + cells_scored * A 5d (a re-scored cell's scores and
                       its actions' distances to the greedy one), with
        cells_scored = C*U for a full evaluation (more than rescore_budget
        cells due), the tier size (rescore_budget / 8 or rescore_budget: a
        tier always scores its size) when some are due, 0 otherwise. A full
        evaluation within 8 rounds of a rebuild scores without distances
        (C U A 2d) but is counted as a rebuild: an overcount.
    ERM gradient        G(n) = n (4Kq + q) + 2 U m q
        (the U user vectors once, gathered per datum; utilities 2Kq, F^T grad
        2Kq, segment sum q)
      in its cell-table form (blocked sums with C U d <= 32 x the buffer's rows)
                        G_c(n) = n (4Kd + d) + 2 U m q + 4 C U d^2
        (utilities 2Kd, sum_k grad_k a_k 2Kd, the add to the cell d; the
        cells' queries and the (d, C) @ (C, U d) product 2 C U d^2 each);
        the chord and quasi-Newton steps' gradients use it, H(n) does not
      in its native form (erm_gradient='native'; n = the rows filled, t)
                        G_n(n) = n (4d^2 + 4Kd) + 2 U m q
        (per row the query W_i^T x 2d^2, utilities 2Kd, sum_k grad_k a_k
        2Kd, x (outer) D added to G_i 2d^2; the user vectors once)
    ERM gradient+Hessian  H(n) = G(n) + n (2K^2 q + 2K q^2 + q^2) + 2 m^2 U q^2
        (per-datum F^T W F, segment sums into S_i, and the (m^2 x U) @ (U x q^2)
        product that assembles sum_i e_i e_i^T kron S_i)
    objective           L(n) = n 2Kq + 2 U m q
    Cholesky P^3/3, one cho_solve 4 P^2
    Newton step         H(n) + P^3/3 + 2 * 4P^2 + 2 L(n) + G(n)
        (value at the iterate and at the full step: no backtracking assumed,
        as in the quadratic region a warm start lives in)
    chord step          G(n) + 4 P^2
    one refit ('fresh') G(n) + h * Newton + (iterations - h) * chord,
        h = ceil(iterations / (1 + max_chord_steps)): the fewest Hessian
        evaluations consistent with the recorded iterations (one Newton step
        then up to 6 chord steps per Hessian); a lower bound.
    one refit ('carried', the default)
                        4KP^2 (Woodbury) + 2(K+m)q (the new row's gradient
        term: the warm start's gradient is the carried one plus it)
        + 2P^2 (its direction) + iterations * (G(n) + 10P^2) (per
        quasi-Newton step a gradient, P g, P y and the BFGS outer products);
        the occasional refresh after a Newton fallback is not counted.

The ERM terms are linear in n. In round t the blocked sums (the default
when the horizon spans at least four blocks of ``erm_block_size`` rows) visit
n = ceil(t / block) * block rows; without blocks every gradient visits the
whole buffer (n = horizon, masked rows cost the same). So a round's ERM cost
grows linearly in t and a run's total as T^2.
Counts are of useful work per seed; under ``vmap`` a while loop runs until the
slowest seed in the batch stops and both branches of a ``cond`` execute, so the
executed work is larger than counted. Comparisons, exponentials and the
per-round sampling are not counted (O(A + n K) per round).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import inspect
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

RESULT_PREFIX = "BENCH_RESULT_JSON: "


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark configuration (a row of the table).

  The instance is the paper-users preset's (problem seed 1000, minimum-gap
  acceptance at 1e-4, Gaussian heads) at the given sizes, one population.
  """

  label: str
  n_users: int = 100
  n_contexts: int = 100
  n_actions: int = 100
  dim: int = 5
  latent_dim: int = 10
  n_seeds: int = 8
  horizon: int = 2000
  seed_batching: str = "auto"
  regret_evaluation: str = "auto"
  erm_hessian: str = "carried"
  erm_gradient: str = "auto"
  reference_seeds: int = 1
  n_devices: int = 1  # host devices the seeds are split over (one per core: every core)

  def instance_key(self):
    return (self.n_users, self.n_contexts, self.n_actions, self.dim, self.latent_dim)


def load1() -> float:
  return float(os.getloadavg()[0])


def device_peak_mib() -> float:
  """Peak bytes in use on the first accelerator so far, MiB (NaN on a CPU, which
  reports no allocator statistics: its memory is the process's RSS)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return float("nan") if peak is None else peak / 2**20


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def build_instance(case: Case):
  """The paper-users preset's accepted instance at the case's sizes."""
  from jaxbandit import experiment
  from jaxbandit import presets

  config = presets.with_overrides(
      presets.get_preset("paper-users"), populations=(case.n_users,),
      n_contexts=case.n_contexts, n_actions=case.n_actions, dim=case.dim,
      latent_dim=case.latent_dim)
  accepted = experiment.build_instances(config)[0]
  return accepted.instance, accepted.seed


def simulation_config(case: Case):
  """The paper-users preset's SimulationConfig at the case's horizon and options, and the preset."""
  from jaxbandit import presets

  preset = presets.get_preset("paper-users")
  base = preset.simulation_config()
  return dataclasses.replace(base, horizon=case.horizon, seed_batching=case.seed_batching,
                             regret_evaluation=case.regret_evaluation,
                             erm_hessian=case.erm_hessian,
                             erm_gradient=case.erm_gradient), preset


# ---------------------------------------------------------------------------
# Analytic floating-point operations
# ---------------------------------------------------------------------------


def gradient_flops(n_buffer, n_users, q, m, slate_size, cell_table=None, native_d=None):
  """Analytic flops of one ERM gradient over ``n_buffer`` rows (the module docstring's
  G(n)); with ``cell_table = (n_contexts, d)`` the cell-table form's G_c(n); with
  ``native_d = d`` the native form's G_n(n)."""
  if native_d is not None:
    d = native_d
    return n_buffer * (4 * d * d + 4 * slate_size * d) + 2 * n_users * m * q
  if cell_table is not None:
    n_contexts, d = cell_table
    return (n_buffer * (4 * slate_size * d + d) + 2 * n_users * m * q +
            4 * n_contexts * n_users * d * d)
  return n_buffer * (4 * slate_size * q + q) + 2 * n_users * m * q


def erm_flops(n_buffer, n_users, q, m, slate_size, iterations, max_chord_steps,
              cell_table=None, native_d=None):
  """Analytic flops of one warm-started refit (see the module docstring).

  ``iterations`` may be an array (one refit each); returns the same shape.
  ``cell_table``, ``native_d``: as in :func:`gradient_flops` (the chord steps' gradients).
  """
  iterations = np.asarray(iterations, np.float64)
  k = slate_size
  p = m * q
  gradient = gradient_flops(n_buffer, n_users, q, m, slate_size, cell_table, native_d)
  per_user_gradient = gradient_flops(n_buffer, n_users, q, m, slate_size)
  gradient_hessian = (per_user_gradient + n_buffer * (2 * k * k * q + 2 * k * q * q + q * q) +
                      2 * m * m * n_users * q * q)
  objective = n_buffer * 2 * k * q + 2 * n_users * m * q
  solve = 4.0 * p * p
  newton = gradient_hessian + p**3 / 3.0 + 2 * solve + 2 * objective + gradient
  chord = gradient + solve
  hessians = np.ceil(np.maximum(iterations, 1) / (1 + max_chord_steps))
  return gradient + hessians * newton + (iterations - hessians) * chord


def carried_erm_flops(n_buffer, n_users, q, m, slate_size, iterations, cell_table=None,
                      native_d=None):
  """Analytic flops of one refit with ``erm_hessian='carried'`` (a lower bound).

  Per refit: the Woodbury update for the new observation (``K`` columns:
  ``J P`` 2KP^2, the rank-K correction 2KP^2), the new row's term of the
  carried gradient and its direction ``P g``; per quasi-Newton step a gradient, the direction ``P g`` (2P^2) and
  the BFGS update (``P y`` 2P^2, three outer products 6P^2). The occasional
  refresh of the inverse (a Hessian, a Cholesky and an inverse) is not
  recorded per round and not counted. ``cell_table``, ``native_d``: as in
  :func:`gradient_flops`.
  """
  iterations = np.asarray(iterations, np.float64)
  k, p = slate_size, m * q
  gradient = gradient_flops(n_buffer, n_users, q, m, slate_size, cell_table, native_d)
  woodbury = 4.0 * k * p * p
  start = 2.0 * (k + m) * q + 2.0 * p * p  # the new row's gradient term, P g
  step = gradient + 2.0 * p * p + 8.0 * p * p
  return woodbury + start + iterations * step


def regret_flops(cells_scored, n_contexts, n_actions, n_users, d, q, m, candidates=None,
                 certified=False):
  """Analytic flops of one round's regret (the module docstring's formula).

  ``candidates=None`` is the 'full' evaluation (or with ``certified`` the
  certified pass re-scoring ``cells_scored`` cells over ``n_actions`` visited
  actions, ``n_users`` the users of positive weight); otherwise the
  incremental cache with that many candidates per cell re-scoring
  ``cells_scored`` cells.
  """
  cells = np.asarray(cells_scored, np.float64)
  queries = 2.0 * n_contexts * n_users * d * d + 2.0 * n_users * m * q
  if certified:
    return queries + n_contexts * n_users * 3.0 * d + cells * n_actions * (2.0 * d + 4.0)
  if candidates is None:
    return queries + n_contexts * n_users * n_actions * 2.0 * d + 0 * cells
  return (queries + n_contexts * n_users * 3.0 * d +
          n_contexts * n_users * candidates * 2.0 * d + cells * n_actions * 5.0 * d)


def flops_per_seed_round(case: Case, records, config, visited_actions=None) -> dict:
  """Mean analytic flops per seed-round of a run, split into regret and ERM.

  ``visited_actions``: the actions the 'full' regret pass visits per cell
  (the width of ``simulate.action_labels``; every action when None)."""
  from jaxbandit import learners
  from jaxbandit import simulate

  max_chord = inspect.signature(learners.fit_erm).parameters["max_chord_steps"].default
  q, m = case.dim**2, case.latent_dim
  all_cells = case.n_contexts * case.n_users
  rescored = np.asarray(records.rescored_cells)
  d = case.dim
  evaluation = simulate.resolve_regret_evaluation(config)
  if evaluation == "full":
    regret = regret_flops(all_cells, case.n_contexts, visited_actions or case.n_actions,
                          case.n_users, d, q, m)
    regret = np.full(rescored.shape, regret)
  elif evaluation == "certified":
    regret = regret_flops(rescored, case.n_contexts, visited_actions or case.n_actions,
                          case.n_users, d, q, m, certified=True)
  else:
    budget = min(config.rescore_budget, all_cells)
    small = max(budget // 8, 1)
    cells = np.where(rescored >= all_cells, all_cells,
                     np.where(rescored > small, budget, np.where(rescored > 0, small, 0)))
    regret = regret_flops(cells, case.n_contexts, case.n_actions, case.n_users, d, q, m,
                          min(config.regret_candidates, case.n_actions))
  # Rows a gradient visits in round t (1-based): whole blocks up to t, or the buffer.
  rounds = np.arange(1, np.shape(records.erm_iterations)[-1] + 1, dtype=np.float64)
  if simulate.uses_erm_blocks(config):
    block = config.erm_block_size
    rows = np.minimum(np.ceil(rounds / block) * block, simulate.buffer_capacity(config))
  else:
    rows = np.full(rounds.shape, float(simulate.buffer_capacity(config)))
  blocks = config.erm_block_size if simulate.uses_erm_blocks(config) else None
  cell_table = ((case.n_contexts, d) if learners.cell_table_applies(
      case.n_contexts, case.n_users, d, simulate.buffer_capacity(config), blocks) else None)
  native_d = None
  if simulate.resolve_erm_gradient(config, case.dim) == "native":
    native_d, cell_table = d, None
    rows = np.minimum(rounds, simulate.buffer_capacity(config))  # the filled rows exactly
  if config.erm_hessian == "carried":
    erm = carried_erm_flops(rows, case.n_users, q, m, config.slate_size,
                            np.asarray(records.erm_iterations), cell_table, native_d)
  else:
    erm = erm_flops(rows, case.n_users, q, m, config.slate_size,
                    np.asarray(records.erm_iterations), max_chord, cell_table, native_d)
  return {
      "regret_flops": float(regret.mean()),
      "erm_flops": float(erm.mean()),
      "total_flops": float(regret.mean() + erm.mean()),
      "full_regret_flops": float(regret_flops(all_cells, case.n_contexts, case.n_actions,
                                              case.n_users, case.dim, q, m)),
      "mean_erm_iterations": float(np.mean(records.erm_iterations)),
      "mean_rescored_cells": float(np.mean(rescored)),
      "full_evaluation_fraction": float(np.mean(rescored >= all_cells)),
      "max_chord_steps": int(max_chord),
  }


# ---------------------------------------------------------------------------
# Measurements (each may run in its own subprocess)
# ---------------------------------------------------------------------------


def measure_jax(case: Case, master_seed: int = 0, repeats: int = 1) -> dict:
  """Compiles and runs the chunk kernel for one case; returns the measured numbers.

  With ``repeats > 1`` the kernel runs that many times on fresh states and the
  fastest run is reported (all run times are in ``run_seconds_all``).
  """
  import jax

  from jaxbandit import simulate

  instance, accepted_seed = build_instance(case)
  config, preset = simulation_config(case)
  params = simulate.SimulationParams.make(preset.beta, preset.ridge, preset.mixture_weight)
  instances = jax.tree_util.tree_map(lambda x: x[None], instance)
  config.validate(case.n_actions, case.n_actions)
  keys = simulate.seed_keys(master_seed, np.arange(case.n_seeds))
  if jax.local_device_count() < case.n_devices:
    raise ValueError(f"n_devices={case.n_devices} but this process has "
                     f"{jax.local_device_count()} local devices; allowed: run the row in its "
                     f"own subprocess (not --in-process), which makes them")
  kernel = simulate.make_chunk_kernel(config, case.horizon, case.n_devices)
  # The regret pass's actions, as simulate() passes them (host work, not timed).
  labels = simulate.action_labels(config, instances)
  if case.n_devices > 1:
    labels = simulate.replicate_on_devices(case.n_devices, labels)

  def fresh_states():
    # Several devices: every input laid out as the kernel splits them, so the
    # compiled kernel is timed without moving them first (placing an input
    # that is already in place is free).
    nonlocal instances, params, keys
    states = simulate.init_states(config, instances, case.n_seeds)
    if case.n_devices > 1:
      instances, params, keys, states = simulate.place_on_devices(
          case.n_devices, instances, params, keys, states)
    return states

  states = fresh_states()
  jax.block_until_ready(states)
  base_rss = peak_rss_mib()
  load_before = load1()

  start = time.perf_counter()
  compiled = kernel.lower(instances, params, keys, states, labels).compile()
  compile_seconds = time.perf_counter() - start
  try:
    memory = compiled.memory_analysis()
    temp_mib = memory.temp_size_in_bytes / 2**20
    argument_mib = memory.argument_size_in_bytes / 2**20
    output_mib = memory.output_size_in_bytes / 2**20
  except Exception:  # memory_analysis is backend-dependent
    temp_mib = argument_mib = output_mib = float("nan")

  run_times, cpu_times = [], []
  for repeat in range(repeats):
    if repeat > 0:  # the previous states were donated
      states = fresh_states()
      jax.block_until_ready(states)
    with simulate.one_blas_thread():  # as simulate() runs its chunks
      cpu_start = time.process_time()
      start = time.perf_counter()
      final_states, records = compiled(instances, params, keys, states, labels)
      jax.block_until_ready((final_states, records))
      run_times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  best = int(np.argmin(run_times))
  run_seconds, cpu_seconds = run_times[best], cpu_times[best]
  records = jax.device_get(records)

  flops = flops_per_seed_round(case, records, config,
                               None if labels is None else labels.shape[-1])
  cumulative = np.cumsum(np.asarray(records.regret, np.float64), axis=-1)[0, :, -1]
  seed_rounds = case.n_seeds * case.horizon
  return {
      "kind": "jax",
      "case": dataclasses.asdict(case),
      "batching": simulate.resolve_batching(config),
      "regret_evaluation": simulate.resolve_regret_evaluation(config),
      "erm_gradient": simulate.resolve_erm_gradient(config, case.dim),
      "accepted_problem_seed": int(accepted_seed),
      "compile_seconds": compile_seconds,
      "run_seconds": run_seconds,
      "run_cpu_seconds": cpu_seconds,
      "run_seconds_all": run_times,
      "seed_rounds_per_second": seed_rounds / run_seconds,
      "peak_rss_mib": peak_rss_mib(),
      "device_peak_mib": device_peak_mib(),
      "base_rss_mib": base_rss,
      "xla_temp_mib": temp_mib,
      "xla_argument_mib": argument_mib,
      "xla_output_mib": output_mib,
      "flops": flops,
      "gflops_per_second": flops["total_flops"] * seed_rounds / run_seconds / 1e9,
      "mean_final_cumulative_regret": float(cumulative.mean()),
      "sd_final_cumulative_regret": float(cumulative.std(ddof=1)) if case.n_seeds > 1 else 0.0,
      "erm_converged_fraction": float(np.mean(records.erm_converged)),
      "load1_before": load_before,
      "load1_after": load1(),
  }


def measure_reference(case: Case, master_seed: int = 0) -> dict:
  """Runs the NumPy reference on ``case.reference_seeds`` seeds of the same instance."""
  from benchmarks import numpy_reference

  instance, accepted_seed = build_instance(case)
  arrays = {k: np.asarray(v) for k, v in instance._asdict().items()}
  _, preset = simulation_config(case)
  load_before = load1()
  cpu_start = time.process_time()
  out = numpy_reference.run_reference(arrays, case.reference_seeds, case.horizon,
                                      beta=preset.beta, ridge=preset.ridge, seed=master_seed)
  cpu_seconds = time.process_time() - cpu_start
  final = out["cumulative_regret"][:, -1]
  return {
      "kind": "reference",
      "case": dataclasses.asdict(case),
      "accepted_problem_seed": int(accepted_seed),
      "seeds": case.reference_seeds,
      "seconds": out["seconds"],
      "cpu_seconds": cpu_seconds,
      "seconds_per_seed": out["seconds"] / case.reference_seeds,
      "seed_rounds_per_second": case.reference_seeds * case.horizon / out["seconds"],
      "peak_rss_mib": peak_rss_mib(),
      "mean_final_cumulative_regret": float(final.mean()),
      "mean_erm_iterations": float(out["erm_iterations"].mean()),
      "load1_before": load_before,
      "load1_after": load1(),
  }


def measure_matmul(size: int = 2048, repeats: int = 5) -> dict:
  """Best-of-``repeats`` float32 ``jnp.matmul`` throughput, GFLOP/s."""
  import jax
  import jax.numpy as jnp

  from jaxbandit.precision import MATMUL_PRECISION

  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32)
  b = jax.random.normal(key_b, (size, size), jnp.float32)
  # At the precision the kernel's products use (jaxbandit/precision.py): full
  # float32, not the TensorFloat-32 an NVIDIA GPU would use by default.
  matmul = jax.jit(functools.partial(jnp.matmul, precision=MATMUL_PRECISION))
  matmul(a, b).block_until_ready()
  best = math.inf
  load_before = load1()
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return {"kind": "matmul", "size": size, "seconds": best,
          "gflops_per_second": 2.0 * size**3 / best / 1e9, "load1_before": load_before}


MEMORY_RUN_CHUNK = 8  # rounds per chunk of the measured chunked run (--memory)
MEMORY_RUN_CHUNKS = 2  # chunks it runs before stopping


def measure_chunked_memory(case: Case) -> dict:
  """Peak RSS of a real chunked run at the case's seeds and horizon, stopped early.

  ``simulate`` runs chunks of ``MEMORY_RUN_CHUNK`` rounds for ``MEMORY_RUN_CHUNKS``
  chunks, then stops. The state (data buffer, regret cache, carried inverse) is
  allocated for the whole horizon from the start. The host record buffer is also
  preallocated for the whole horizon, but pages not yet written are not resident.
  So the first callback writes the rest of that buffer, and the peak covers what
  a complete run holds: state, whole-horizon host records, one chunk in transit.
  """
  import jax

  from jaxbandit import simulate

  instance, _ = build_instance(case)
  config, _ = simulation_config(case)
  base = peak_rss_mib()
  chunks = []

  def callback(progress):
    if not chunks:
      for field in progress.records:  # views of the first rounds; .base is the buffer
        field.base[..., progress.rounds_done:] = 0
    chunks.append(progress.rounds_done)
    return len(chunks) >= MEMORY_RUN_CHUNKS

  start = time.perf_counter()
  result = simulate.simulate(instance, config, n_seeds=case.n_seeds,
                             chunk_size=MEMORY_RUN_CHUNK, callback=callback)
  jax.block_until_ready(result.final_state)
  return {"base_mib": base, "peak_mib": peak_rss_mib(), "rounds_done": result.rounds_done,
          "seconds": time.perf_counter() - start}


WORKERS = {"jax": measure_jax, "reference": measure_reference,
           "chunked_memory": measure_chunked_memory}


def run_worker(payload: dict) -> dict:
  """Runs ``payload`` (``{"kind": ..., ...}``, see :func:`worker_main`) in a fresh
  subprocess of this script and returns the result it prints."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                         json.dumps(payload)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        cwd=REPO_ROOT)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(f"benchmark worker {payload['kind']} failed (exit {proc.returncode}):\n"
                     f"{proc.stderr[-4000:]}")


def run_measurement(kind: str, case: Case, subprocess_mode: bool) -> dict:
  """Runs one measurement ('jax' or 'reference'), in a fresh subprocess (so that its
  peak RSS is its own) or in this process."""
  if not subprocess_mode:
    return WORKERS[kind](case)
  return run_worker({"kind": kind, "case": dataclasses.asdict(case)})


def worker_main(payload: str) -> None:
  spec = json.loads(payload)
  if spec["kind"] == "figure":
    result = measure_figure(spec["spec"])
  else:
    if spec["case"].get("n_devices", 1) > 1:  # before JAX starts its CPU backend
      import jax

      jax.config.update("jax_num_cpu_devices", spec["case"]["n_devices"])
    result = WORKERS[spec["kind"]](Case(**spec["case"]))
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

COLUMNS = [
    ("configuration", "configuration"),
    ("batching", "batching"),
    ("regret", "regret"),
    ("gradient", "gradient"),
    ("C x A x U", "size"),
    ("seeds", "seeds"),
    ("horizon", "horizon"),
    ("compile s", "compile_s"),
    ("run s", "run_s"),
    ("run cpu s", "run_cpu_s"),
    ("seed-rounds/s", "seed_rounds_per_s"),
    ("peak RSS MiB (process)", "peak_rss_mib"),
    ("device peak MiB", "device_peak_mib"),
    ("base MiB", "base_rss_mib"),
    ("XLA temp MiB", "xla_temp_mib"),
    ("MFLOP/seed-round", "mflop_per_seed_round"),
    ("  regret+ERM", "mflop_split"),
    ("ERM iters", "erm_iterations"),
    ("GFLOP/s", "gflops"),
    ("% matmul peak", "percent_matmul_peak"),
    ("ref seeds (scaled)", "reference_seeds"),
    ("ref s (scaled)", "reference_s_scaled"),
    ("speedup run", "speedup_run"),
    ("speedup incl. compile", "speedup_with_compile"),
    ("cum. regret jax / ref", "cumulative_regret"),
    ("load1", "load1"),
]


def make_row(jax_result: dict, reference: Optional[dict], matmul_gflops: float) -> dict:
  case = jax_result["case"]
  flops = jax_result["flops"]
  row = {
      "configuration": case["label"],
      "batching": jax_result["batching"],
      "regret": jax_result["regret_evaluation"],
      "gradient": jax_result.get("erm_gradient", "xla"),
      "size": f"{case['n_contexts']}x{case['n_actions']}x{case['n_users']}",
      "seeds": case["n_seeds"],
      "horizon": case["horizon"],
      "compile_s": jax_result["compile_seconds"],
      "run_s": jax_result["run_seconds"],
      "run_cpu_s": jax_result["run_cpu_seconds"],
      "seed_rounds_per_s": jax_result["seed_rounds_per_second"],
      "peak_rss_mib": jax_result["peak_rss_mib"],
      "device_peak_mib": jax_result.get("device_peak_mib", float("nan")),
      "base_rss_mib": jax_result["base_rss_mib"],
      "xla_temp_mib": jax_result["xla_temp_mib"],
      "mflop_per_seed_round": flops["total_flops"] / 1e6,
      "mflop_split": f"{flops['regret_flops'] / 1e6:.1f}+{flops['erm_flops'] / 1e6:.1f}",
      "erm_iterations": flops["mean_erm_iterations"],
      "gflops": jax_result["gflops_per_second"],
      "percent_matmul_peak": 100.0 * jax_result["gflops_per_second"] / matmul_gflops,
      "load1": f"{jax_result['load1_before']:.1f}-{jax_result['load1_after']:.1f}",
  }
  if reference is not None:
    scaled = reference["seconds_per_seed"] * case["n_seeds"]
    row.update({
        "reference_seeds": f"{reference['seeds']} (x{case['n_seeds'] / reference['seeds']:g})",
        "reference_s_scaled": scaled,
        "speedup_run": scaled / jax_result["run_seconds"],
        "speedup_with_compile": scaled / (jax_result["run_seconds"] +
                                          jax_result["compile_seconds"]),
        "cumulative_regret": (f"{jax_result['mean_final_cumulative_regret']:.1f} / "
                              f"{reference['mean_final_cumulative_regret']:.1f}"),
    })
  else:
    row.update({"reference_seeds": "-", "reference_s_scaled": float("nan"),
                "speedup_run": float("nan"), "speedup_with_compile": float("nan"),
                "cumulative_regret": f"{jax_result['mean_final_cumulative_regret']:.1f} / -"})
  return row


def _format(value) -> str:
  if isinstance(value, float):
    if math.isnan(value):
      return "-"
    if abs(value) >= 100:
      return f"{value:,.0f}"
    if abs(value) >= 10:
      return f"{value:.1f}"
    return f"{value:.2f}"
  return str(value)


def format_table(rows, columns=COLUMNS) -> str:
  """A Markdown table (readable in a terminal and pasteable into RESULTS.md)."""
  header = [title for title, _ in columns]
  body = [[_format(row.get(key, "")) for _, key in columns] for row in rows]
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out += [line(b) for b in body]
  return "\n".join(out)


def write_outputs(out_dir: str, stem: str, rows, meta: dict, columns=COLUMNS) -> None:
  os.makedirs(out_dir, exist_ok=True)
  keys = [key for _, key in columns]
  with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow([title.strip() for title, _ in columns])
    for row in rows:
      writer.writerow([row.get(k, "") for k in keys])
  with open(os.path.join(out_dir, f"{stem}.json"), "w") as handle:
    json.dump({"meta": meta, "rows": rows}, handle, indent=2, default=float)
    handle.write("\n")


def source_fingerprint() -> str:
  """sha256 (first 12 hex digits) of the package sources: which code produced the numbers."""
  import hashlib

  digest = hashlib.sha256()
  package = os.path.join(REPO_ROOT, "jaxbandit")
  for name in sorted(os.listdir(package)):
    if name.endswith(".py"):
      with open(os.path.join(package, name), "rb") as handle:
        digest.update(name.encode() + b"\0" + handle.read())
  return digest.hexdigest()[:12]


def machine_info() -> dict:
  import jax

  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as handle:
      for line in handle:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu": model, "cores": os.cpu_count(), "jax": jax.__version__,
          "jaxbandit_sources_sha256": source_fingerprint(),
          "backend": jax.default_backend(), "python": platform.python_version(),
          "numpy": np.__version__, "platform": platform.platform()}


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------


def table_cases(args):
  """(main case, variant cases): the variants share one smaller size."""
  sizes = dict(n_users=args.users, n_contexts=args.contexts, n_actions=args.actions)
  main = Case("main (auto)", n_seeds=args.seeds, horizon=args.horizon,
              reference_seeds=args.reference_seeds, **sizes)
  import jax

  from jaxbandit import simulate
  from jaxbandit.cli import available_cores

  cores = available_cores()
  # The same kernel with the seeds split over one host device per core (what
  # the jaxbandit CLI does on a CPU), when the seeds divide evenly. On an
  # accelerator the kernel runs on it, not on host devices.
  every_core = ([dataclasses.replace(main, label=f"main, {cores} devices", n_devices=cores)]
                if cores > 1 and main.n_seeds % cores == 0 and not args.in_process and
                jax.default_backend() == "cpu" else [])
  if args.no_variants:
    return main, every_core
  variant_sizes = dict(sizes, n_seeds=args.variant_seeds, horizon=args.variant_horizon,
                       reference_seeds=args.reference_seeds)
  variants = [Case(f"{b}/{r}", seed_batching=b, regret_evaluation=r, **variant_sizes)
              for b in ("map", "vmap") for r in ("incremental", "full")]
  if jax.default_backend() == "cpu":
    variants.insert(0, Case("map/certified", seed_batching="map", regret_evaluation="certified",
                            **variant_sizes))
    variants.insert(1, Case("map/certified/xla-gradient", seed_batching="map",
                            regret_evaluation="certified", erm_gradient="xla", **variant_sizes))
  variants.append(Case("map/full/fresh-hessian", seed_batching="map", regret_evaluation="full",
                       erm_hessian="fresh", **variant_sizes))
  if (main.n_seeds, main.horizon) == (args.variant_seeds, args.variant_horizon):
    # One size (--quick): the main row already is 'auto' resolved on this backend.
    auto = simulate.resolve_regret_evaluation(simulate.SimulationConfig(
        seed_batching=main.seed_batching))
    auto_batching = "map" if jax.default_backend() == "cpu" else "vmap"
    variants = [v for v in variants if (v.seed_batching, v.regret_evaluation) !=
                (auto_batching, auto) or v.erm_hessian != "carried" or
                v.erm_gradient != "auto"]
  return main, every_core + variants


def table_mode(args) -> None:
  subprocess_mode = not args.in_process
  started = time.time()
  print(f"load before: {os.getloadavg()}", flush=True)
  matmul = measure_matmul()  # here: the rows run in their own processes anyway
  print(f"matmul peak: {matmul['gflops_per_second']:.1f} GFLOP/s "
        f"(float32 {matmul['size']}^2, best of 5, load {matmul['load1_before']:.1f})",
        flush=True)
  main, variants = table_cases(args)
  references = {}
  rows, raw = [], []
  for case in [main] + variants:
    ref_key = case.instance_key() + (case.horizon,)
    if not args.no_reference and ref_key not in references:
      references[ref_key] = run_measurement("reference", case, subprocess_mode)
      r = references[ref_key]
      print(f"reference {case.horizon} rounds x {r['seeds']} seeds: {r['seconds']:.1f} s "
            f"({r['seed_rounds_per_second']:.0f} seed-rounds/s, load "
            f"{r['load1_before']:.1f})", flush=True)
    result = run_measurement("jax", case, subprocess_mode)
    print(f"{case.label}: compile {result['compile_seconds']:.1f} s, run "
          f"{result['run_seconds']:.1f} s ({result['seed_rounds_per_second']:.0f} "
          f"seed-rounds/s, load {result['load1_before']:.1f})", flush=True)
    raw.append(result)
    rows.append(make_row(result, references.get(ref_key), matmul["gflops_per_second"]))
  matmul_after = measure_matmul()
  meta = {"machine": machine_info(), "mode": "quick" if args.quick else "default",
          "matmul": [matmul, matmul_after], "references": list(references.values()),
          "jax_results": raw, "subprocess_per_row": subprocess_mode,
          "total_seconds": time.time() - started, "args": vars(args)}
  write_outputs(args.out, "bench", rows, meta)
  print()
  print(f"matmul peak {matmul['gflops_per_second']:.1f} GFLOP/s before, "
        f"{matmul_after['gflops_per_second']:.1f} after; {meta['machine']['cpu']}, "
        f"{meta['machine']['cores']} cores, jax {meta['machine']['jax']}; peak RSS is "
        f"process-wide ({'one subprocess per row' if subprocess_mode else 'one process'}); "
        f"reference times scaled linearly from 'ref seeds' to the row's seeds")
  print(format_table(rows))
  print(f"\nwrote {args.out}/bench.csv and bench.json ({time.time() - started:.0f} s total)")


SCALING_COLUMNS = [
    ("sweep", "sweep"), ("seeds", "seeds"), ("horizon", "horizon"),
    ("compile s", "compile_s"), ("run s", "run_s"), ("seed-rounds/s", "seed_rounds_per_s"),
    ("MFLOP/seed-round", "mflop_per_seed_round"), ("GFLOP/s", "gflops"),
    ("ref s (scaled)", "reference_s_scaled"), ("load1", "load1"),
]


def scaling_mode(args) -> None:
  started = time.time()
  sizes = dict(n_users=args.users, n_contexts=args.contexts, n_actions=args.actions)
  horizons = [int(h) for h in args.scaling_horizons.split(",")]
  seeds = [int(s) for s in args.scaling_seeds.split(",")]
  points = [("horizon", args.variant_seeds, h) for h in horizons]
  points += [("seeds", s, args.variant_horizon) for s in seeds]
  print(f"load before: {os.getloadavg()}; each point: best of 2 runs", flush=True)
  rows, measured = [], {}
  for sweep, n_seeds, horizon in points:
    case = Case(f"{sweep}", n_seeds=n_seeds, horizon=horizon, reference_seeds=1, **sizes)
    if (n_seeds, horizon) not in measured:  # a point on both sweeps is measured once
      # (a second compile of the same kernel would hit JAX's in-memory cache)
      measured[(n_seeds, horizon)] = measure_jax(case, repeats=2)
    result = measured[(n_seeds, horizon)]
    row = {"sweep": sweep, "seeds": n_seeds, "horizon": horizon,
           "compile_s": result["compile_seconds"], "run_s": result["run_seconds"],
           "seed_rounds_per_s": result["seed_rounds_per_second"],
           "mflop_per_seed_round": result["flops"]["total_flops"] / 1e6,
           "gflops": result["gflops_per_second"], "reference_s_scaled": float("nan"),
           "load1": f"{result['load1_before']:.1f}-{result['load1_after']:.1f}"}
    if sweep == "horizon" and not args.no_reference:
      reference = measure_reference(case)
      row["reference_s_scaled"] = reference["seconds_per_seed"] * n_seeds
    print(f"{sweep}: seeds {n_seeds} horizon {horizon}: compile {row['compile_s']:.1f} s, "
          f"run {row['run_s']:.2f} s, ref {row['reference_s_scaled']:.2f} s", flush=True)
    rows.append(row)
  slopes = {sweep: scaling_slope(rows, sweep, minimum=args.slope_from if sweep == "seeds" else 0)
            for sweep in ("horizon", "seeds")}
  meta = {"machine": machine_info(), "mode": "scaling", "sizes": sizes,
          "total_seconds": time.time() - started, "args": vars(args), "slopes": slopes}
  write_outputs(args.out, "scaling", rows, meta, SCALING_COLUMNS)
  plot_scaling(rows, os.path.join(args.out, "scaling.png"), sizes)
  print()
  print(format_table(rows, SCALING_COLUMNS))
  for sweep, fit in slopes.items():
    if fit is not None:
      print(f"run time ~ {sweep}^{fit['slope']:.3f} (log-log least squares over "
            f"{sweep} {fit['from']}-{fit['to']}, {fit['points']} points; 1 = linear)")
  print(f"\nwrote {args.out}/scaling.csv, scaling.json, scaling.png "
        f"({time.time() - started:.0f} s total)")


# ---------------------------------------------------------------------------
# The full figure: every population, every core, projected to the target's seeds
# ---------------------------------------------------------------------------

FIGURE_COLUMNS = [
    ("populations", "populations"), ("devices", "devices"), ("seeds", "seeds"),
    ("horizon", "horizon"), ("chunks", "chunks"), ("compile s", "compile_s"),
    ("run s", "run_s"), ("seed-rounds/s", "seed_rounds_per_s"),
    ("target seeds", "target_seeds"), ("projected s", "projected_s"),
    ("target s", "target_s"), ("projected / target", "ratio"),
    ("cum. regret (mean per population)", "cumulative_regret"), ("load1", "load1"),
]


def measure_figure(spec: dict) -> dict:
  """Runs the paper-users preset (all its populations stacked, as ``jaxbandit run``
  does) at ``spec["seeds"]`` x ``spec["horizon"]`` on every core: compile and run seconds."""
  from jaxbandit import cli

  devices = cli.use_every_core()
  import jax

  from jaxbandit import experiment
  from jaxbandit import instance as instance_lib
  from jaxbandit import presets
  from jaxbandit import simulate

  preset = presets.get_preset("paper-users")
  config = presets.with_overrides(preset, n_seeds=spec["seeds"], horizon=spec["horizon"],
                                  chunk_size=min(preset.chunk_size, spec["horizon"]))
  accepted = experiment.build_instances(config)
  stacked = instance_lib.stack_instances([a.instance for a in accepted])
  params = simulate.SimulationParams.make(config.beta, config.ridge, config.mixture_weight)
  # Compile time as JAX reports it (tracing, lowering, XLA compile: the same
  # span as the table's compile column), summed over the run's compiles.
  compiling = []
  listening = [True]

  def on_duration(name, seconds, **_):
    if listening[0] and name.startswith("/jax/core/compile/"):
      compiling.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  marks = [time.perf_counter()]

  def between_chunks(progress) -> bool:
    marks.append(time.perf_counter())
    # On stderr as it goes (a worker's stderr is shown if it fails): how far a
    # run that is stopped early got, and at what speed.
    print(f"figure: rounds {progress.rounds_done}/{config.horizon}, "
          f"{marks[-1] - marks[0]:.1f} s", file=sys.stderr, flush=True)
    return False

  load_before = load1()
  result = simulate.simulate(stacked, config.simulation_config(), params,
                             n_seeds=config.n_seeds, chunk_size=config.chunk_size,
                             callback=between_chunks)
  listening[0] = False
  compile_s = float(sum(compiling))
  run_s = marks[-1] - marks[0] - compile_s
  cumulative = result.cumulative_regret()[..., -1].mean(axis=1)
  return {"populations": list(config.populations), "devices": jax.local_device_count(),
          "cores_used": devices, "seeds": config.n_seeds, "horizon": config.horizon,
          "chunks": len(marks) - 1, "chunk_seconds": np.diff(marks).tolist(),
          "compile_s": compile_s, "compiles": len(compiling), "run_s": run_s,
          "seed_rounds": len(config.populations) * config.n_seeds * config.horizon,
          "cumulative_regret": cumulative.tolist(), "device_peak_mib": device_peak_mib(),
          "backend": jax.default_backend(), "load1_before": load_before,
          "load1_after": load1()}


def figure_row(result: dict, target_seeds: int, target_seconds: float) -> dict:
  """The table row of :func:`measure_figure`, its run time projected linearly to
  ``target_seeds`` seeds per population (plus the compile, paid once)."""
  projected = result["compile_s"] + result["run_s"] * target_seeds / result["seeds"]
  return {"populations": ",".join(str(u) for u in result["populations"]),
          "devices": result["devices"], "seeds": result["seeds"],
          "horizon": result["horizon"], "chunks": result["chunks"],
          "compile_s": result["compile_s"], "run_s": result["run_s"],
          "seed_rounds_per_s": result["seed_rounds"] / result["run_s"],
          "target_seeds": target_seeds, "projected_s": projected,
          "target_s": target_seconds, "ratio": projected / target_seconds,
          "cumulative_regret": " / ".join(f"{c:.1f}" for c in result["cumulative_regret"]),
          "load1": f"{result['load1_before']:.1f}-{result['load1_after']:.1f}"}


def figure_mode(args) -> None:
  started = time.time()
  spec = {"seeds": args.figure_seeds, "horizon": args.figure_horizon}
  # A fresh process unless told otherwise, so that it can make one host device per core.
  result = (measure_figure(spec) if args.in_process else
            run_worker({"kind": "figure", "spec": spec}))
  row = figure_row(result, args.figure_target_seeds, args.figure_target_seconds)
  meta = {"machine": machine_info(), "mode": "figure", "result": result,
          "total_seconds": time.time() - started, "args": vars(args)}
  write_outputs(args.out, "figure", [row], meta, FIGURE_COLUMNS)
  print(format_table([row], FIGURE_COLUMNS))
  print(f"\nwrote {args.out}/figure.csv, figure.json ({time.time() - started:.0f} s total)")


# ---------------------------------------------------------------------------
# Same key, same result: reruns, batch sizes, machines
# ---------------------------------------------------------------------------

REPEATABILITY_COLUMNS = [
    ("comparison", "comparison"), ("backend", "backend"), ("seeds", "seeds"),
    ("horizon", "horizon"), ("bit-identical", "identical"),
    ("seed-rounds differing", "differing"), ("max |diff| per round", "max_round_diff"),
    ("max |diff| cum. regret", "max_cumulative_diff"), ("mean cum. regret", "mean_cumulative"),
]


def compare_regret(label: str, backend: str, mine: np.ndarray, other: np.ndarray) -> dict:
  """A row comparing two (seeds, rounds) float32 per-round regret arrays bit for bit."""
  mine, other = np.asarray(mine, np.float32), np.asarray(other, np.float32)
  differing = mine.view(np.uint32) != other.view(np.uint32)
  cumulative = lambda r: np.cumsum(r.astype(np.float64), axis=-1)[:, -1]
  return {"comparison": label, "backend": backend, "seeds": mine.shape[0],
          "horizon": mine.shape[1], "identical": "yes" if not differing.any() else "no",
          "differing": f"{int(differing.sum())} of {differing.size}",
          "max_round_diff": float(np.max(np.abs(mine - other))),
          "max_cumulative_diff": float(np.max(np.abs(cumulative(mine) - cumulative(other)))),
          "mean_cumulative": float(cumulative(mine).mean())}


def repeatability_mode(args) -> None:
  """Runs the main size's seeds twice, then their second half alone, on this backend
  (one device), and compares the per-round regret bit for bit; ``--compare-to``
  compares with another machine's saved ``repeatability.npz`` too."""
  import jax

  from jaxbandit import simulate

  started = time.time()
  case = Case("repeatability", n_users=args.users, n_contexts=args.contexts,
              n_actions=args.actions, n_seeds=args.seeds, horizon=args.horizon)
  instance, _ = build_instance(case)
  config, preset = simulation_config(case)
  params = simulate.SimulationParams.make(preset.beta, preset.ridge, preset.mixture_weight)

  def regret(n_seeds, first_seed=0):
    result = simulate.simulate(instance, config, params, n_seeds=n_seeds,
                               first_seed=first_seed, n_devices=1)
    return np.asarray(result.records.regret[0])

  backend = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
  half = args.seeds // 2
  first, again, alone = regret(args.seeds), regret(args.seeds), regret(args.seeds - half, half)
  rows = [compare_regret("rerun", backend, again, first),
          compare_regret(f"seeds {half}-{args.seeds - 1} alone vs in the batch", backend,
                         alone, first[half:])]
  if args.compare_to:
    saved = np.load(args.compare_to)
    rows.append(compare_regret(f"vs {saved['backend']}", backend, first, saved["regret"]))
  os.makedirs(args.out, exist_ok=True)
  np.savez(os.path.join(args.out, "repeatability.npz"), regret=first, backend=backend)
  meta = {"machine": machine_info(), "mode": "repeatability", "case": dataclasses.asdict(case),
          "total_seconds": time.time() - started, "args": vars(args)}
  write_outputs(args.out, "repeatability", rows, meta, REPEATABILITY_COLUMNS)
  print(format_table(rows, REPEATABILITY_COLUMNS))
  print(f"\nwrote {args.out}/repeatability.csv, .json, .npz ({time.time() - started:.0f} s total)")


def scaling_slope(rows, sweep: str, minimum: int = 0):
  """Least-squares slope of log(run seconds) against log(seeds or horizon) over the
  ``sweep`` points whose swept value is at least ``minimum``: 1 means linear.
  None with fewer than two such points."""
  key = "seeds" if sweep == "seeds" else "horizon"
  points = [r for r in rows if r["sweep"] == sweep and r[key] >= minimum]
  if len(points) < 2:
    return None
  x = np.log([r[key] for r in points])
  y = np.log([r["run_s"] for r in points])
  slope = float(np.polyfit(x, y, 1)[0])
  return {"slope": slope, "from": min(r[key] for r in points),
          "to": max(r[key] for r in points), "points": len(points)}


def plot_scaling(rows, path, sizes) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, sweep, x_key in ((axes[0], "horizon", "horizon"), (axes[1], "seeds", "seeds")):
    points = [r for r in rows if r["sweep"] == sweep]
    x = np.array([r[x_key] for r in points], np.float64)
    run = np.array([r["run_s"] for r in points])
    compile_s = np.array([r["compile_s"] for r in points])
    ax.loglog(x, run, "o-", label="jaxbandit run")
    ax.loglog(x, compile_s, "s--", label="jaxbandit compile")
    reference = np.array([r["reference_s_scaled"] for r in points])
    if np.any(np.isfinite(reference)):
      ax.loglog(x, reference, "^-", label="NumPy reference (scaled)")
    for slope, style in ((1, ":"), (2, "-.")):
      ax.loglog(x, run[0] * (x / x[0])**slope, "k" + style, lw=0.8, label=f"slope {slope}")
    ax.set_xlabel(x_key)
    ax.set_ylabel("seconds")
    fixed = (f"{points[0]['seeds']} seeds" if sweep == "horizon"
             else f"horizon {points[0]['horizon']}")
    ax.set_title(f"time vs {x_key} ({fixed})")
    ax.legend(fontsize=7)
  fig.suptitle(f"{sizes['n_contexts']} contexts x {sizes['n_actions']} actions x "
               f"{sizes['n_users']} users, map batching, regret_evaluation='auto'", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


BREAKDOWN_COLUMNS = [
    ("component", "component"), ("rows n", "rows"), ("MFLOP (analytic)", "mflop"),
    ("ms per call", "ms"), ("cpu ms per call", "cpu_ms"), ("GFLOP/s", "gflops"),
    ("load1", "load1"),
]


def breakdown_mode(args) -> None:
  """Times the pieces of one round for one seed at the main size (jitted, no batching).

  The data buffer holds ``horizon`` random observations (masked rows cost the
  same as live ones, so this is the ERM's cost in every round of such a run).
  Each component is called ``repeats`` times in each of 5 batches; the batch
  with the lowest mean wall time is reported (with its process CPU time).
  """
  import jax
  import jax.numpy as jnp

  from jaxbandit import choice as choice_lib
  from jaxbandit import learners
  from jaxbandit import metrics
  from jaxbandit import simulate
  from jaxbandit.instance import cell_weights, true_scores

  started = time.time()
  case = Case("breakdown", n_users=args.users, n_contexts=args.contexts,
              n_actions=args.actions, n_seeds=1, horizon=args.horizon)
  instance, _ = build_instance(case)
  config, preset = simulation_config(case)
  choice_model = choice_lib.get_choice_model(config.choice_model, config.top_m)
  model = learners.make_model_class(config.model_class, instance)
  learner = learners.make_learner(model, choice_model, tol=config.erm_tol,
                                  max_iterations=config.erm_max_iterations)
  truth = metrics.truth_tables(true_scores(instance), cell_weights(instance),
                               instance.reference_policy, action_major=True)  # as the kernel
  rng = np.random.default_rng(0)
  n = case.horizon
  data = learners.ChoiceData(
      jnp.asarray(rng.integers(0, case.n_contexts, n), jnp.int32),
      jnp.asarray(rng.integers(0, case.n_users, n), jnp.int32),
      jnp.asarray(rng.integers(0, case.n_actions, (n, 2)), jnp.int32),
      jnp.zeros((n, 1), jnp.int32), jnp.ones((n,), jnp.bool_))
  params = jnp.asarray(0.1 * rng.normal(size=model.param_shape), jnp.float32)
  ridge = jnp.float32(preset.ridge)
  q, m, k, p = case.dim**2, case.latent_dim, 2, case.latent_dim * case.dim**2
  grad_f = float(gradient_flops(n, case.n_users, q, m, k))
  # The same rows in a buffer of whole blocks (masked rows past n), as the simulator keeps it.
  block = config.erm_block_size
  extra = -n % block
  padded = learners.ChoiceData(*(jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
                                 for x in data))
  hess_f = grad_f + n * (2 * k * k * q + 2 * k * q * q + q * q)
  assemble_f = 2.0 * m * m * case.n_users * q * q
  cells = case.n_contexts * case.n_users
  budget = min(config.rescore_budget, cells)
  n_candidates = min(config.regret_candidates, case.n_actions)
  hessian = jax.jit(lambda w: learners._gradient_hessian(model, choice_model, w, data, ridge))
  _, hess_matrix = hessian(params)
  converged = learner.fit(params, data, ridge).params
  labels = simulate.action_labels(config, instance)
  subset = None if labels is None else metrics.action_subset(truth, learner.score_keys,
                                                             labels[0])
  visited = case.n_actions if labels is None else labels.shape[-1]
  components = [
      ("regret: every cell, every action",
       jax.jit(lambda w: metrics.factor_cell_regret(truth, learner.score_queries(w),
                                                    learner.score_keys)),
       params, float(regret_flops(cells, case.n_contexts, case.n_actions, case.n_users,
                                  case.dim, q, m))),
      (f"regret: every cell, {visited} actions that can be greedy ('full')",
       jax.jit(lambda w: metrics.factor_cell_regret(truth, learner.score_queries(w),
                                                    learner.score_keys, subset)),
       params, float(regret_flops(cells, case.n_contexts, visited, case.n_users,
                                  case.dim, q, m))),
      (f"regret cache: full re-scoring (K={n_candidates})",
       jax.jit(lambda w: metrics.rescore_all(truth, learner.score_queries(w),
                                             learner.score_keys, n_candidates)),
       params, cells * case.n_actions * 5.0 * case.dim),
      (f"regret cache: {budget} due cells (large tier)",
       jax.jit(lambda w: metrics.rescore_cells(
           truth, jnp.arange(budget) % case.n_contexts, jnp.arange(budget) % case.n_users,
           learner.score_queries(w), learner.score_keys, n_candidates)),
       params, budget * case.n_actions * 5.0 * case.dim),
      (f"regret cache: greedy among K={n_candidates} candidates, every cell",
       jax.jit(lambda w: metrics.candidate_greedy(
           learner.score_queries(w), learner.score_keys,
           jnp.zeros((n_candidates, case.n_contexts, case.n_users),
                     metrics.candidate_dtype(case.n_actions)))),
       params, cells * n_candidates * 2.0 * case.dim),
      ("ERM objective", jax.jit(lambda w: learners._objective(
          model, choice_model, w, data, ridge)), params,
       float(n * 2 * k * q + 2 * case.n_users * m * q)),
      ("ERM gradient (chord step)", jax.jit(lambda w: learners._gradient(
          model, choice_model, w, data, ridge)), params, grad_f),
      (f"ERM gradient, blocks of {block}: per-user rows", jax.jit(
          lambda w: learners._assemble(model, w, ridge, learners._over_blocks(
              padded, block, n, lambda rows: learners._per_user_gradient(
                  model, choice_model, w, rows), jnp.zeros((case.n_users, q), jnp.float32)))),
       params, grad_f),
      (f"ERM gradient, blocks of {block}: cell table", jax.jit(
          lambda w: learners._assemble(model, w, ridge, learners._cell_table_user_gradient(
              model, choice_model, w, padded, block, n))),
       params, float(gradient_flops(n, case.n_users, q, m, k, (case.n_contexts, case.dim)))),
      ("ERM gradient + Hessian", hessian, params, hess_f + assemble_f),
      ("  of which per-user Hessian assembly", jax.jit(
          lambda s: (learners.make_model_class(config.model_class, instance).embedding.T @
                     s.reshape(case.n_users, -1)).sum()),
       jnp.ones((case.n_users, q * q), jnp.float32), None),
      ("Cholesky + solve (P = m q)", jax.jit(lambda h: jax.scipy.linalg.cho_solve(
          (jnp.linalg.cholesky(h), True), jnp.ones(h.shape[0], h.dtype))), hess_matrix,
       p**3 / 3.0 + 4.0 * p * p),
      ("whole refit, cold start (zeros)", jax.jit(lambda w: learner.fit(w, data, ridge).params),
       jnp.zeros_like(params), None),
      ("whole refit, warm start at the optimum", jax.jit(
          lambda w: learner.fit(w, data, ridge).params), converged, None),
  ]
  rows = []
  for name, fn, arg, flops in components:
    if name.startswith("  of which"):
      # (m*m, U) @ (U, q*q): time the product the Hessian assembly does.
      pair = jnp.ones((m * m, case.n_users), jnp.float32)
      fn = jax.jit(lambda a, b: a @ b)
      arg, flops = (pair, jnp.ones((case.n_users, q * q), jnp.float32)), assemble_f
      call = lambda: fn(*arg)
    else:
      call = lambda: fn(arg)
    jax.block_until_ready(call())
    repeats = args.breakdown_repeats
    load_before = load1()
    batches = []
    for _ in range(5):  # best of 5 batches: the machine is shared
      cpu_start = time.process_time()
      start = time.perf_counter()
      for _ in range(repeats):
        out = call()
      jax.block_until_ready(out)
      batches.append(((time.perf_counter() - start) / repeats,
                      (time.process_time() - cpu_start) / repeats))
    seconds, cpu_seconds = min(batches)
    rows.append({"component": name, "rows": n if name.startswith(("ERM", "whole")) else "-",
                 "mflop": flops / 1e6 if flops else float("nan"), "ms": seconds * 1e3,
                 "cpu_ms": cpu_seconds * 1e3,
                 "gflops": flops / seconds / 1e9 if flops else float("nan"),
                 "load1": f"{load_before:.1f}-{load1():.1f}"})
    print(f"{name}: {seconds * 1e3:.3f} ms", flush=True)
  meta = {"machine": machine_info(), "mode": "breakdown", "case": dataclasses.asdict(case),
          "total_seconds": time.time() - started, "args": vars(args)}
  write_outputs(args.out, "breakdown", rows, meta, BREAKDOWN_COLUMNS)
  print()
  print(format_table(rows, BREAKDOWN_COLUMNS))
  print(f"\nwrote {args.out}/breakdown.csv and breakdown.json ({time.time() - started:.0f} s)")


MEMORY_COLUMNS = [("item", "item"), ("bytes per seed", "per_seed"), ("MiB", "mib"),
                  ("note", "note")]


def memory_mode(args) -> None:
  """Analytic memory of a run from the state sizes, checked against XLA's compile-time
  ``memory_analysis`` of the chunk kernel (compiled on abstract shapes, never run).

  Uses --memory-seeds x --memory-horizon at the main size (default 1024 x 10000
  with 100 users, the issue's memory target).
  """
  import jax

  from jaxbandit import simulate

  started = time.time()
  n_seeds, horizon = args.memory_seeds, args.memory_horizon
  case = Case("memory", n_users=args.users, n_contexts=args.contexts, n_actions=args.actions,
              n_seeds=n_seeds, horizon=horizon)
  instance, _ = build_instance(case)
  instances = jax.tree_util.tree_map(lambda x: x[None], instance)
  params = simulate.SimulationParams.make()
  keys = simulate.seed_keys(0, np.arange(n_seeds))
  mib = 2.0**20
  c, u, a, q, m = (case.n_contexts, case.n_users, case.n_actions, case.dim**2,
                   case.latent_dim)
  # Bradley-Terry rows: context, user (int32), slate (2 x int32), outcome (1 x int32), mask (bool).
  data_row = 4 + 4 + 2 * 4 + 1 * 4 + 1
  # The regret pass's state as the kernel carries it ('auto' on this backend), read
  # off a fresh state rather than re-derived from its layout.
  regret_state = simulate.init_state(simulate.SimulationConfig(), instance).regret_cache
  regret_state = (f"regret state ({type(regret_state).__name__})",
                  sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(regret_state)),
                  ", ".join(f"{name} {leaf.dtype} {tuple(leaf.shape)}"
                            for name, leaf in regret_state._asdict().items()))
  record = 8 * 4 + 1  # eight 4-byte fields and the bool converged flag
  items = [
      ("data buffer (horizon rows)", data_row * horizon, f"{data_row} B per row"),
      regret_state,
      ("estimate Theta (m x q)", m * q * 4, ""),
      ("carried inverse Hessian (mq x mq), estimate and gradient", ((m * q)**2 + 2 * m * q) * 4,
       "erm_hessian='carried' (the "
       "default); 0 with 'fresh'"),
      ("records (device)", record * horizon, f"{record} B per seed-round, 9 fields"),
      ("records (host buffer)", record * horizon, "one preallocated array per field; each "
       "chunk is copied into its slice (a chunk more in transit when chunked)"),
      ("cumulative regret float64", 8 * horizon, "host, SimulationResult.cumulative_regret"),
  ]
  rows = [{"item": name, "per_seed": per_seed, "mib": per_seed * n_seeds / mib, "note": note}
          for name, per_seed, note in items]
  total = sum(r["mib"] for r in rows)
  per_datum_hessian = horizon * q * q * 4
  rows.append({"item": "per-datum Hessian (n x q x q) in flight", "per_seed": per_datum_hessian,
               "mib": float("nan"),
               "note": f"map: one seed at a time, {per_datum_hessian / mib:.0f} MiB; vmap: x "
                       f"{n_seeds} seeds = {per_datum_hessian * n_seeds / mib:,.0f} MiB"})
  rows.append({"item": "total of the rows above (map)", "per_seed": "-", "mib": total,
               "note": "plus the JAX runtime (~400 MiB RSS measured) and XLA temp"})
  for batching in ("map", "vmap"):  # the package's own pre-run check
    config, _ = simulation_config(dataclasses.replace(case, seed_batching=batching))
    package = simulate.estimate_memory_bytes(config, 1, u, c, a, m * q, n_seeds, horizon,
                                             n_solver=(m * q)**2 + 2 * m * q, n_factors=case.dim)
    rows.append({"item": f"simulate.estimate_memory_bytes ({batching}, one chunk)",
                 "per_seed": "-", "mib": package["total"] / mib,
                 "note": ", ".join(f"{k} {v / mib:,.0f}" for k, v in package.items()
                                   if k != "total") + " MiB"})
  for batching, hessian in (("map", "carried"), ("vmap", "carried"), ("map", "fresh")):
    config, _ = simulation_config(dataclasses.replace(case, seed_batching=batching,
                                                      erm_hessian=hessian))
    states = jax.eval_shape(lambda: simulate.init_states(config, instances, n_seeds))
    kernel = simulate.make_chunk_kernel(config, horizon)
    start = time.perf_counter()
    try:
      compiled = kernel.lower(instances, params, keys, states,
                              simulate.action_labels(config, instances)).compile()
      stats = compiled.memory_analysis()
      note = (f"XLA: arguments {stats.argument_size_in_bytes / mib:,.0f} MiB, outputs "
              f"{stats.output_size_in_bytes / mib:,.0f} MiB, aliased "
              f"{stats.alias_size_in_bytes / mib:,.0f} MiB, temp "
              f"{stats.temp_size_in_bytes / mib:,.0f} MiB "
              f"(compiled in {time.perf_counter() - start:.0f} s)")
      value = (stats.argument_size_in_bytes + stats.output_size_in_bytes -
               stats.alias_size_in_bytes + stats.temp_size_in_bytes) / mib
    except Exception as err:  # noqa: BLE001 (report, do not fail the benchmark)
      note, value = f"compile failed: {type(err).__name__}: {str(err)[:200]}", float("nan")
    rows.append({"item": f"XLA kernel, {batching}, {hessian} Hessian: args + outputs - "
                         f"aliased + temp",
                 "per_seed": "-", "mib": value, "note": note})
    print(rows[-1]["item"], rows[-1]["note"], flush=True)
  measured = run_measurement("chunked_memory", dataclasses.replace(case, seed_batching="map"),
                             subprocess_mode=not args.in_process)
  rows.append({"item": f"measured: chunked run, peak RSS ({MEMORY_RUN_CHUNKS} chunks of "
                       f"{MEMORY_RUN_CHUNK} rounds, whole-horizon state and host records)",
               "per_seed": "-", "mib": measured["peak_mib"],
               "note": f"fresh process, map, carried Hessian; {measured['base_mib']:,.0f} MiB "
                       f"before the run (runtime, instance); {measured['seconds']:.0f} s"})
  print(rows[-1]["item"], rows[-1]["note"], flush=True)
  meta = {"machine": machine_info(), "mode": "memory", "case": dataclasses.asdict(case),
          "total_seconds": time.time() - started, "args": vars(args)}
  write_outputs(args.out, "memory", rows, meta, MEMORY_COLUMNS)
  print()
  print(f"{n_seeds} seeds x {horizon} rounds, {c} contexts x {a} actions x {u} users")
  print(format_table(rows, MEMORY_COLUMNS))
  print(f"\nwrote {args.out}/memory.csv and memory.json ({time.time() - started:.0f} s)")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="100x100 instance, 10 users, 4 seeds x 200 rounds (~1-2 min)")
  p.add_argument("--scaling", action="store_true",
                 help="sweep the horizon and the seeds; plot time against each")
  p.add_argument("--breakdown", action="store_true",
                 help="time the pieces of one round (regret, ERM gradient, Hessian, "
                      "Cholesky, whole refit) for one seed at the main size")
  p.add_argument("--breakdown-repeats", type=int, default=10)
  p.add_argument("--memory", action="store_true",
                 help="analytic memory of --memory-seeds x --memory-horizon, checked "
                      "against XLA's memory_analysis (compiles, does not run)")
  p.add_argument("--memory-seeds", type=int, default=1024)
  p.add_argument("--memory-horizon", type=int, default=10000)
  p.add_argument("--seeds", type=int, help="seeds of the main row")
  p.add_argument("--horizon", type=int, help="horizon of the main row")
  p.add_argument("--users", type=int)
  p.add_argument("--contexts", type=int)
  p.add_argument("--actions", type=int)
  p.add_argument("--reference-seeds", type=int, help="seeds the NumPy reference runs")
  p.add_argument("--variant-seeds", type=int, help="seeds of the batching/regret rows")
  p.add_argument("--variant-horizon", type=int, help="horizon of the batching/regret rows")
  p.add_argument("--scaling-horizons", default="100,200,400,800")
  p.add_argument("--scaling-seeds", default="1,2,4,8,16")
  p.add_argument("--slope-from", type=int, default=16,
                 help="fit the seeds slope over points with at least this many seeds")
  p.add_argument("--figure", action="store_true",
                 help="the paper-users preset (every population, every core) at "
                      "--figure-seeds x --figure-horizon, its run time projected to "
                      "--figure-target-seeds seeds")
  p.add_argument("--repeatability", action="store_true",
                 help="same key, same result: --seeds x --horizon run twice, then half "
                      "the seeds alone, compared bit for bit (and with --compare-to)")
  p.add_argument("--compare-to", help="a repeatability.npz saved by another machine's run")
  p.add_argument("--figure-seeds", type=int, default=4)
  p.add_argument("--figure-horizon", type=int, default=5000)
  p.add_argument("--figure-target-seeds", type=int, default=1000)
  p.add_argument("--figure-target-seconds", type=float, default=600.0)
  p.add_argument("--no-reference", action="store_true", help="skip the NumPy reference")
  p.add_argument("--no-variants", action="store_true",
                 help="the main row(s) only, without the batching/regret variant rows")
  p.add_argument("--in-process", action="store_true",
                 help="run every row in this process (peak RSS then accumulates)")
  p.add_argument("--out", default="results/bench")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  quick = args.quick or args.scaling
  defaults = dict(seeds=4 if quick else 8, horizon=200 if quick else 2000,
                  users=10 if quick else 100, contexts=100, actions=100,
                  reference_seeds=2 if quick else 1, variant_seeds=4,
                  variant_horizon=200 if quick else 500)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    worker_main(args.worker)
  elif args.scaling:
    scaling_mode(args)
  elif args.breakdown:
    breakdown_mode(args)
  elif args.memory:
    memory_mode(args)
  elif args.figure:
    figure_mode(args)
  elif args.repeatability:
    repeatability_mode(args)
  else:
    table_mode(args)


if __name__ == "__main__":
  main()
