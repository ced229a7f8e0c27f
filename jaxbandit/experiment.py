"""Experiments: a config in, a results folder out (summary.json, curves.csv, figure.png).

An :class:`ExperimentConfig` names every choice (instance sizes, problem seed
and minimum-gap acceptance, feedback, learner, slate policy, horizon, seeds).
:func:`run_experiment` builds one instance per population size from the same
problem seed, stacks them (padding with zero-weight users) and runs all of
them in one compiled call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Optional, Sequence

import jax
import numpy as np

from jaxbandit import instance as instance_lib
from jaxbandit import simulate as sim
from jaxbandit import validation as V


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Every option of one experiment (see ``docs/architecture.md`` for the meaning).

  Attributes:
    name: label written into the results.
    populations: user-population sizes, one instance (curve) each.
    n_contexts, n_actions, dim, latent_dim: instance sizes.
    reward_scale: multiplier of every true score.
    head_rank: heads confined to this rank (None: full-rank Gaussian heads).
    problem_seed: first problem seed tried by minimum-gap acceptance.
    min_gap: required Delta_min of each accepted instance.
    max_tries: bound on problem seeds tried per population.
    horizon, slate_size, choice_model, top_m, model_class, slate_policy,
      erm_tol, erm_max_iterations, record_kl: see :class:`simulate.SimulationConfig`.
    beta, ridge, mixture_weight: see :class:`simulate.SimulationParams`.
    n_seeds: Monte Carlo seeds per population.
    master_seed: base of every seed key.
    chunk_size: rounds per compiled call (None: whole horizon).
    eps0: threshold of the bad-round count N_eps0 (None: eps_iso of each instance).
    first_seed: seed ids are first_seed .. first_seed + n_seeds - 1.
    seed_batching, regret_evaluation, rescore_budget, regret_candidates,
      data_layout, erm_block_size, erm_hessian, erm_gradient: see
      :class:`simulate.SimulationConfig`.
    instance_file: a ``.npz`` holding a user-supplied instance (arrays
      ``contexts``, ``actions``, ``maps``, ``heads`` and optionally
      ``reward_scale``, ``context_weights``, ``user_weights``,
      ``reference_policy``; see :func:`instance.from_arrays`). It replaces the
      generated instances: ``populations`` must then be the heads' row count,
      and min-gap acceptance only checks the file's instance.
  """

  name: str = "custom"
  populations: Sequence[int] = (10, 50, 100)
  n_contexts: int = 100
  n_actions: int = 100
  dim: int = 5
  latent_dim: int = 10
  reward_scale: float = 1.0
  head_rank: Optional[int] = None
  problem_seed: int = 1000
  min_gap: float = 0.0
  max_tries: int = 200
  horizon: int = 1000
  slate_size: int = 2
  choice_model: str = "bradley_terry"
  top_m: Optional[int] = None
  model_class: str = "known_heads"
  slate_policy: str = "current_reference"
  erm_tol: float = 1e-12
  erm_max_iterations: int = 30
  record_kl: bool = False
  beta: float = 1.0
  ridge: float = 1.0
  mixture_weight: float = 0.5
  n_seeds: int = 32
  master_seed: int = 0
  chunk_size: Optional[int] = None
  eps0: Optional[float] = None
  first_seed: int = 0
  seed_batching: str = "auto"
  regret_evaluation: str = "auto"
  rescore_budget: int = 512
  regret_candidates: int = 8
  data_layout: str = "buffer"
  erm_block_size: int = 256
  erm_hessian: str = "carried"
  erm_gradient: str = "auto"
  instance_file: Optional[str] = None

  def simulation_config(self) -> sim.SimulationConfig:
    """The static :class:`simulate.SimulationConfig`: every one of its fields, taken from here."""
    return sim.SimulationConfig(**{field.name: getattr(self, field.name)
                                   for field in dataclasses.fields(sim.SimulationConfig)})

  def validate(self) -> "ExperimentConfig":
    """Checks every field on the host, before anything compiles."""
    if isinstance(self.populations, (str, bytes)) or len(self.populations) == 0:
      raise ValueError(f"populations={self.populations!r} is not allowed; allowed: a non-empty "
                       f"list of positive integers")
    for size in self.populations:
      V.positive_int("populations[]", size)
    for name in ("n_contexts", "n_actions", "dim", "latent_dim", "max_tries", "n_seeds"):
      V.positive_int(name, getattr(self, name))
    V.seed("problem_seed", self.problem_seed, self.max_tries, "max_tries")
    V.seed("master_seed", self.master_seed)
    V.seed("first_seed", self.first_seed, self.n_seeds, "n_seeds")
    if self.instance_file is not None and not isinstance(self.instance_file, str):
      raise ValueError(f"instance_file={self.instance_file!r} is not allowed; allowed: a path "
                       f"to a .npz file")
    V.positive_float("reward_scale", self.reward_scale)
    V.non_negative_float("min_gap", self.min_gap)
    if self.head_rank is not None:
      V.int_in_range("head_rank", self.head_rank, 1, self.latent_dim,
                     f"latent_dim={self.latent_dim}")
    if self.eps0 is not None:
      V.positive_float("eps0", self.eps0)
    if self.chunk_size is not None:
      V.int_in_range("chunk_size", self.chunk_size, 1, max(self.horizon, 1),
                     f"horizon={self.horizon}")
    self.simulation_config().validate(self.n_actions, self.n_actions)
    sim.SimulationParams.make(self.beta, self.ridge, self.mixture_weight)
    return self

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out["populations"] = list(self.populations)
    return out


