"""The science issue's named experiments: each writes summary.json, curves.csv, figure.png/pdf.

One function per experiment, each taking a ``scale`` (``"tiny"`` for tests,
``"small"`` for notebooks, ``"default"`` for ``jaxbandit run --preset NAME``)
and ``overrides`` (``n_seeds``, ``horizon``, ... applied last), or an explicit
base ``config`` (the CLI passes the preset with its ``--seeds/--horizon``
overrides already applied):

===========================  ==================================================
name                         what it measures
===========================  ==================================================
paper-users                  P1's figure, with a log-x companion panel and the
                             growth verdict of every population
diversity-rank               heads of rank r in {1, 2, 5, 8, 10} (J = 10) under
                             current+reference and on-policy top-2 slates
offline-sample-complexity    P(G(R_hat_n) > 0) and E G(R_hat_n) after n i.i.d.
                             reference slates, with the exponential decay rate
temperature-zero-vs-kl       cumulative temperature-zero versus KL-regularised
                             regret of the training policy, beta in {0.1, 1}
personalized-vs-pooled       known-heads, per-user bilinear and pooled learners
                             on one instance
===========================  ==================================================

:func:`sensitivity` re-runs the known-heads result with one choice (reward
scale, min_gap, beta, ridge, horizon) moved at a time.

Every growth verdict comes from :func:`jaxbandit.stats.summarize_growth`
(seed-bootstrap intervals); the reading of each figure is in
``docs/experiments.md``. Every run's base config is a preset in
:mod:`jaxbandit.presets`, so the adopted choices (beta, reward scale,
min_gap, ridge, horizon, seeds) are listed by ``jaxbandit presets`` and
written into each ``summary.json``.

References:
  E. H. Kang, Personalized Alignment Revisited (arXiv 2605.09119), 2026.
  E. H. Kang, Demystifying the Unreasonable Effectiveness of Online Alignment
  Methods (arXiv 2604.17207), 2026.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

from jaxbandit import experiment
from jaxbandit import instance as instance_lib
from jaxbandit import stats
from jaxbandit import validation as V

SCALES = ("tiny", "small", "default")

# Environment variable that makes every notebook run at the "tiny" scale (CI).
NOTEBOOK_SMALL_ENV = "JAXBANDIT_NOTEBOOK_SMALL"

# Tiny sizes (tests): every experiment shares them so a test run stays in seconds.
_TINY = dict(populations=(3,), n_contexts=4, n_actions=5, dim=2, latent_dim=4, problem_seed=0,
             min_gap=0.0, horizon=16, n_seeds=4, chunk_size=None)

# Growth statistics settings used throughout (stats.summarize_growth defaults).
GROWTH_SETTINGS = dict(start_fraction=0.5, tail_fraction=0.2, n_bootstrap=1000, level=0.95,
                       seed=0)

HEAD_RANKS = (1, 2, 5, 8, 10)
DIVERSITY_SLATE_POLICIES = ("current_reference", "top_k")
KL_BETAS = (0.1, 1.0)
MODEL_CLASSES = ("known_heads", "per_user_bilinear", "pooled")

_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")


def notebook_scale() -> str:
  """``"tiny"`` when ``JAXBANDIT_NOTEBOOK_SMALL`` is set (CI), else ``"small"``."""
  return "tiny" if os.environ.get(NOTEBOOK_SMALL_ENV, "") not in ("", "0") else "small"


def base_config(name: str, scale: str = "default", overrides: Optional[dict] = None):
  """The base :class:`ExperimentConfig` of experiment ``name`` at ``scale``.

  ``"default"`` is the preset itself; ``"small"`` quarters the seed-rounds
  (notebooks, about a minute); ``"tiny"`` shrinks the instance to 4 contexts x
  5 actions, d=2, J=4, 3 users, 16 rounds, 4 seeds (tests, seconds).
  ``overrides`` (non-None values) are applied last.
  """
  from jaxbandit import presets

  V.one_of("experiment", name, sorted(EXPERIMENTS))
  V.one_of("scale", scale, SCALES)
  config = presets.get_preset(name)
  if scale == "small":
    config = dataclasses.replace(config, horizon=max(16, config.horizon // 2),
                                 n_seeds=max(4, config.n_seeds // 2), chunk_size=None)
    if name == "paper-users":
      config = dataclasses.replace(config, n_contexts=20, n_actions=20, horizon=300, n_seeds=8,
                                   populations=(10, 50, 100), min_gap=0.0)
  elif scale == "tiny":
    config = dataclasses.replace(config, **_TINY)
  if overrides:
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
  if config.chunk_size is not None and config.chunk_size > config.horizon:
    config = dataclasses.replace(config, chunk_size=config.horizon)
  return config.validate()


# ---------------------------------------------------------------------------
# Statistics helpers
# ---------------------------------------------------------------------------


def growth_summary(per_round: np.ndarray, eps0: Optional[float] = None) -> dict:
  """``stats.summarize_growth`` of one batch of per-round regret curves (S, T).

  Returns the JSON-ready dict, or ``{"verdict": None, "reason": ...}`` when
  the horizon is too short for the fit window (fewer than 8 rounds).
  """
  per_round = np.asarray(per_round, np.float64)
  cumulative = np.cumsum(per_round, axis=-1)
  eps0 = float(eps0) if eps0 is not None and eps0 > 0 and math.isfinite(eps0) else None
  try:
    return stats.summarize_growth(cumulative, per_round, eps0, **GROWTH_SETTINGS)
  except ValueError as err:
    return {"verdict": None, "conclusive": False, "reason": str(err)}


def plateau_evidence(per_round: np.ndarray, tail_fraction: float = 0.2) -> dict:
  """Direct evidence of a plateau: rounds with exactly zero temperature-zero regret.

  G(R) is either 0 or at least eps_iso, so a seed whose regret is exactly 0
  over the whole tail has (for now) stopped accruing regret. Complements the
  growth verdict, whose fit window starts at T/2 and can still contain a
  seed's last bad rounds.

  Returns:
    ``seeds_zero_in_tail`` (fraction of seeds with G = 0 over the last
    ``tail_fraction`` of rounds), ``zero_rounds_in_tail`` (fraction of tail
    (seed, round) pairs with G = 0), ``last_positive_round`` (mean and max over
    seeds of the last round with G > 0; 0 when never positive).
  """
  per_round = np.asarray(per_round, np.float64)
  n_tail = max(1, math.ceil(tail_fraction * per_round.shape[-1] - 1e-9))
  tail = per_round[:, -n_tail:]
  positive = per_round > 0
  last = np.where(positive.any(axis=1),
                  per_round.shape[1] - np.argmax(positive[:, ::-1], axis=1), 0)
  return {"tail_rounds": int(n_tail),
          "seeds_zero_in_tail": float(np.mean(np.all(tail == 0, axis=1))),
          "zero_rounds_in_tail": float(np.mean(tail == 0)),
          "last_positive_round": {"mean": float(last.mean()), "max": int(last.max())}}


def verdict_label(growth: dict) -> str:
  """Short legend text: ``"bounded"``, ``"logarithmic?"`` (inconclusive), ..."""
  verdict = growth.get("verdict")
  if verdict is None:
    return "no verdict"
  return verdict + ("" if growth.get("conclusive") else "?")


def clopper_pearson(successes, trials: int, level: float = 0.95):
  """Exact binomial interval(s) for ``successes`` out of ``trials``."""
  from scipy import stats as scipy_stats

  successes = np.asarray(successes, np.float64)
  alpha = 1.0 - level
  lower = np.where(successes > 0,
                   scipy_stats.beta.ppf(alpha / 2, successes, trials - successes + 1), 0.0)
  upper = np.where(successes < trials,
                   scipy_stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes), 1.0)
  return lower, upper


def log_grid(max_n: int, points: int = 16) -> np.ndarray:
  """Unique integers ``1 <= n <= max_n`` spaced evenly in ``log n``."""
  V.positive_int("max_n", max_n)
  return np.unique(np.round(np.geomspace(1, max_n, points)).astype(np.int64))


def fit_exponential_decay(positive: np.ndarray, grid: np.ndarray, *, level: float = 0.95,
                          n_bootstrap: int = 1000, seed: int = 0) -> dict:
  """Fits ``P(G > 0) ~ C exp(-rate n)`` by least squares of ``log P`` on ``n``.

  The window is the grid points where the estimated probability is strictly
  between 0 and 1 (the only points that carry information on the slope);
  ``P`` is continuity-corrected, ``(k + 1/2) / (S + 1)``, so that bootstrap
  replicates with a zero count stay finite. Seeds are the independent units:
  the records at different ``n`` of one seed come from one stream of data, so
  the interval is a seed-bootstrap percentile interval.

  Args:
    positive: (n_seeds, n_grid) bool, ``G(R_hat_n) > 0`` per seed and grid point.
    grid: (n_grid,) sample sizes ``n``.
    level, n_bootstrap, seed: interval level, replicates, bootstrap seed.

  Returns:
    A JSON-ready dict: ``rate`` (per sample), ``rate_lower``/``rate_upper``,
    ``intercept``, ``n_for_probability_0.05`` (``log(C / 0.05) / rate``),
    ``window`` (the n used) and ``n_points``; the rate is None with a
    ``reason`` when fewer than 3 informative grid points exist.
  """
  positive = np.asarray(positive, bool)
  grid = np.asarray(grid, np.float64)
  n_seeds = positive.shape[0]
  counts = positive.sum(axis=0)
  window = (counts > 0) & (counts < n_seeds)
  out = {"window": grid[window].astype(int).tolist(), "n_points": int(window.sum()),
         "level": level, "n_bootstrap": n_bootstrap, "seed": seed, "n_seeds": int(n_seeds)}
  if window.sum() < 3:
    out.update(rate=None, rate_lower=None, rate_upper=None, intercept=None,
               reason=f"only {int(window.sum())} grid points with 0 < P(G>0) < 1; need 3")
    return out
  x = grid[window]

  def slope_intercept(k):
    y = np.log((k + 0.5) / (n_seeds + 1.0))
    slope, intercept = np.polyfit(x, y, 1)
    return slope, intercept

  slope, intercept = slope_intercept(counts[window].astype(np.float64))
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds))
  boot = np.array([slope_intercept(positive[d][:, window].sum(axis=0).astype(np.float64))[0]
                   for d in draws])
  lo, hi = np.percentile(-boot, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
  rate = -slope
  out.update(rate=float(rate), rate_lower=float(lo), rate_upper=float(hi),
             intercept=float(intercept),
             **{"n_for_probability_0.05": float((intercept - math.log(0.05)) / rate)
                if rate > 0 else None})
  return out


def _band(per_seed: np.ndarray):
  return experiment.t_interval(np.asarray(per_seed, np.float64), axis=0)


def _curve_entry(label: str, per_round: np.ndarray, eps0: Optional[float] = None,
                 **keys) -> tuple[dict, list]:
  """Summary entry and curves.csv rows for one batch of per-round curves (S, T)."""
  cumulative = np.cumsum(np.asarray(per_round, np.float64), axis=-1)
  mean, lower, upper = _band(cumulative)
  growth = growth_summary(per_round, eps0)
  entry = {"curve": label, **keys,
           "final_cumulative_regret": {"mean": float(mean[-1]), "lower95": float(lower[-1]),
                                       "upper95": float(upper[-1])},
           "verdict": growth.get("verdict"), "conclusive": growth.get("conclusive"),
           "growth": growth, "plateau": plateau_evidence(per_round)}
  key_values = [str(v) for v in keys.values()]
  rows = [[label, *key_values, str(t + 1), f"{mean[t]:.9g}", f"{lower[t]:.9g}",
           f"{upper[t]:.9g}"] for t in range(cumulative.shape[1])]
  return entry, rows


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _write(out_dir: str, summary: dict, key_names: Sequence[str], rows: list,
           draw: Callable[[str], None]) -> None:
  experiment._prepare_out_dir(out_dir)
  public = {k: v for k, v in summary.items() if not k.startswith("_")}
  experiment._atomic_write(os.path.join(out_dir, "summary.json"),
                           json.dumps(public, indent=2) + "\n")
  header = ",".join(["curve", *key_names, "round", "mean", "lower", "upper"])
  experiment._atomic_write(os.path.join(out_dir, "curves.csv"),
                           "\n".join([header] + [",".join(r) for r in rows]) + "\n")
  draw(os.path.join(out_dir, "figure.png"))


def _save(fig, out_png: str) -> None:
  from jaxbandit import plotting

  plotting.save_figure(fig, out_png)


def _plot_curve(ax, band, colour, label, linestyle="-"):
  """Plots one (rounds, mean, lower, upper) band of cumulative regret."""
  rounds, mean, lower, upper = band
  ax.plot(rounds, mean, color=colour, lw=1.6, ls=linestyle, label=label)
  ax.fill_between(rounds, lower, upper, color=colour, alpha=0.2, lw=0)


def read_bands(curves_csv: str) -> dict:
  """A science ``curves.csv`` -> ``{curve label: (rounds, mean, lower, upper)}``."""
  import csv
  from collections import defaultdict

  columns = defaultdict(lambda: ([], [], [], []))
  with open(curves_csv, newline="") as handle:
    for row in csv.DictReader(handle):
      entry = columns[row["curve"]]
      for slot, key in enumerate(("round", "mean", "lower", "upper")):
        entry[slot].append(float(row[key]))
  return {k: tuple(np.asarray(v) for v in vals) for k, vals in columns.items()}


def _bands(per_round: dict) -> dict:
  out = {}
  for label, data in per_round.items():
    cumulative = np.cumsum(np.asarray(data, np.float64), axis=-1)
    out[label] = (np.arange(1, cumulative.shape[-1] + 1), *_band(cumulative))
  return out


def _header(name: str, config, started: float) -> dict:
  return {"experiment": name, "config": config.to_dict(),
          "environment": experiment.environment_info(), "seconds": time.time() - started,
          "growth_settings": dict(GROWTH_SETTINGS)}


def _resolve(name, scale, overrides, config):
  if config is not None:
    return config.validate()
  return base_config(name, scale, overrides)


# ---------------------------------------------------------------------------
# 1. paper-users: publication figure and growth verdicts
# ---------------------------------------------------------------------------


def publication_figure(curves_csv: str, summary: dict, out_png: str, title: str = "") -> None:
  """Two panels (linear and log round axis), one curve per population, the growth
  verdict of each population in the legend.

  Args:
    curves_csv: a ``curves.csv`` written by :func:`experiment.write_results`.
    summary: its ``summary.json`` (populations carry ``"growth"``).
    out_png: output path; a ``.pdf`` twin is written beside it.
  """
  import matplotlib.pyplot as plt

  from jaxbandit import plotting

  curves = plotting.read_curves(curves_csv)
  verdicts = {p["n_users"]: p.get("growth", {}) for p in summary.get("populations", [])}
  fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=150)
  for index, (n_users, (rounds, mean, lower, upper)) in enumerate(curves.items()):
    colour = plotting.colour_for(n_users, index)
    growth = verdicts.get(n_users, {})
    tail = growth.get("tail", {}) or {}
    label = f"U = {n_users}: {verdict_label(growth)}"
    if tail.get("mean") is not None:
      label += f" (tail {tail['mean']:.3g}/round)"
    for ax in axes:
      ax.plot(rounds, mean, color=colour, lw=1.6, label=label)
      ax.fill_between(rounds, lower, upper, color=colour, alpha=0.25, lw=0)
  axes[1].set_xscale("log")
  for ax, what in zip(axes, ("round t", "round t (log scale)")):
    ax.set_xlabel(what)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("cumulative temperature-zero regret")
  axes[0].legend(title="mean, 95% band; growth verdict", frameon=False, fontsize=8)
  axes[1].set_title("log t: a straight rising line is logarithmic growth", fontsize=9)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _save(fig, out_png)
  plt.close(fig)


def paper_users(out_dir: Optional[str] = None, scale: str = "default",
                overrides: Optional[dict] = None, *, config=None, progress: bool = False,
                resume: bool = False) -> dict:
  """P1's personalized-users experiment with growth verdicts and the publication figure.

  Runs :func:`experiment.run_experiment` (summary.json, curves.csv,
  figure.png/pdf; every population's summary carries ``"growth"``), then adds
  ``figure_publication.png/pdf``.
  """
  config = _resolve("paper-users", scale, overrides, config)
  summary = experiment.run_experiment(config, out_dir, progress=progress, resume=resume)
  for pop, per_round in zip(summary["populations"], summary["_records"].regret):
    if "growth" not in pop:  # experiment.summarize predates the growth hook
      pop["growth"] = growth_summary(per_round, pop["bad_rounds"]["eps0"])
  if out_dir is not None:
    publication_figure(os.path.join(out_dir, "curves.csv"), summary,
                       os.path.join(out_dir, "figure_publication.png"),
                       title=f"{config.name}: greedy exact ERM, {config.n_seeds} seeds")
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    experiment._atomic_write(os.path.join(out_dir, "summary.json"),
                             json.dumps(public, indent=2) + "\n")
  return summary


# ---------------------------------------------------------------------------
# 2. diversity-rank
# ---------------------------------------------------------------------------


def diversity_rank(out_dir: Optional[str] = None, scale: str = "default",
                   overrides: Optional[dict] = None, *, config=None,
                   ranks: Sequence[int] = HEAD_RANKS,
                   slate_policies: Sequence[str] = DIVERSITY_SLATE_POLICIES,
                   progress: bool = False) -> dict:
  """Heads confined to rank r (known-heads learner) under two slate policies.

  One :func:`experiment.run_sweep` over ``head_rank`` per slate policy (one
  compile each); ranks above ``latent_dim`` are dropped. Records the growth
  verdict, final regret and diversity diagnostics of every (policy, rank).
  """
  started = time.time()
  config = _resolve("diversity-rank", scale, overrides, config)
  ranks = sorted({int(r) for r in ranks if int(r) <= config.latent_dim})
  if not ranks:
    raise ValueError(f"ranks leave no value <= latent_dim={config.latent_dim}; allowed: "
                     f"ranks in [1, latent_dim]")
  diversity = {}
  for rank in ranks:
    cfg = dataclasses.replace(config, head_rank=rank)
    diversity[rank] = [(acc, instance_lib.diversity_diagnostics(acc.instance).to_dict())
                       for acc in experiment.build_instances(cfg)]
  entries, rows, per_round = [], [], {}
  for policy in slate_policies:
    cfg = dataclasses.replace(config, slate_policy=policy)
    if policy == "top_k":
      cfg = dataclasses.replace(cfg, slate_size=2)
    sweep = experiment.run_sweep(cfg, "head_rank", ranks, progress=progress)
    lane = 0
    for rank in ranks:
      for n_users, (acc, diag) in zip(config.populations, diversity[rank]):
        regret = sweep["_records"].regret[lane].astype(np.float64)
        label = f"{policy}/rank={rank}/U={n_users}"
        entry, curve_rows = _curve_entry(label, regret, acc.gap.eps_iso, slate_policy=policy,
                                         head_rank=rank, n_users=n_users)
        entry.update(accepted_seed=int(acc.seed), min_gap=acc.gap.min_gap,
                     eps_iso=acc.gap.eps_iso, diversity=diag,
                     erm_converged_fraction=float(
                         np.mean(sweep["_records"].erm_converged[lane])))
        entries.append(entry)
        rows += curve_rows
        per_round[label] = regret
        lane += 1
  summary = {**_header("diversity-rank", config, started), "head_ranks": ranks,
             "slate_policies": list(slate_policies), "curves": entries,
             "_per_round": per_round, "_bands": _bands(per_round)}
  if out_dir is not None:
    _write(out_dir, summary, ("slate_policy", "head_rank", "n_users"), rows,
           lambda png: diversity_rank_figure(summary, png))
  return summary


def diversity_rank_figure(summary: dict, out_png: str) -> None:
  """One log-x panel per slate policy (colour = rank) and final regret against rank."""
  import matplotlib.pyplot as plt

  policies = summary["slate_policies"]
  ranks = summary["head_ranks"]
  fig, axes = plt.subplots(1, len(policies) + 1, figsize=(4.2 * (len(policies) + 1), 4.0),
                           dpi=150)
  by_label = {e["curve"]: e for e in summary["curves"]}
  for ax, policy in zip(axes, policies):
    for index, rank in enumerate(ranks):
      for entry in (e for e in summary["curves"]
                    if e["slate_policy"] == policy and e["head_rank"] == rank):
        _plot_curve(ax, summary["_bands"][entry["curve"]], _COLOURS[index % 7],
                    f"r = {rank}: {verdict_label(entry['growth'])}")
    ax.set_xscale("log")
    ax.set_title(f"slates: {policy}", fontsize=10)
    ax.set_xlabel("round t (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7, title="head rank: verdict", title_fontsize=7)
  axes[0].set_ylabel("cumulative temperature-zero regret")
  ax = axes[-1]
  for index, policy in enumerate(policies):
    sel = [e for e in summary["curves"] if e["slate_policy"] == policy]
    xs = [e["head_rank"] for e in sel]
    mean = np.array([e["final_cumulative_regret"]["mean"] for e in sel])
    err = np.array([[e["final_cumulative_regret"]["mean"] - e["final_cumulative_regret"]["lower95"]
                     for e in sel],
                    [e["final_cumulative_regret"]["upper95"] - e["final_cumulative_regret"]["mean"]
                     for e in sel]])
    ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, color=_COLOURS[index],
                label=policy)
  twin = ax.twinx()
  first = [by_label[e["curve"]] for e in summary["curves"] if e["slate_policy"] == policies[0]]
  twin.plot([e["head_rank"] for e in first],
            [_as_float(e["diversity"]["relevant_min_eigenvalue"]) for e in first],
            color="grey", ls=":", marker="s", label="relevant lambda_min")
  twin.set_ylabel("lambda_min of the decision-relevant Gram (dotted)", fontsize=8)
  ax.set_xlabel("head rank r (J = %d)" % summary["config"]["latent_dim"])
  ax.set_ylabel("final cumulative regret (95% CI)")
  ax.grid(alpha=0.3)
  ax.legend(frameon=False, fontsize=8)
  fig.suptitle(f"diversity-rank: known-heads exact ERM, {summary['config']['n_seeds']} seeds, "
               f"{summary['config']['horizon']} rounds", fontsize=10)
  fig.tight_layout()
  _save(fig, out_png)
  plt.close(fig)


def _as_float(value) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return float("nan")


# ---------------------------------------------------------------------------
# 3. offline-sample-complexity
# ---------------------------------------------------------------------------


def offline_sample_complexity(out_dir: Optional[str] = None, scale: str = "default",
                              overrides: Optional[dict] = None, *, config=None,
                              deficient_rank: int = 2, grid_points: int = 16,
                              progress: bool = False) -> dict:
  """P(G(R_hat_n) > 0) and E G(R_hat_n) after n i.i.d. reference slates.

  With ``slate_policy="reference"`` the slates never depend on the estimate,
  so the estimate deployed at round ``t`` is exactly the ERM on ``t - 1``
  i.i.d. reference slates and ``regret[:, t - 1] = G(R_hat_{t-1})``. One sweep
  over ``head_rank`` in ``(latent_dim, deficient_rank)`` (a diverse, full-rank
  population and a rank-deficient one), one compile. On a logarithmic grid of
  n: the fraction of seeds with ``G > 0`` (Clopper-Pearson interval), the mean
  ``G`` (t-interval), and the exponential decay rate of ``P(G > 0)``
  (:func:`fit_exponential_decay`).
  """
  started = time.time()
  config = _resolve("offline-sample-complexity", scale, overrides, config)
  config = dataclasses.replace(config, slate_policy="reference").validate()
  deficient_rank = min(int(deficient_rank), config.latent_dim)
  ranks = [config.latent_dim] + ([deficient_rank] if deficient_rank < config.latent_dim else [])
  sweep = experiment.run_sweep(config, "head_rank", ranks, progress=progress)
  regret = sweep["_records"].regret.astype(np.float64)  # (lanes, S, T)
  grid = log_grid(config.horizon - 1, grid_points) if config.horizon > 1 else np.array([0])
  entries, rows, per_round, table = [], [], {}, []
  lane = 0
  for rank in ranks:
    cfg = dataclasses.replace(config, head_rank=rank)
    for n_users, acc in zip(config.populations, experiment.build_instances(cfg)):
      population = "diverse" if rank == config.latent_dim else "rank-deficient"
      label = f"{population}/rank={rank}/U={n_users}"
      g = regret[lane][:, grid]  # G(R_hat_n), n = grid
      positive = g > 0
      count = positive.sum(axis=0)
      p_lo, p_hi = clopper_pearson(count, config.n_seeds)
      g_mean, g_lo, g_hi = _band(g)
      decay = fit_exponential_decay(positive, grid, **{k: GROWTH_SETTINGS[k] for k in
                                                        ("level", "n_bootstrap", "seed")})
      mean_decay = _mean_decay(g, grid)
      for j, n in enumerate(grid):
        table.append({"curve": label, "population": population, "head_rank": rank,
                      "n_users": int(n_users), "n": int(n),
                      "p_positive": float(count[j] / config.n_seeds),
                      "p_lower": float(p_lo[j]), "p_upper": float(p_hi[j]),
                      "mean_regret": float(g_mean[j]), "mean_lower": float(g_lo[j]),
                      "mean_upper": float(g_hi[j])})
      entry, curve_rows = _curve_entry(label, regret[lane], acc.gap.eps_iso,
                                       population=population, head_rank=rank,
                                       n_users=n_users)
      entry.update(accepted_seed=int(acc.seed), min_gap=acc.gap.min_gap, eps_iso=acc.gap.eps_iso,
                   diversity=instance_lib.diversity_diagnostics(acc.instance).to_dict(),
                   probability_decay=decay, mean_regret_decay=mean_decay,
                   erm_converged_fraction=float(np.mean(sweep["_records"].erm_converged[lane])))
      entries.append(entry)
      rows += curve_rows
      per_round[label] = regret[lane]
      lane += 1
  summary = {**_header("offline-sample-complexity", config, started), "grid": grid.tolist(),
             "curves": entries, "offline_table": table, "_per_round": per_round, "_bands": _bands(per_round)}
  if out_dir is not None:
    _write(out_dir, summary, ("population", "head_rank", "n_users"), rows,
           lambda png: offline_figure(summary, png))
    keys = list(table[0])
    experiment._atomic_write(os.path.join(out_dir, "offline.csv"), "\n".join(
        [",".join(keys)] + [",".join(f"{r[k]:.9g}" if isinstance(r[k], float) else str(r[k])
                                     for k in keys) for r in table]) + "\n")
  return summary


def _mean_decay(g: np.ndarray, grid: np.ndarray) -> dict:
  """Least-squares rate of ``log E G(R_hat_n)`` on n over grid points with E G > 0."""
  mean = g.mean(axis=0)
  ok = mean > 0
  if ok.sum() < 3:
    return {"rate": None, "n_points": int(ok.sum())}
  slope, intercept = np.polyfit(grid[ok].astype(np.float64), np.log(mean[ok]), 1)
  return {"rate": float(-slope), "intercept": float(intercept), "n_points": int(ok.sum())}


def offline_figure(summary: dict, out_png: str) -> None:
  """Semi-log panels: P(G > 0) with the fitted exponential, and mean G, against n."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=150)
  n_seeds = summary["config"]["n_seeds"]
  floor = 0.5 / n_seeds
  for index, entry in enumerate(summary["curves"]):
    colour = _COLOURS[index % 7]
    sel = [r for r in summary["offline_table"] if r["curve"] == entry["curve"]]
    n = np.array([r["n"] for r in sel])
    p = np.array([r["p_positive"] for r in sel])
    lo = np.array([r["p_lower"] for r in sel])
    hi = np.array([r["p_upper"] for r in sel])
    decay = entry["probability_decay"]
    label = entry["curve"]
    if decay.get("rate") is not None:
      label += (f": rate {decay['rate']:.3g} [{decay['rate_lower']:.3g}, "
                f"{decay['rate_upper']:.3g}]/sample")
    axes[0].errorbar(n, np.maximum(p, floor), yerr=[np.maximum(p, floor) - np.maximum(lo, floor * 0.5),
                                                    hi - np.maximum(p, floor)],
                     color=colour, marker="o", ms=3, capsize=2, lw=1.2, label=label)
    if decay.get("rate") is not None:
      xs = np.linspace(min(decay["window"]), max(decay["window"]), 50)
      axes[0].plot(xs, np.exp(decay["intercept"] - decay["rate"] * xs), color=colour, ls="--",
                   lw=1)
    g = np.array([r["mean_regret"] for r in sel])
    g_lo = np.array([r["mean_lower"] for r in sel])
    g_hi = np.array([r["mean_upper"] for r in sel])
    positive = g > 0
    axes[1].plot(n[positive], g[positive], color=colour, marker="o", ms=3, lw=1.2,
                 label=entry["curve"])
    axes[1].fill_between(n[positive], np.maximum(g_lo[positive], g[positive] * 1e-3),
                         g_hi[positive], color=colour, alpha=0.2, lw=0)
  axes[0].axhline(floor, color="grey", lw=0.6, ls=":")
  axes[0].set_ylabel("P(G(R_hat_n) > 0), 95% Clopper-Pearson")
  axes[1].set_ylabel("mean G(R_hat_n) (95% t-interval)")
  for ax in axes:
    ax.set_yscale("log")
    ax.set_xlabel("n = i.i.d. reference slates in the ERM")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=7)
  fig.suptitle(f"offline sample complexity: {n_seeds} seeds; dashed: exp(a - rate n) fit",
               fontsize=10)
  fig.tight_layout()
  _save(fig, out_png)
  plt.close(fig)


