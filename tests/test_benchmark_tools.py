"""Host-side helpers of ``benchmarks/run.py`` that turn measurements into verdicts.

The scaling sweep reports how run time grows with the seeds and the horizon
as a log-log least-squares slope (1 means linear); the issue's target "run
time linear in seeds beyond a few dozen" is read off that number, so it is
checked here against power laws whose exponent is known in closed form.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark_module


def load_benchmarks():
  return load_benchmark_module("run.py")


def rows(sweep, values, seconds):
  key = "seeds" if sweep == "seeds" else "horizon"
  return [{"sweep": sweep, key: v, "seeds" if key == "horizon" else "horizon": 4, "run_s": s}
          for v, s in zip(values, seconds)]


@pytest.mark.parametrize("exponent", [1.0, 1.25, 2.0])
def test_scaling_slope_recovers_a_power_law(exponent):
  bench = load_benchmarks()
  seeds = np.array([16, 32, 64, 128, 256])
  fit = bench.scaling_slope(rows("seeds", seeds, 0.37 * seeds**exponent), "seeds")
  assert fit["slope"] == pytest.approx(exponent, abs=1e-9)
  assert (fit["from"], fit["to"], fit["points"]) == (16, 256, 5)


def test_scaling_slope_fits_only_points_from_the_minimum():
  bench = load_benchmarks()
  # Overhead-dominated below 16 seeds (flat), linear from 16 on: the fit from
  # 16 must see slope 1, the fit over every point must not.
  seeds = [1, 2, 4, 16, 32, 64]
  seconds = [2.0, 2.0, 2.0, 1.0, 2.0, 4.0]
  assert bench.scaling_slope(rows("seeds", seeds, seconds), "seeds", minimum=16)["slope"] == (
      pytest.approx(1.0, abs=1e-9))
  everything = bench.scaling_slope(rows("seeds", seeds, seconds), "seeds")["slope"]
  assert abs(everything - 1.0) > 0.3
  # Other sweeps' rows are ignored, and one point is no fit.
  mixed = rows("horizon", [100, 200], [1.0, 9.0]) + rows("seeds", [32], [1.0])
  assert bench.scaling_slope(mixed, "seeds") is None
  assert bench.scaling_slope(mixed, "horizon")["slope"] == pytest.approx(np.log2(9.0))


def test_figure_row_projects_linearly_in_seeds():
  bench = load_benchmarks()
  result = {"populations": [10, 50, 100], "devices": 2, "seeds": 4, "horizon": 5000,
            "chunks": 20, "compile_s": 9.0, "run_s": 80.0, "seed_rounds": 3 * 4 * 5000,
            "cumulative_regret": [1.0, 2.0, 3.0], "load1_before": 1.0, "load1_after": 2.0}
  row = bench.figure_row(result, target_seeds=1000, target_seconds=600.0)
  assert row["projected_s"] == pytest.approx(9.0 + 80.0 * 250)
  assert row["ratio"] == pytest.approx((9.0 + 80.0 * 250) / 600.0)
  assert row["seed_rounds_per_s"] == pytest.approx(60000 / 80.0)
  assert row["populations"] == "10,50,100"