def build_instances(config: ExperimentConfig):
  """One accepted instance per population size, all from ``config.problem_seed``."""
  if config.instance_file is not None:
    return [_instance_from_file(config)]
  heads = (instance_lib.low_rank_heads(config.head_rank) if config.head_rank is not None
           else instance_lib.gaussian_heads())
  accepted = []
  for n_users in config.populations:
    accepted.append(instance_lib.accept_problem_seed(
        config.problem_seed, min_gap=config.min_gap, max_tries=config.max_tries,
        n_contexts=config.n_contexts, n_actions=config.n_actions, dim=config.dim,
        latent_dim=config.latent_dim, n_users=n_users, reward_scale=config.reward_scale,
        heads=heads))
  return accepted


def _instance_from_file(config: ExperimentConfig):
  try:
    with np.load(config.instance_file) as data:
      arrays = {key: data[key] for key in data.files}
  except (OSError, ValueError) as err:
    raise ValueError(f"instance_file={config.instance_file!r} could not be read ({err}); "
                     f"allowed: a .npz written with numpy.savez") from None
  allowed = {"contexts", "actions", "maps", "heads", "reward_scale", "context_weights",
             "user_weights", "reference_policy"}
  unknown = sorted(set(arrays) - allowed)
  missing = sorted({"contexts", "actions", "maps", "heads"} - set(arrays))
  if unknown or missing:
    raise ValueError(f"instance_file={config.instance_file!r} has arrays {sorted(arrays)}; "
                     f"allowed: contexts, actions, maps, heads (required) and reward_scale, "
                     f"context_weights, user_weights, reference_policy")
  if "reward_scale" in arrays:
    arrays["reward_scale"] = float(arrays["reward_scale"])
  inst = instance_lib.from_arrays(**arrays)
  if tuple(config.populations) != (inst.n_users,):
    raise ValueError(f"populations={list(config.populations)} does not match instance_file's "
                     f"{inst.n_users} users; allowed: populations = [{inst.n_users}]")
  gap = instance_lib.gap_summary(inst)
  if gap.min_gap < config.min_gap:
    raise ValueError(f"min_gap={config.min_gap} is not reached by instance_file (its Delta_min "
                     f"is {gap.min_gap:.3g}); allowed: min_gap <= {gap.min_gap:.3g}")
  return instance_lib.AcceptedInstance(inst, -1, 1, gap)