# ---------------------------------------------------------------------------
# 4. temperature-zero-vs-kl
# ---------------------------------------------------------------------------


def temperature_zero_vs_kl(out_dir: Optional[str] = None, scale: str = "default",
                           overrides: Optional[dict] = None, *, config=None,
                           betas: Sequence[float] = KL_BETAS, progress: bool = False) -> dict:
  """Cumulative temperature-zero regret next to the KL-regularised regret of the
  training policy, on the same runs (``record_kl=True``), one sweep over beta.

  beta is both the temperature of the softened training policy (the
  current-policy slate draw) and the KL weight of P2's regularised objective.
  """
  started = time.time()
  config = _resolve("temperature-zero-vs-kl", scale, overrides, config)
  config = dataclasses.replace(config, record_kl=True).validate()
  betas = [float(b) for b in betas]
  sweep = experiment.run_sweep(config, "beta", betas, progress=progress)
  records = sweep["_records"]
  accepted = experiment.build_instances(config)
  entries, rows, per_round = [], [], {}
  lane = 0
  for beta in betas:
    for n_users, acc in zip(config.populations, accepted):
      for metric, data, eps0 in (("temperature_zero", records.regret, acc.gap.eps_iso),
                                 ("kl", records.kl_regret, None)):
        label = f"beta={beta:g}/{metric}/U={n_users}"
        entry, curve_rows = _curve_entry(label, data[lane].astype(np.float64), eps0,
                                         beta=beta, metric=metric, n_users=n_users)
        entries.append(entry)
        rows += curve_rows
        per_round[label] = data[lane].astype(np.float64)
      lane += 1
  summary = {**_header("temperature-zero-vs-kl", config, started), "betas": betas,
             "curves": entries, "_per_round": per_round, "_bands": _bands(per_round)}
  if out_dir is not None:
    _write(out_dir, summary, ("beta", "metric", "n_users"), rows,
           lambda png: temperature_zero_vs_kl_figure(summary, png))
  return summary


