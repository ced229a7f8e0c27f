"""Figures from results files (re-drawable from a results folder alone)."""

from __future__ import annotations

import csv
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# One colour per population size, the same in every figure.
POPULATION_COLOURS = {10: "#1b9e77", 50: "#d95f02", 100: "#7570b3"}
_FALLBACK = plt.get_cmap("tab10")


def save_figure(fig, out_png: str) -> None:
  """Writes ``out_png`` and, for a .png name, the same figure as .pdf beside it."""
  fig.savefig(out_png)
  if out_png.endswith(".png"):
    fig.savefig(out_png[:-4] + ".pdf")


def colour_for(n_users: int, index: int = 0):
  return POPULATION_COLOURS.get(int(n_users), _FALLBACK(index % 10))


def read_curves(path: str):
  """Reads curves.csv into {n_users: (rounds, mean, lower, upper)}."""
  columns = defaultdict(lambda: ([], [], [], []))
  with open(path, newline="") as handle:
    for row in csv.DictReader(handle):
      entry = columns[int(row["n_users"])]
      for slot, key in enumerate(("round", "mean", "lower", "upper")):
        entry[slot].append(float(row[key]))
  return {k: tuple(np.asarray(v) for v in vals) for k, vals in sorted(columns.items())}


def cumulative_regret_figure(curves_csv: str, out_png: str, title: str = "",
                             log_x: bool = False) -> None:
  """Mean cumulative regret against round with 95% bands, one curve per population."""
  curves = read_curves(curves_csv)
  fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=150)
  for index, (n_users, (rounds, mean, lower, upper)) in enumerate(curves.items()):
    colour = colour_for(n_users, index)
    ax.plot(rounds, mean, color=colour, lw=1.6, label=f"U = {n_users} users")
    ax.fill_between(rounds, lower, upper, color=colour, alpha=0.25, lw=0)
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel("round t")
  ax.set_ylabel("cumulative temperature-zero regret (reward units)")
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(title="mean, 95% band", frameon=False)
  fig.tight_layout()
  save_figure(fig, out_png)
  plt.close(fig)


def sweep_figure(rows, parameter: str, out_png: str, title: str = "") -> None:
  """Final mean cumulative regret (95% interval) against the swept value, per population."""
  fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=150)
  populations = sorted({r["n_users"] for r in rows})
  numeric = all(isinstance(r["value"], (int, float)) for r in rows)
  for index, n_users in enumerate(populations):
    sel = [r for r in rows if r["n_users"] == n_users]
    xs = [r["value"] for r in sel] if numeric else list(range(len(sel)))
    mean = np.array([r["final_mean"] for r in sel])
    err = np.array([[r["final_mean"] - r["final_lower95"] for r in sel],
                    [r["final_upper95"] - r["final_mean"] for r in sel]])
    ax.errorbar(xs, mean, yerr=err, color=colour_for(n_users, index), marker="o", capsize=3,
                label=f"U = {n_users} users")
  if numeric and all(r["value"] > 0 for r in rows) and \
      max(r["value"] for r in rows) / min(r["value"] for r in rows) > 20:
    ax.set_xscale("log")
  ax.set_xlabel(parameter)
  ax.set_ylabel("final cumulative regret (reward units)")
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(title="mean, 95% interval", frameon=False)
  fig.tight_layout()
  save_figure(fig, out_png)
  plt.close(fig)