def t_interval(samples: np.ndarray, level: float = 0.95, axis: int = 0):
  """Mean and Student-t interval across ``axis`` (:func:`stats.mean_confidence_band`).

  Returns ``(mean, lower, upper)`` with ``axis`` removed (NumPy scalars for a
  1-D input); with one sample the interval collapses to the mean.
  """
  from jaxbandit import stats

  samples = np.moveaxis(np.asarray(samples, np.float64), axis, 0)
  rest = samples.shape[1:]
  band = stats.mean_confidence_band(samples.reshape(samples.shape[0], -1), level=level)
  return tuple(np.asarray(x).reshape(rest)[()] for x in (band.mean, band.lower, band.upper))


def environment_info() -> dict:
  import jaxbandit

  device = jax.devices()[0]
  return {
      "jaxbandit": jaxbandit.__version__,
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
      "numpy": np.__version__,
      "python": platform.python_version(),
      "platform": platform.platform(),
      "backend": jax.default_backend(),
      "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
      "device_count": jax.device_count(),
  }


class RunInterrupted(Exception):
  """Raised when a run stopped on SIGINT/SIGTERM after writing its checkpoint."""


def run_experiment(config: ExperimentConfig, out_dir: Optional[str] = None, *,
                   progress: bool = True, make_figure: bool = True,
                   resume: bool = False) -> dict:
  """Runs an experiment and (if ``out_dir``) writes config.toml, summary.json, curves.csv
  and figure.png/pdf.

  With ``out_dir`` the state is checkpointed atomically after every chunk
  (``chunk_size`` rounds); SIGINT or SIGTERM stop the run after the current
  chunk with the checkpoint written, and ``resume=True`` continues from it
  with results bit-identical to an uninterrupted run.

  Returns:
    The summary dictionary, with the NumPy records under the key ``"_records"``
    (not written to disk).

  Raises:
    ValueError: bad config, unwritable folder, or a checkpoint from another config.
    RunInterrupted: stopped by a signal (the checkpoint is on disk).
  """
  from jaxbandit import config_io

  config.validate()
  if out_dir is not None:
    _prepare_out_dir(out_dir)
    config_path = os.path.join(out_dir, config_io.CONFIG_FILE)
    if resume:
      if not os.path.exists(config_path):
        raise ValueError(f"resume={out_dir!r} holds no {config_io.CONFIG_FILE}; allowed: a "
                         f"results folder written by 'jaxbandit run'")
      saved = config_io.load_config(config_path)
      if config_io.config_fingerprint(saved) != config_io.config_fingerprint(config):
        raise ValueError(f"resume={out_dir!r} was made by a different config; allowed: the "
                         f"folder's own {config_io.CONFIG_FILE} (run 'jaxbandit run --resume "
                         f"{out_dir}' alone)")
    else:
      stale = os.path.join(out_dir, config_io.CHECKPOINT_FILE)
      if os.path.exists(stale):
        os.remove(stale)
      _atomic_write(config_path, config_io.config_to_toml(config))
  elif resume:
    raise ValueError("resume=True needs out_dir; allowed: the results folder to resume")
  started = time.time()
  accepted = build_instances(config)
  stacked = instance_lib.stack_instances([a.instance for a in accepted])
  sim_config = config.simulation_config()
  params = sim.SimulationParams.make(config.beta, config.ridge, config.mixture_weight)
  resume_from = None
  if resume:
    template = sim.init_states(sim_config, stacked, config.n_seeds)
    resume_from = config_io.load_checkpoint(out_dir, config, template)
    if resume_from is None and os.path.exists(os.path.join(out_dir, "summary.json")):
      raise ValueError(f"resume={out_dir!r} is already complete (summary.json written, no "
                       f"checkpoint left); allowed: a folder whose run was interrupted")
  reporter = _Progress(config, enabled=progress,
                       start_round=resume_from.rounds_done if resume_from else 0)
  stop = _StopOnSignal()

  def between_chunks(state: sim.Progress) -> bool:
    reporter(state.rounds_done, state.horizon)
    if out_dir is not None and state.rounds_done < state.horizon:
      config_io.save_checkpoint(out_dir, config, state)
    return stop.requested

  with stop:
    result = sim.simulate(stacked, sim_config, params, n_seeds=config.n_seeds,
                          master_seed=config.master_seed, first_seed=config.first_seed,
                          chunk_size=config.chunk_size,
                          callback=between_chunks, resume_from=resume_from)
  if result.rounds_done < config.horizon:
    raise RunInterrupted(f"stopped after round {result.rounds_done} of {config.horizon}; "
                         f"continue with: jaxbandit run --resume {out_dir}")
  elapsed = time.time() - started
  summary = summarize(config, accepted, result.records, elapsed)
  summary["_records"] = result.records
  if out_dir is not None:
    write_results(out_dir, config, summary, result.records, make_figure=make_figure)
    checkpoint = os.path.join(out_dir, config_io.CHECKPOINT_FILE)
    if os.path.exists(checkpoint):
      os.remove(checkpoint)
  return summary