def temperature_zero_vs_kl_figure(summary: dict, out_png: str) -> None:
  """One panel per beta (linear t) plus a log-x panel of all curves."""
  import matplotlib.pyplot as plt

  betas = summary["betas"]
  fig, axes = plt.subplots(1, len(betas) + 1, figsize=(4.2 * (len(betas) + 1), 4.0), dpi=150)
  styles = {"temperature_zero": "-", "kl": "--"}
  names = {"temperature_zero": "temperature-zero", "kl": "KL-regularised"}
  for index, beta in enumerate(betas):
    for entry in (e for e in summary["curves"] if e["beta"] == beta):
      text = f"{names[entry['metric']]}: {verdict_label(entry['growth'])}"
      data = summary["_bands"][entry["curve"]]
      _plot_curve(axes[index], data, _COLOURS[index], text, styles[entry["metric"]])
      _plot_curve(axes[-1], data, _COLOURS[index], f"beta={beta:g} {names[entry['metric']]}",
                  styles[entry["metric"]])
    axes[index].set_title(f"beta = {beta:g}", fontsize=10)
    axes[index].set_xlabel("round t")
    axes[index].legend(frameon=False, fontsize=7, title="verdict", title_fontsize=7)
  axes[-1].set_xscale("log")
  axes[-1].set_xlabel("round t (log scale)")
  axes[-1].legend(frameon=False, fontsize=7)
  axes[0].set_ylabel("cumulative regret (reward units)")
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle("temperature-zero regret of the greedy selector vs KL-regularised regret of "
               "the training policy (same runs)", fontsize=10)
  fig.tight_layout()
  _save(fig, out_png)
  plt.close(fig)


