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


def test_repeatability_rows_count_last_bit_differences():
  bench = load_benchmarks()
  rng = np.random.default_rng(7)
  first = rng.uniform(0.0, 3.0, size=(3, 50)).astype(np.float32)
  row = bench.compare_regret("rerun", "cpu", first.copy(), first)
  assert (row["identical"], row["differing"], row["max_round_diff"]) == ("yes", "0 of 150", 0.0)
  # One value one float32 step away, another moved by 0.25: two of 150 differ.
  other = first.copy()
  other[0, 10] = np.nextafter(other[0, 10], np.float32(np.inf))
  other[2, 49] += np.float32(0.25)
  row = bench.compare_regret("vs", "cpu", other, first)
  assert (row["identical"], row["differing"]) == ("no", "2 of 150")
  assert row["max_round_diff"] == pytest.approx(0.25, abs=1e-6)
  cumulative = np.cumsum(other.astype(np.float64), axis=1)[:, -1] - np.cumsum(
      first.astype(np.float64), axis=1)[:, -1]
  assert row["max_cumulative_diff"] == pytest.approx(np.max(np.abs(cumulative)), rel=1e-12)
  assert row["mean_cumulative"] == pytest.approx(other.astype(np.float64).sum(axis=1).mean())


def test_attribution_runs_a_piece_twice_and_returns_its_first_result():
  # The attribution instrument's premise: the duplicated piece (a) survives
  # XLA's simplifier, so the second copy really runs, and (b) leaves the
  # values unchanged, so the kernel's trajectory does not move.
  import jax
  import jax.numpy as jnp

  attribution = load_benchmark_module("attribution.py")

  def piece(x, scale):
    return {"value": jnp.sin(x) * scale, "positive": x > 0,
            "count": jnp.sum(x > 0).astype(jnp.int32)}

  x = jnp.asarray(np.linspace(-3.0, 3.0, 11, dtype=np.float32))

  def twice(x, scale, flag):
    with attribution.runtime_false(flag):
      return attribution.run_twice(piece, 0)(x, scale)

  args = (x, jnp.float32(2.0), jnp.zeros((), bool))
  out = jax.jit(twice)(*args)
  np.testing.assert_array_equal(np.asarray(out["value"]), np.asarray(jax.jit(piece)(*args[:2])["value"]))
  np.testing.assert_allclose(np.asarray(out["value"]), 2.0 * np.sin(np.asarray(x)), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["positive"]), np.asarray(x) > 0)
  assert int(out["count"]) == int(np.sum(np.asarray(x) > 0))
  once = jax.jit(piece).lower(*args[:2]).compile().as_text()
  both = jax.jit(twice).lower(*args).compile().as_text()
  assert once.count(" sine(") == 1
  assert both.count(" sine(") == 2


def test_attribution_only_keeps_the_base_rows_and_the_named_variants():
  attribution = load_benchmark_module("attribution.py")
  every = [row[0] for row in attribution.variants("certified")]
  kept = [row[0] for row in attribution.variants("certified", ["Woodbury", "BFGS"])]
  assert kept == ["base", "base, again (noise)", "Woodbury update twice", "BFGS updates twice"]
  assert set(kept) < set(every)
  assert attribution.parse_args(["--only", "Woodbury,BFGS"]).only == ["Woodbury", "BFGS"]


def test_attribution_whole_seed_times_every_window_and_sums_them_per_variant():
  attribution = load_benchmark_module("attribution.py")
  args = attribution.parse_args(["--whole-seed", "1000", "--window", "250"])
  assert args.rounds_at == [0, 250, 500, 750]
  for bad in (["--whole-seed", "900", "--window", "250"], ["--whole-seed", "100"],
              ["--whole-seed", "1000", "--window", "250", "--regret-modes"]):
    with pytest.raises(SystemExit):
      attribution.parse_args(bad)
  rng = np.random.default_rng(3)
  labels = ["base", "regret pass removed", "native quasi-Newton steps twice"]
  rows, expected = [], {label: np.zeros(2) for label in labels}
  for t in (0, 250, 500, 750):
    for label in labels:
      low, mid = np.sort(rng.uniform(0.2, 1.0, 2))
      records = "DIFFER" if (label == labels[2] and t == 500) else "same"
      rows.append({"t": t, "window": 250, "variant": label, "ms_min": low, "ms_median": mid,
                   "records": records + (" (but the regret)" if label == labels[1] else "")})
      expected[label] += [low * 0.25, mid * 0.25]  # ms a round x 250 rounds, in seconds
  totals = attribution.seed_totals(rows)
  assert [total["variant"] for total in totals] == labels
  for total in totals:
    low, mid = expected[total["variant"]]
    assert total["rounds"] == 1000
    assert total["s_min"] == pytest.approx(low, rel=1e-12)
    assert total["s_median"] == pytest.approx(mid, rel=1e-12)
    assert total["delta_s"] == pytest.approx(mid - expected["base"][1], rel=1e-12, abs=1e-15)
    assert total["share_pct"] == pytest.approx(100 * (mid / expected["base"][1] - 1), rel=1e-9,
                                               abs=1e-12)
  assert [total["records"] for total in totals] == ["same", "same (but the regret)", "DIFFER"]