class _StopOnSignal:
  """Turns SIGINT/SIGTERM into a request to stop after the current chunk."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    self.requested = True
    print(f"\n  signal {signum}: stopping after this chunk (checkpoint follows)", flush=True)

  def __enter__(self):
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc):
    import signal

    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class _Progress:
  """Prints rounds done, seed-rounds per second and time left between chunks."""

  def __init__(self, config: ExperimentConfig, enabled: bool, start_round: int = 0):
    self.enabled = enabled
    self.start = time.time()
    self.start_round = start_round
    self.per_round = config.n_seeds * len(config.populations)

  def __call__(self, done, horizon):
    if not self.enabled:
      return
    elapsed = time.time() - self.start
    rate = (done - self.start_round) * self.per_round / max(elapsed, 1e-9)
    left = (horizon - done) * self.per_round / max(rate, 1e-9)
    width = 30
    filled = int(width * done / max(horizon, 1))
    bar = "#" * filled + "." * (width - filled)
    print(f"  [{bar}] rounds {done}/{horizon}  {rate:,.0f} seed-rounds/s  "
          f"elapsed {elapsed:,.0f}s  left ~{left:,.0f}s", flush=True)


def summarize(config: ExperimentConfig, accepted, records: sim.RoundRecord,
              elapsed: float) -> dict:
  """Summary statistics per population (JSON-ready)."""
  regret = records.regret.astype(np.float64)  # (P, S, T)
  cumulative = np.cumsum(regret, axis=-1)
  populations = []
  for p, acc in enumerate(accepted):
    mean, lower, upper = t_interval(cumulative[p, :, -1])
    eps0 = config.eps0 if config.eps0 is not None else acc.gap.eps_iso
    bad_rounds = np.sum(regret[p] >= eps0, axis=-1)
    bad_mean, bad_lower, bad_upper = t_interval(bad_rounds)
    tail = regret[p, :, -max(1, config.horizon // 5):].mean(axis=-1)
    tail_mean, tail_lower, tail_upper = t_interval(tail)
    diversity = instance_lib.diversity_diagnostics(acc.instance)
    populations.append({
        "n_users": int(config.populations[p]),
        "accepted_seed": int(acc.seed),
        "seeds_tried": int(acc.tries),
        "min_gap": acc.gap.min_gap,
        "eps_iso": acc.gap.eps_iso,
        "diversity": diversity.to_dict(),
        "final_cumulative_regret": {"mean": float(mean), "lower95": float(lower),
                                    "upper95": float(upper)},
        "tail_per_round_regret": {"mean": float(tail_mean), "lower95": float(tail_lower),
                                  "upper95": float(tail_upper),
                                  "rounds": int(max(1, config.horizon // 5))},
        "bad_rounds": {"eps0": float(eps0), "mean": float(bad_mean),
                       "lower95": float(bad_lower), "upper95": float(bad_upper)},
        "erm_converged_fraction": float(np.mean(records.erm_converged[p])),
        "erm_not_converged_rounds": int(np.sum(~records.erm_converged[p])),
        "erm_mean_iterations": float(np.mean(records.erm_iterations[p])),
        "erm_max_grad_norm": float(np.max(records.erm_grad_norm[p])),
        "growth": growth_statistics(regret[p], eps0),
    })
    if config.record_kl:
      kl_cumulative = np.cumsum(records.kl_regret[p].astype(np.float64), axis=-1)[:, -1]
      m, lo, hi = t_interval(kl_cumulative)
      populations[-1]["final_cumulative_kl_regret"] = {"mean": float(m), "lower95": float(lo),
                                                       "upper95": float(hi)}
  return {
      "experiment": config.name,
      "config": config.to_dict(),
      "environment": environment_info(),
      "seconds": elapsed,
      "seed_rounds_per_second": config.n_seeds * len(config.populations) * config.horizon /
                                max(elapsed, 1e-9),
      "populations": populations,
  }


def growth_statistics(per_round: np.ndarray, eps0: Optional[float] = None) -> dict:
  """``stats.summarize_growth`` of one population's per-round regret (n_seeds, horizon).

  The growth verdict (bounded / logarithmic / faster) with its evidence, as a
  JSON-ready dict; ``{"verdict": None, "reason": ...}`` when the horizon is
  too short for the fit window (fewer than 8 rounds).
  """
  from jaxbandit import stats

  per_round = np.asarray(per_round, np.float64)
  eps0 = float(eps0) if eps0 is not None and np.isfinite(eps0) and eps0 > 0 else None
  try:
    return stats.summarize_growth(np.cumsum(per_round, axis=-1), per_round, eps0,
                                  n_bootstrap=1000, seed=0)
  except ValueError as err:
    return {"verdict": None, "conclusive": False, "reason": str(err)}


def curves_table(config: ExperimentConfig, records: sim.RoundRecord):
  """Rows (round, n_users, mean, lower, upper) of mean cumulative regret with 95% bands."""
  cumulative = np.cumsum(records.regret.astype(np.float64), axis=-1)
  rounds = np.arange(1, config.horizon + 1)
  rows = []
  for p, n_users in enumerate(config.populations):
    mean, lower, upper = t_interval(cumulative[p], axis=0)
    for t in range(config.horizon):
      rows.append((int(rounds[t]), int(n_users), mean[t], lower[t], upper[t]))
  return rows


def _prepare_out_dir(out_dir: str) -> None:
  try:
    os.makedirs(out_dir, exist_ok=True)
    probe = os.path.join(out_dir, ".write-test")
    with open(probe, "w") as handle:
      handle.write("ok")
    os.remove(probe)
  except OSError as err:
    raise ValueError(f"out={out_dir!r} cannot be written ({err.strerror}); allowed: a folder "
                     f"this user can create and write") from None


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as handle:
    handle.write(text)
  os.replace(tmp, path)


def write_results(out_dir: str, config: ExperimentConfig, summary: dict,
                  records: sim.RoundRecord, make_figure: bool = True) -> None:
  """Writes summary.json, curves.csv and (optionally) figure.png/pdf into ``out_dir``."""
  public = {k: v for k, v in summary.items() if not k.startswith("_")}
  _atomic_write(os.path.join(out_dir, "summary.json"), json.dumps(public, indent=2) + "\n")
  lines = ["round,n_users,mean,lower,upper"]
  lines += [f"{t},{u},{m:.9g},{lo:.9g},{hi:.9g}" for t, u, m, lo, hi in
            curves_table(config, records)]
  _atomic_write(os.path.join(out_dir, "curves.csv"), "\n".join(lines) + "\n")
  if make_figure:
    from jaxbandit import plotting

    plotting.cumulative_regret_figure(os.path.join(out_dir, "curves.csv"),
                                      os.path.join(out_dir, "figure.png"),
                                      title=config.name)


# ---------------------------------------------------------------------------
# Sweeps: a grid over one traced parameter, compiled once
# ---------------------------------------------------------------------------

SWEEPABLE = {
    "beta": "softened-policy temperature (traced)",
    "ridge": "ERM ridge penalty (traced)",
    "mixture_weight": "mixture slate weight (traced)",
    "reward_scale": "true-score scale (instance array, traced)",
    "head_rank": "rank of the heads (instance array, traced)",
    "min_gap": "minimum-gap acceptance threshold (instance array, traced)",
    "problem_seed": "first problem seed tried (instance array, traced)",
}


def run_sweep(config: ExperimentConfig, parameter: str, values, out_dir: Optional[str] = None,
              *, progress: bool = True) -> dict:
  """Runs ``config`` for every value of ``parameter``, all in ONE compiled call.

  Every (value, population) pair is one lane of the kernel's population axis:
  instance-level parameters give each lane its own instance arrays (same
  shapes), simulation parameters give each lane its own traced value, so the
  grid costs one compilation whatever its size.

  Writes ``sweep.csv`` (value, n_users, final mean cumulative regret and its
  95% interval, tail per-round regret), ``curves.csv`` (with a ``value``
  column), ``config.toml``, ``summary.json`` and ``figure.png``/``.pdf``
  (final cumulative regret against the value, one line per population).
  """
  from jaxbandit import config_io

  V.one_of("parameter", parameter, sorted(SWEEPABLE))
  values = list(values)
  if not values:
    raise ValueError("values is empty; allowed: at least one value")
  configs = [dataclasses.replace(config, **{parameter: value}).validate() for value in values]
  if out_dir is not None:
    _prepare_out_dir(out_dir)
    _atomic_write(os.path.join(out_dir, config_io.CONFIG_FILE),
                  config_io.config_to_toml(config) +
                  f"# swept: {parameter} = {values!r}\n")
  started = time.time()
  accepted, betas, ridges, mixtures, lane_labels = [], [], [], [], []
  for value, cfg in zip(values, configs):
    for acc in build_instances(cfg):
      accepted.append(acc)
      betas.append(cfg.beta)
      ridges.append(cfg.ridge)
      mixtures.append(cfg.mixture_weight)
    lane_labels += [(value, n) for n in cfg.populations]
  stacked = instance_lib.stack_instances([a.instance for a in accepted])
  params = sim.SimulationParams(np.asarray(betas, np.float32), np.asarray(ridges, np.float32),
                                np.asarray(mixtures, np.float32))
  reporter = _Progress(config, enabled=progress)
  reporter.per_round *= len(values)
  result = sim.simulate(stacked, config.simulation_config(), params, n_seeds=config.n_seeds,
                        master_seed=config.master_seed, first_seed=config.first_seed,
                        chunk_size=config.chunk_size,
                        callback=lambda p: reporter(p.rounds_done, p.horizon))
  elapsed = time.time() - started
  cumulative = np.cumsum(result.records.regret.astype(np.float64), axis=-1)
  tail = max(1, config.horizon // 5)
  rows = []
  for lane, (value, n_users) in enumerate(lane_labels):
    mean, lower, upper = t_interval(cumulative[lane, :, -1])
    tail_mean, tail_lower, tail_upper = t_interval(
        result.records.regret[lane, :, -tail:].astype(np.float64).mean(axis=-1))
    rows.append({"value": value, "n_users": int(n_users), "accepted_seed": accepted[lane].seed,
                 "min_gap": accepted[lane].gap.min_gap, "final_mean": float(mean),
                 "final_lower95": float(lower), "final_upper95": float(upper),
                 "tail_mean": float(tail_mean), "tail_lower95": float(tail_lower),
                 "tail_upper95": float(tail_upper),
                 "erm_converged_fraction": float(np.mean(result.records.erm_converged[lane]))})
  summary = {"experiment": config.name, "swept": parameter, "values": values,
             "config": config.to_dict(), "environment": environment_info(),
             "seconds": elapsed, "lanes": rows, "_records": result.records}
  if out_dir is not None:
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    _atomic_write(os.path.join(out_dir, "summary.json"), json.dumps(public, indent=2) + "\n")
    keys = list(rows[0])
    _atomic_write(os.path.join(out_dir, "sweep.csv"),
                  "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys)
                                                for r in rows]) + "\n")
    lines = ["value,round,n_users,mean,lower,upper"]
    for lane, (value, n_users) in enumerate(lane_labels):
      mean, lower, upper = t_interval(cumulative[lane], axis=0)
      lines += [f"{value},{t + 1},{n_users},{mean[t]:.9g},{lower[t]:.9g},{upper[t]:.9g}"
                for t in range(config.horizon)]
    _atomic_write(os.path.join(out_dir, "curves.csv"), "\n".join(lines) + "\n")
    from jaxbandit import plotting

    plotting.sweep_figure(rows, parameter, os.path.join(out_dir, "figure.png"),
                          title=f"{config.name}: sweep over {parameter}")
  return summary