# ---------------------------------------------------------------------------
# 5. personalized-vs-pooled
# ---------------------------------------------------------------------------


def personalized_vs_pooled(out_dir: Optional[str] = None, scale: str = "default",
                           overrides: Optional[dict] = None, *, config=None,
                           model_classes: Sequence[str] = MODEL_CLASSES,
                           progress: bool = False) -> dict:
  """Known-heads, per-user bilinear and pooled exact ERM on one instance (one run each:
  the model class is static)."""
  started = time.time()
  config = _resolve("personalized-vs-pooled", scale, overrides, config)
  entries, rows, per_round = [], [], {}
  for model_class in model_classes:
    cfg = dataclasses.replace(config, model_class=model_class)
    run = experiment.run_experiment(cfg, None, progress=progress, make_figure=False)
    for p, pop in enumerate(run["populations"]):
      regret = run["_records"].regret[p].astype(np.float64)
      label = f"{model_class}/U={pop['n_users']}"
      entry, curve_rows = _curve_entry(label, regret, pop["eps_iso"], model_class=model_class,
                                       n_users=pop["n_users"])
      entry.update(accepted_seed=pop["accepted_seed"], min_gap=pop["min_gap"],
                   eps_iso=pop["eps_iso"], erm_converged_fraction=pop["erm_converged_fraction"],
                   tail_per_round_regret=pop["tail_per_round_regret"])
      entries.append(entry)
      rows += curve_rows
      per_round[label] = regret
  summary = {**_header("personalized-vs-pooled", config, started),
             "model_classes": list(model_classes), "curves": entries, "_per_round": per_round, "_bands": _bands(per_round)}
  if out_dir is not None:
    _write(out_dir, summary, ("model_class", "n_users"), rows,
           lambda png: personalized_vs_pooled_figure(summary, png))
  return summary