def _drift_problem(moves):
  """Queries W_u^T x_c of 3 contexts x 4 users (r = 2) along the user-vector path ``moves``."""
  rng = np.random.default_rng(5)
  contexts = rng.normal(size=(3, 2))
  start = rng.normal(size=(4, 2, 2))
  vectors = np.stack([start + m for m in moves])  # (T, U, 2, 2)
  queries = np.einsum("ci,tuij->tcuj", contexts, vectors)
  keys = rng.normal(size=(3, 8, 2))
  norms = np.linalg.norm(keys, axis=-1).max(axis=1)
  scale = np.linalg.norm(contexts, axis=-1) * (1 + 1e-6)
  return queries, vectors.reshape(len(moves), 4, 4), keys, norms, scale


def test_drift_replay_matches_the_kernels_allowances_and_counts_net_moves():
  # drift_counts' per-round rule against the kernel's bookkeeping written
  # again here (allowance less each round's drift; measured cells get
  # room / scale), and a net-move reference that wins where the vectors
  # oscillate (a long path, no net move) and loses where they drift one way.
  refit_bounds = load_benchmark_module("refit_bounds.py")
  rng = np.random.default_rng(7)
  direction = rng.normal(size=(4, 2, 2))
  every = lambda k: (lambda t, since: since >= k)
  rules = {"path": ("frobenius", every(1)), "spectral": ("spectral", every(1)),
           "net8": ("frobenius", every(8))}
  for kind, moves in (("oscillating", [0.02 * (t % 2) * direction for t in range(60)]),
                      ("drifting", [0.004 * t * direction for t in range(60)])):
    queries, vectors, keys, norms, scale = _drift_problem(moves)
    measured, due = refit_bounds.drift_counts(queries, vectors, keys, norms, scale, rules)

    # The kernel's rule, independently: exact due cells and allowances.
    anchor = np.zeros(queries.shape[1:])
    radius = np.full(queries.shape[1:3], -np.inf)
    allowance = np.full(queries.shape[1:3], -np.inf)
    expected_measured, expected_due = [], []
    for t in range(len(moves)):
      g = queries[t]
      drift = np.linalg.norm(vectors[t] - vectors[max(t - 1, 0)], axis=-1)
      allowance = allowance - drift[None]
      distance = np.linalg.norm(g - anchor, axis=-1)
      is_due = ~(distance < radius)
      check = ~(allowance > 0) | ~(radius > 0)
      scores = np.einsum("cur,cvr->cuv", g, keys)
      new_radius = np.full(radius.shape, np.inf)
      for c in range(3):
        for u in range(4):
          a = int(np.argmax(scores[c, u]))
          margin = 1e-5 * (1 + np.linalg.norm(g[c, u]) * norms[c])
          for v in range(8):
            gap = np.linalg.norm(keys[c, v] - keys[c, a])
            if gap > 0:
              new_radius[c, u] = min(new_radius[c, u],
                                     (scores[c, u, a] - scores[c, u, v] - margin) / gap)
      new_radius *= 1 - 1e-5
      room = np.where(is_due, new_radius, radius - distance) / scale[:, None]
      allowance = np.where(check, room, allowance)
      expected_measured.append(int(check.sum()))
      expected_due.append(int(is_due.sum()))
      anchor = np.where(is_due[..., None], g, anchor)
      radius = np.where(is_due, new_radius, radius)
    np.testing.assert_array_equal(measured["path"], expected_measured)
    np.testing.assert_array_equal(due, expected_due)
    for name in rules:
      assert np.all(measured[name] >= due) and np.all(measured[name] <= 12)
    later = slice(10, None)
    if kind == "oscillating":
      assert measured["net8"][later].sum() < measured["path"][later].sum()
    else:
      assert measured["net8"][later].sum() > measured["path"][later].sum()
