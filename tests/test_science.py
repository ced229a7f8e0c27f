"""The science experiments (jaxbandit.science) at a tiny size, and their notebooks.

Every experiment runs at ``scale="tiny"`` (4 contexts x 5 actions, d=2, J=4,
3 users, 16 rounds, 4 seeds) and its files are checked against a NumPy
recomputation: the final mean of each curve against the last row of
curves.csv and the per-seed records, the log-growth slope against a
least-squares fit of the csv's mean curve (the growth fit's point estimate
fits the seed-mean curve), P(G > 0) and its Clopper-Pearson interval against
scipy's exact binomial interval. Tolerances: 1e-7 relative for values read
back from 9-significant-digit csv text, 1e-6 for refitted slopes.

The cheapest notebook runs in the default test run (so CI executes it) and
every notebook in the slow set, all at tiny size.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxbandit import science, stats

MULTI_RUN = science.MULTI_RUN


def _read_curves(path):
  """curves.csv of a science experiment -> {label: (rounds, mean, lower, upper)}."""
  columns = defaultdict(lambda: ([], [], [], []))
  with open(path, newline="") as handle:
    for row in csv.DictReader(handle):
      entry = columns[row["curve"]]
      for slot, key in enumerate(("round", "mean", "lower", "upper")):
        entry[slot].append(float(row[key]))
  return {k: tuple(np.asarray(v) for v in vals) for k, vals in columns.items()}


def _log_slope(rounds, mean, start_fraction=0.5):
  first = max(1, math.ceil(start_fraction * rounds[-1] - 1e-9))
  window = rounds >= first
  slope, _ = np.polyfit(np.log(rounds[window]), mean[window], 1)
  return slope


def _check_growth(growth, final_mean, n_seeds, horizon):
  assert growth["verdict"] in stats.VERDICTS
  assert isinstance(growth["conclusive"], bool)
  assert growth["n_seeds"] == n_seeds and growth["n_rounds"] == horizon
  np.testing.assert_allclose(growth["final"]["mean"], final_mean, rtol=1e-7)
  assert growth["final"]["lower"] <= final_mean + 1e-9 <= growth["final"]["upper"] + 2e-9


@pytest.fixture(scope="module")
def science_runs(tmp_path_factory):
  """Every multi-run experiment at the tiny scale, written once for the module."""
  runs = {}
  for name in MULTI_RUN:
    out = str(tmp_path_factory.mktemp(name))
    runs[name] = (out, science.run_named(name, out, scale="tiny"))
  return runs


@pytest.mark.parametrize("name", MULTI_RUN)
def test_experiment_files_and_growth_match_numpy(science_runs, name):
  out, summary = science_runs[name]
  for filename in ("summary.json", "curves.csv", "figure.png", "figure.pdf"):
    assert os.path.getsize(os.path.join(out, filename)) > 0, filename
  with open(os.path.join(out, "summary.json")) as handle:
    written = json.load(handle)
  config = written["config"]
  curves = _read_curves(os.path.join(out, "curves.csv"))
  assert {e["curve"] for e in written["curves"]} == set(curves)
  for entry in written["curves"]:
    rounds, mean, lower, upper = curves[entry["curve"]]
    np.testing.assert_array_equal(rounds, np.arange(1, config["horizon"] + 1))
    assert np.all(lower <= mean + 1e-9) and np.all(mean <= upper + 1e-9)
    # Independent recomputation from the per-seed per-round records.
    per_round = summary["_per_round"][entry["curve"]]
    assert per_round.shape == (config["n_seeds"], config["horizon"])
    cumulative = np.cumsum(per_round, axis=-1)
    np.testing.assert_allclose(mean, cumulative.mean(axis=0), rtol=1e-7, atol=1e-12)
    final = entry["final_cumulative_regret"]["mean"]
    np.testing.assert_allclose(final, mean[-1], rtol=1e-7)
    _check_growth(entry["growth"], final, config["n_seeds"], config["horizon"])
    assert entry["verdict"] == entry["growth"]["verdict"]
    assert entry["plateau"] == science.plateau_evidence(per_round)
    np.testing.assert_allclose(entry["growth"]["log_fit"]["slope"], _log_slope(rounds, mean),
                               rtol=1e-6, atol=1e-9)
    if "bad_rounds" in entry["growth"]:
      eps0 = entry["growth"]["bad_rounds"]["eps0"]
      np.testing.assert_array_equal(entry["growth"]["bad_rounds"]["counts"],
                                    np.sum(per_round >= eps0, axis=-1))


def test_diversity_rank_covers_ranks_and_policies(science_runs):
  _, summary = science_runs["diversity-rank"]
  latent_dim = summary["config"]["latent_dim"]
  assert summary["head_ranks"] == sorted({min(r, latent_dim) for r in science.HEAD_RANKS
                                          if r <= latent_dim})
  settings = {(e["slate_policy"], e["head_rank"]) for e in summary["curves"]}
  assert settings == {(p, r) for p in science.DIVERSITY_SLATE_POLICIES
                      for r in summary["head_ranks"]}
  for entry in summary["curves"]:
    assert entry["diversity"]["gram_rank"] == min(entry["head_rank"], entry["n_users"])


def test_temperature_zero_vs_kl_pairs_metrics(science_runs):
  _, summary = science_runs["temperature-zero-vs-kl"]
  assert summary["config"]["record_kl"] is True
  pairs = {(e["beta"], e["metric"]) for e in summary["curves"]}
  assert pairs == {(b, m) for b in science.KL_BETAS for m in ("temperature_zero", "kl")}
  for entry in summary["curves"]:
    assert np.all(summary["_per_round"][entry["curve"]] >= -1e-5)  # both regrets are >= 0


def test_offline_table_matches_records(science_runs):
  out, summary = science_runs["offline-sample-complexity"]
  n_seeds = summary["config"]["n_seeds"]
  grid = np.asarray(summary["grid"])
  assert summary["config"]["slate_policy"] == "reference"
  with open(os.path.join(out, "offline.csv"), newline="") as handle:
    table = list(csv.DictReader(handle))
  assert len(table) == len(grid) * len(summary["curves"])
  for entry in summary["curves"]:
    rows = [r for r in table if r["curve"] == entry["curve"]]
    g = summary["_per_round"][entry["curve"]][:, grid]  # G(R_hat_n), n = grid
    count = np.sum(g > 0, axis=0)
    np.testing.assert_allclose([float(r["p_positive"]) for r in rows], count / n_seeds)
    np.testing.assert_allclose([float(r["mean_regret"]) for r in rows], g.mean(axis=0),
                               rtol=1e-7, atol=1e-12)
    for r, k in zip(rows, count):
      exact = scipy_stats.binomtest(int(k), n_seeds).proportion_ci(0.95, method="exact")
      np.testing.assert_allclose([float(r["p_lower"]), float(r["p_upper"])],
                                 [exact.low, exact.high], atol=1e-7)


def test_fit_exponential_decay_recovers_a_known_rate():
  rng = np.random.default_rng(7)
  grid = np.arange(0, 400, 25)
  rate, n_seeds = 0.01, 4000
  # Nested like an online run: seed s has G > 0 exactly while n < its threshold.
  thresholds = rng.exponential(1 / rate, size=n_seeds)
  positive = grid[None, :] < thresholds[:, None]
  fit = science.fit_exponential_decay(positive, grid, n_bootstrap=200, seed=0)
  assert fit["rate_lower"] <= rate <= fit["rate_upper"]
  np.testing.assert_allclose(fit["rate"], rate, rtol=0.1)
  flat = science.fit_exponential_decay(np.ones((10, 5), bool), np.arange(5))
  assert flat["rate"] is None and "need 3" in flat["reason"]


def test_plateau_evidence_matches_numpy():
  per_round = np.array([[1.0, 0.5, 0.0, 0.0, 0.0],
                        [1.0, 0.0, 0.0, 0.2, 0.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0]])
  evidence = science.plateau_evidence(per_round, tail_fraction=0.4)  # last 2 rounds
  assert evidence["tail_rounds"] == 2
  np.testing.assert_allclose(evidence["seeds_zero_in_tail"], 2 / 3)
  np.testing.assert_allclose(evidence["zero_rounds_in_tail"], 5 / 6)
  assert evidence["last_positive_round"] == {"mean": (2 + 4 + 0) / 3, "max": 4}


def test_redraw_from_files_alone(science_runs, tmp_path):
  import shutil

  out, _ = science_runs["personalized-vs-pooled"]
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  os.remove(copy / "figure.png")
  assert science.redraw(str(copy)) == str(copy / "figure.png")
  assert os.path.getsize(copy / "figure.png") > 0


def test_log_grid_and_scales():
  grid = science.log_grid(999, 16)
  assert grid[0] == 1 and grid[-1] == 999 and np.all(np.diff(grid) > 0)
  tiny = science.base_config("diversity-rank", "tiny", {"n_seeds": 3})
  assert tiny.n_seeds == 3 and tiny.horizon == 16
  with pytest.raises(ValueError, match="scale"):
    science.base_config("diversity-rank", "huge")
  with pytest.raises(ValueError, match="experiment"):
    science.run_named("no-such-experiment")


def test_paper_users_growth_and_publication_figure(tmp_path):
  summary = science.paper_users(str(tmp_path), scale="tiny")
  for filename in ("summary.json", "curves.csv", "figure.png", "figure_publication.png",
                   "figure_publication.pdf"):
    assert os.path.getsize(tmp_path / filename) > 0, filename
  with open(tmp_path / "summary.json") as handle:
    written = json.load(handle)
  with open(tmp_path / "curves.csv", newline="") as handle:
    rows = list(csv.DictReader(handle))
  config = written["config"]
  for pop, per_round in zip(written["populations"], summary["_records"].regret):
    last = [r for r in rows if int(r["n_users"]) == pop["n_users"]][-1]
    np.testing.assert_allclose(pop["final_cumulative_regret"]["mean"], float(last["mean"]),
                               rtol=1e-7)
    _check_growth(pop["growth"], float(last["mean"]), config["n_seeds"], config["horizon"])
    cumulative = np.cumsum(per_round.astype(np.float64), axis=-1)
    rounds = np.arange(1, config["horizon"] + 1)
    np.testing.assert_allclose(pop["growth"]["log_fit"]["slope"],
                               _log_slope(rounds, cumulative.mean(axis=0)), rtol=1e-6,
                               atol=1e-9)


def test_cli_routes_science_presets(tmp_path, monkeypatch):
  from jaxbandit import cli

  calls = {}

  def fake_run_named(name, out, overrides=None, *, scale="default", config=None,
                     progress=False):
    calls.update(name=name, out=out, config=config)
    return {"curves": []}

  monkeypatch.setattr(science, "run_named", fake_run_named)
  code = cli.main(["run", "--preset", "diversity-rank", "--seeds", "3", "--horizon", "40",
                   "--out", str(tmp_path), "--quiet"])
  assert code == 0 and calls["name"] == "diversity-rank"
  assert calls["config"].n_seeds == 3 and calls["config"].horizon == 40


# ---------------------------------------------------------------------------
# Notebooks (executed with nbclient at the tiny scale)
# ---------------------------------------------------------------------------

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
FAST_NOTEBOOK = "03_offline_sample_complexity.ipynb"  # one compile: the cheapest


def _execute(notebook, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv(science.NOTEBOOK_SMALL_ENV, "1")
  monkeypatch.setenv("JAXBANDIT_NOTEBOOK_OUT", str(tmp_path))
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, notebook), as_version=4)
  nbformat.validate(nb)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert images, f"{notebook} displayed no figure"


def test_notebook_list():
  assert len(NOTEBOOKS) == 5 and FAST_NOTEBOOK in NOTEBOOKS


def test_fast_notebook_executes(tmp_path, monkeypatch):
  _execute(FAST_NOTEBOOK, tmp_path, monkeypatch)


# The other four notebooks take 15-31 s each (90 s together on 2 cores); the
# default run executes the fast one, and the slow set executes them all.
@pytest.mark.slow
@pytest.mark.parametrize("notebook", [n for n in NOTEBOOKS if n != FAST_NOTEBOOK])
def test_notebook_executes(notebook, tmp_path, monkeypatch):
  _execute(notebook, tmp_path, monkeypatch)