def personalized_vs_pooled_figure(summary: dict, out_png: str) -> None:
  """Linear and log-x panels, one curve per model class, verdicts in the legend."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=150)
  for index, entry in enumerate(summary["curves"]):
    for ax in axes:
      _plot_curve(ax, summary["_bands"][entry["curve"]], _COLOURS[index % 7],
                  f"{entry['curve']}: {verdict_label(entry['growth'])}")
  axes[1].set_xscale("log")
  axes[1].set_yscale("log")
  axes[0].set_xlabel("round t")
  axes[1].set_xlabel("round t (log scale)")
  axes[0].set_ylabel("cumulative temperature-zero regret")
  axes[1].set_ylabel("same, log-log (slope 1 = linear regret)")
  axes[0].legend(frameon=False, fontsize=8, title="learner: growth verdict", title_fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle(f"personalized vs pooled exact ERM ({summary['config']['slate_policy']} slates, "
               f"{summary['config']['n_seeds']} seeds)", fontsize=10)
  fig.tight_layout()
  _save(fig, out_png)
  plt.close(fig)


# ---------------------------------------------------------------------------
# Sensitivity of the headline result (docs/experiments.md)
# ---------------------------------------------------------------------------

SENSITIVITY_GRID = {
    "reward_scale": (1.0, 3.0, 10.0),
    "min_gap": (0.0, 0.05, 0.2),
    "beta": (0.1, 1.0, 10.0),
    "ridge": (0.1, 1.0, 10.0),
}


def sensitivity(out_dir: Optional[str] = None, scale: str = "default",
                overrides: Optional[dict] = None, *, config=None,
                grid: Optional[dict] = None, horizons: Sequence[float] = (0.25, 0.5, 1.0),
                progress: bool = False) -> dict:
  """Growth verdict and regret of the known-heads learner as one choice moves at a time.

  Base: the ``personalized-vs-pooled`` preset (known heads, current+reference
  slates) with ``horizon=600, n_seeds=8`` at the default scale. One compiled
  sweep per parameter in ``grid`` (default :data:`SENSITIVITY_GRID`); the
  horizon is varied by classifying prefixes (fractions ``horizons``) of the
  base run, which are exactly the runs with that horizon (a seed's draws do
  not depend on the horizon). The ``reward_scale`` sweep rescales the base's
  accepted instance (its problem seed with ``min_gap=0``); a ``min_gap`` value
  selects a different accepted instance, so its rows compare instances too.
  """
  started = time.time()
  if config is None:
    config = base_config("personalized-vs-pooled", scale,
                         {"horizon": 600, "n_seeds": 8, **(overrides or {})}
                         if scale == "default" else overrides)
  config = dataclasses.replace(config, name="sensitivity", model_class="known_heads").validate()
  grid = dict(SENSITIVITY_GRID if grid is None else grid)
  entries, rows, per_round = [], [], {}
  base_regret = None
  base_seed = experiment.build_instances(config)[0].seed
  for parameter, values in grid.items():
    cfg = config
    if parameter == "reward_scale":  # the same accepted instance, rescaled
      cfg = dataclasses.replace(config, problem_seed=base_seed, min_gap=0.0)
    sweep = experiment.run_sweep(cfg, parameter, list(values), progress=progress)
    for lane, lane_row in enumerate(sweep["lanes"]):
      regret = sweep["_records"].regret[lane].astype(np.float64)
      label = f"{parameter}={lane_row['value']:g}/U={lane_row['n_users']}"
      entry, curve_rows = _curve_entry(label, regret, None, parameter=parameter,
                                       value=lane_row["value"], n_users=lane_row["n_users"])
      entry.update(accepted_seed=int(lane_row["accepted_seed"]), min_gap=lane_row["min_gap"],
                   tail_mean=lane_row["tail_mean"], horizon=config.horizon)
      entries.append(entry)
      rows += curve_rows
      per_round[label] = regret
      if parameter == "ridge" and lane_row["value"] == config.ridge and base_regret is None:
        base_regret = regret
  if base_regret is not None:
    for fraction in horizons:
      horizon = max(8, int(round(fraction * config.horizon)))
      regret = base_regret[:, :horizon]
      label = f"horizon={horizon}"
      growth = growth_summary(regret)
      entries.append({"curve": label, "parameter": "horizon", "value": horizon,
                      "horizon": horizon, "verdict": growth.get("verdict"),
                      "conclusive": growth.get("conclusive"), "growth": growth,
                      "final_cumulative_regret": {
                          "mean": float(regret.sum(axis=1).mean())},
                      "tail_mean": float(regret[:, -max(1, horizon // 5):].mean())})
  summary = {**_header("sensitivity", config, started), "grid": {k: list(v) for k, v in
                                                                 grid.items()},
             "curves": entries, "_per_round": per_round, "_bands": _bands(per_round)}
  if out_dir is not None:
    _write(out_dir, summary, ("parameter", "value", "n_users"), rows,
           lambda png: sensitivity_figure(summary, png))
  return summary


def sensitivity_figure(summary: dict, out_png: str) -> None:
  """One log-x panel per swept parameter, one curve per value, verdicts in the legend."""
  import matplotlib.pyplot as plt

  parameters = list(summary["grid"])
  fig, axes = plt.subplots(1, len(parameters), figsize=(3.6 * len(parameters), 3.6), dpi=150,
                           squeeze=False)
  for ax, parameter in zip(axes[0], parameters):
    sel = [e for e in summary["curves"] if e.get("parameter") == parameter
           and e["curve"] in summary["_bands"]]
    for index, entry in enumerate(sel):
      _plot_curve(ax, summary["_bands"][entry["curve"]], _COLOURS[index % 7],
                  f"{entry['value']:g}: {verdict_label(entry['growth'])}")
    ax.set_xscale("log")
    ax.set_title(parameter, fontsize=10)
    ax.set_xlabel("round t (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
  axes[0][0].set_ylabel("cumulative temperature-zero regret")
  fig.suptitle("sensitivity of the known-heads result (one parameter at a time)", fontsize=10)
  fig.tight_layout()
  _save(fig, out_png)
  plt.close(fig)


# ---------------------------------------------------------------------------
# Registry and CLI entry
# ---------------------------------------------------------------------------

EXPERIMENTS = {
    "paper-users": paper_users,
    "diversity-rank": diversity_rank,
    "offline-sample-complexity": offline_sample_complexity,
    "temperature-zero-vs-kl": temperature_zero_vs_kl,
    "personalized-vs-pooled": personalized_vs_pooled,
}

# Names whose `jaxbandit run --preset NAME` needs several runs (routed here by the CLI).
MULTI_RUN = ("diversity-rank", "offline-sample-complexity", "temperature-zero-vs-kl",
             "personalized-vs-pooled")


def run_named(name: str, out_dir: Optional[str] = None, overrides: Optional[dict] = None, *,
              scale: str = "default", config=None, progress: bool = False) -> dict:
  """Runs experiment ``name`` at ``scale`` (or on ``config``) and writes ``out_dir``."""
  V.one_of("experiment", name, sorted(EXPERIMENTS))
  return EXPERIMENTS[name](out_dir, scale, overrides, config=config, progress=progress)


FIGURES = {
    "diversity-rank": lambda summary, png: diversity_rank_figure(summary, png),
    "offline-sample-complexity": lambda summary, png: offline_figure(summary, png),
    "temperature-zero-vs-kl": lambda summary, png: temperature_zero_vs_kl_figure(summary, png),
    "personalized-vs-pooled": lambda summary, png: personalized_vs_pooled_figure(summary, png),
    "sensitivity": lambda summary, png: sensitivity_figure(summary, png),
}


def redraw(out_dir: str) -> str:
  """Re-draws ``figure.png/pdf`` of a science results folder from its summary.json and
  curves.csv alone (for paper-users, ``figure_publication.png/pdf``). Returns the path."""
  with open(os.path.join(out_dir, "summary.json")) as handle:
    summary = json.load(handle)
  name = summary["experiment"] if "curves" in summary else "paper-users"
  if name == "paper-users":
    png = os.path.join(out_dir, "figure_publication.png")
    publication_figure(os.path.join(out_dir, "curves.csv"), summary, png,
                       title=f"{summary['experiment']}: greedy exact ERM, "
                             f"{summary['config']['n_seeds']} seeds")
    return png
  summary["_bands"] = read_bands(os.path.join(out_dir, "curves.csv"))
  png = os.path.join(out_dir, "figure.png")
  FIGURES[name](summary, png)
  return png


def print_table(summary: dict) -> None:
  """One line per curve: label, final cumulative regret [95% CI], growth verdict."""
  print(f"{'curve':>40} {'cum. regret [95% CI]':>30} {'verdict':>14}")
  for entry in summary.get("curves", []):
    reg = entry["final_cumulative_regret"]
    print(f"{entry['curve']:>40} {reg['mean']:>11.3f} [{reg['lower95']:.3f}, "
          f"{reg['upper95']:.3f}] {verdict_label(entry['growth']):>14}")
