"""The table data layout: same fits as the buffer, and a million rounds without overflow."""

import math

import jax
import numpy as np
import pytest

from jaxbandit import instance as instance_lib
from jaxbandit import simulate as sim


@pytest.fixture(scope="module")
def small_instance():
  return instance_lib.make_instance(jax.random.key(3), n_contexts=2, n_actions=3, dim=2,
                                    latent_dim=2, n_users=1)


@pytest.mark.slow  # ~16 s; the table layout is an option, the buffer the default
def test_table_layout_matches_buffer(small_instance):
  runs = {layout: sim.simulate(small_instance, sim.SimulationConfig(horizon=60,
                                                                    data_layout=layout),
                               n_seeds=2)
          for layout in ("buffer", "table")}
  buffer, table = runs["buffer"], runs["table"]
  np.testing.assert_array_equal(buffer.records.context, table.records.context)
  np.testing.assert_array_equal(buffer.records.user, table.records.user)
  np.testing.assert_allclose(buffer.final_state.params, table.final_state.params, atol=2e-5)
  np.testing.assert_allclose(buffer.records.regret, table.records.regret, atol=1e-6)
  counts = np.asarray(table.final_state.data.mask)
  assert counts.sum() == 2 * 1 * 60  # one population, two seeds, 60 rounds each


def test_table_layout_refuses_large_tables():
  big = instance_lib.make_instance(jax.random.key(0), n_contexts=100, n_actions=100, dim=2,
                                   latent_dim=2, n_users=100)
  with pytest.raises(ValueError, match="data_layout"):
    sim.simulate(big, sim.SimulationConfig(horizon=10, data_layout="table"))


@pytest.mark.parametrize("horizon", [
    100_000,
    pytest.param(1_000_000, marks=pytest.mark.slow),  # about a minute on 2 cores
])
def test_long_horizon_without_overflow(small_instance, horizon):
  config = sim.SimulationConfig(horizon=horizon, data_layout="table")
  result = sim.simulate(small_instance, config, n_seeds=1, chunk_size=horizon // 4)
  records = result.records
  # Counters: the round counter and the float32 counts are exact.
  assert int(result.final_state.round[0, 0]) == horizon
  assert float(np.asarray(result.final_state.data.mask, np.float64).sum()) == horizon
  # Every per-round record is finite; the ERM converged throughout.
  assert np.all(np.isfinite(records.regret)) and np.all(np.isfinite(records.erm_grad_norm))
  assert records.erm_converged.mean() > 0.999
  # Cumulative sums are float64 on the host: they match an exact sum to 1e-12.
  per_round = records.regret[0, 0].astype(np.float64)
  exact = math.fsum(per_round.tolist())
  cumulative = result.cumulative_regret()[0, 0]
  assert cumulative[-1] == pytest.approx(exact, rel=1e-12, abs=1e-9)
  assert np.all(np.diff(cumulative) >= 0)
  # Bad-round counts are exact integer counts.
  from jaxbandit import stats

  eps0 = float(np.median(per_round[per_round > 0])) if np.any(per_round > 0) else 1.0
  counts = stats.bad_round_counts(records.regret[0], eps0)
  assert int(np.asarray(counts.counts)[0]) == sum(1 for v in per_round.tolist() if v >= eps0)


def test_run_too_big_for_memory_is_refused_up_front(small_instance, monkeypatch):
  """The estimate is compared with available memory before anything compiles."""
  monkeypatch.setattr(sim, "available_memory_bytes", lambda: 64 * 2**20)  # pretend 64 MiB
  config = sim.SimulationConfig(horizon=100_000)
  with pytest.raises(ValueError, match=r"GiB.*allowed: at most about \d+ seeds") as err:
    sim.simulate(small_instance, config, n_seeds=512)
  # The estimate grows linearly in seeds and horizon (an independent count of the buffer).
  small = sim.estimate_memory_bytes(config, 1, 1, 2, 3, 4, 1, 1000)
  double = sim.estimate_memory_bytes(config, 1, 1, 2, 3, 4, 2, 1000)
  row_bytes = 4 * (2 + 2 + 1) + 1  # context, user, 2 slate items, outcome (int32) + mask
  # One more seed holds at least one more buffer (the 'map' kernel updates states in place).
  assert double["state"] - small["state"] >= 100_000 * row_bytes
  assert "512" in str(err.value)


class _Accelerator:
  """A device whose allocator reports statistics, as a GPU's does (a CPU's reports none)."""

  def __init__(self, free_bytes):
    self.free_bytes = free_bytes

  def memory_stats(self):
    return {"bytes_limit": self.free_bytes + 2**20, "bytes_in_use": 2**20}

  def __str__(self):
    return "accelerator"


def test_run_too_big_for_a_device_is_refused_and_the_suggestion_fits(small_instance,
                                                                      monkeypatch):
  """On accelerators each device's share of the estimate must fit its free memory; the
  seed count the error suggests does fit, and the share halves over two devices."""
  monkeypatch.setattr(sim, "available_memory_bytes", lambda: None)  # host unknown: no check
  config = sim.SimulationConfig(horizon=10_000, seed_batching="vmap")
  stacked = jax.tree_util.tree_map(lambda x: x[None], small_instance)
  args = (config, stacked)
  sizes = dict(chunk_size=1000, n_params=8, n_solver=64 + 16, n_factors=2)
  n_seeds = 1024
  estimate = sim.estimate_memory_bytes(config, 1, 1, 2, 3, 8, n_seeds, 1000, 80, 2)
  on_devices = estimate["total"] - estimate["records_host"]  # one device holds all of it
  free = int(on_devices / 0.8 / 1.5)  # two thirds of what one device would need
  with pytest.raises(ValueError, match=r"on each of 1 device\(s\), here accelerator.*"
                                       r"allowed: at most about (\d+) seeds") as err:
    sim.check_memory(*args, n_seeds, **sizes, devices=[_Accelerator(free)])
  suggested = int(err.value.args[0].rsplit("at most about ", 1)[1].split()[0])
  assert 0 < suggested < n_seeds
  sim.check_memory(*args, suggested, **sizes, devices=[_Accelerator(free)])  # fits
  # Two such devices each hold about half of the seeds' share: the run fits.
  sim.check_memory(*args, n_seeds, **sizes, devices=[_Accelerator(free)] * 2)
  # A CPU device reports no statistics and is never refused on its own.
  assert sim.device_memory_bytes(jax.devices("cpu")[0]) is None
  sim.check_memory(*args, n_seeds, **sizes, devices=jax.devices("cpu")[:1])


def test_blocked_erm_matches_one_pass(small_instance):
  """Summing over the filled blocks only gives the same fits as one pass over the buffer."""
  runs = {block: sim.simulate(small_instance,
                              sim.SimulationConfig(horizon=30, erm_block_size=block),
                              n_seeds=2)
          for block in (0, 4)}  # 30 rounds >= 4 blocks of 4 rows: the blocked path is used
  assert sim.uses_erm_blocks(sim.SimulationConfig(horizon=30, erm_block_size=4))
  assert sim.buffer_capacity(sim.SimulationConfig(horizon=30, erm_block_size=4)) == 32
  one_pass, blocked = runs[0], runs[4]
  np.testing.assert_array_equal(one_pass.records.context, blocked.records.context)
  np.testing.assert_allclose(one_pass.final_state.params, blocked.final_state.params,
                             atol=2e-5)
  np.testing.assert_allclose(one_pass.records.regret, blocked.records.regret, atol=1e-6)
  assert blocked.records.erm_converged.all()
