"""Command line, TOML configs, checkpoints and resume after a real kill."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxbandit import cli, config_io, experiment, presets

TINY_TOML = """
preset = "smoke"
name = "tiny"
populations = [2, 3]
n_contexts = 3
n_actions = 4
dim = 2
latent_dim = 2
horizon = 240
n_seeds = 3
chunk_size = 6
"""


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
  path.write_text(TINY_TOML)
  return str(path)


@pytest.fixture(scope="module")
def reference_run(tiny_config_file, tmp_path_factory):
  """An uninterrupted run of the tiny config (shared by the resume tests)."""
  out = str(tmp_path_factory.mktemp("reference"))
  config = config_io.load_config(tiny_config_file)
  summary = experiment.run_experiment(config, out, progress=False, make_figure=False)
  return out, summary


def test_toml_round_trip_reproduces_config(tiny_config_file, reference_run):
  out, _ = reference_run
  written = config_io.load_config(os.path.join(out, "config.toml"))
  original = config_io.load_config(tiny_config_file)
  assert written == original
  assert written.n_contexts == 3 and written.populations == (2, 3)
  # Keys not in the file keep the preset's values.
  assert written.reward_scale == presets.get_preset("smoke").reward_scale


def test_results_folder_contents(reference_run):
  out, summary = reference_run
  for name in ("config.toml", "summary.json", "curves.csv"):
    assert os.path.exists(os.path.join(out, name))
  assert not os.path.exists(os.path.join(out, "checkpoint.npz"))
  lines = open(os.path.join(out, "curves.csv")).read().splitlines()
  assert lines[0] == "round,n_users,mean,lower,upper"
  assert len(lines) == 1 + 240 * 2
  records = summary["_records"]
  cumulative = np.cumsum(records.regret.astype(np.float64), axis=-1)
  # Final mean cumulative regret in the summary equals the records' mean.
  for p, pop in enumerate(summary["populations"]):
    assert pop["final_cumulative_regret"]["mean"] == pytest.approx(cumulative[p, :, -1].mean())
  assert summary["environment"]["jax"]
  assert summary["config"]["name"] == "tiny"


@pytest.mark.parametrize("text, key", [
    ("horizonn = 3\n", "horizonn"),
    ("horizon = 'ten'\n", "horizon"),
    ("horizon = 2.5\n", "horizon"),
    ("record_kl = 1\n", "record_kl"),
    ("populations = [10, 'x']\n", "populations"),
    ("beta = -1.0\n", "beta"),
    ("preset = 'nope'\n", "preset"),
])
def test_bad_toml_is_refused(tmp_path, text, key):
  path = tmp_path / "bad.toml"
  path.write_text(text)
  with pytest.raises(ValueError, match=key):
    config_io.load_config(str(path))


def test_cli_errors_are_clean(tmp_path, capsys):
  path = tmp_path / "bad.toml"
  path.write_text("unknown_key = 1\n")
  assert cli.main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "unknown_key" in err and "Traceback" not in err
  assert cli.main(["run", "no-such-preset"]) == 2
  assert "paper-users" in capsys.readouterr().err  # lists the valid names


def test_presets_and_plot(reference_run, capsys):
  assert cli.main(["presets"]) == 0
  listing = capsys.readouterr().out
  assert "paper-users" in listing and "smoke" in listing
  out, _ = reference_run
  assert cli.main(["plot", out, "--log-x"]) == 0
  assert os.path.getsize(os.path.join(out, "figure_logx.png")) > 1000


def _start(args, env=None):
  return subprocess.Popen([sys.executable, "-m", "jaxbandit.cli", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _wait_for(path, process, timeout=240):
  start = time.time()
  while not os.path.exists(path):
    if process.poll() is not None:
      raise AssertionError(process.stdout.read().decode())
    if time.time() - start > timeout:
      process.kill()
      raise AssertionError("no checkpoint appeared")
    time.sleep(0.05)


@pytest.mark.parametrize("how", [
    "kill",
    pytest.param("sigint", marks=pytest.mark.slow),  # ~19 s; the handler's path, slow set
])
def test_resume_after_interruption_is_bit_identical(how, tiny_config_file, reference_run,
                                                    tmp_path):
  ref_out, _ = reference_run
  out = str(tmp_path / "run")
  process = _start(["run", tiny_config_file, "--out", out, "--quiet"])
  _wait_for(os.path.join(out, "checkpoint.npz"), process)
  if how == "kill":
    process.kill()
  else:
    process.send_signal(signal.SIGINT)
  code = process.wait(timeout=240)
  output = process.stdout.read().decode()
  # 40 chunks, each followed by a checkpoint: the signal lands mid-run.
  if how == "sigint":
    assert code == 130, output  # stopped cleanly after a chunk
    assert "--resume" in output
  assert code != 0, output
  assert not os.path.exists(os.path.join(out, "summary.json"))
  assert os.path.exists(os.path.join(out, "checkpoint.npz"))
  assert cli.main(["run", "--resume", out, "--quiet"]) == 0
  assert open(os.path.join(out, "curves.csv")).read() == \
      open(os.path.join(ref_out, "curves.csv")).read()


def test_resume_with_a_different_config_is_refused(tiny_config_file, reference_run, tmp_path,
                                                    capsys):
  ref_out, _ = reference_run
  assert cli.main(["run", "--resume", ref_out, "--horizon", "300"]) == 2
  assert "different config" in capsys.readouterr().err
  # A complete folder has nothing to resume.
  assert cli.main(["run", "--resume", ref_out]) == 2
  assert "already complete" in capsys.readouterr().err


def test_resume_from_a_checkpoint_of_another_state_layout_is_refused(reference_run, tmp_path,
                                                                     capsys):
  """A checkpoint whose state arrays do not match this version's state is refused clearly."""
  ref_out, _ = reference_run
  out = str(tmp_path / "old")
  os.makedirs(out)
  shutil.copy(os.path.join(ref_out, config_io.CONFIG_FILE), out)
  config = config_io.load_config(os.path.join(out, config_io.CONFIG_FILE))
  # One state array where the current state has many, as an older layout would.
  np.savez(os.path.join(out, "checkpoint.npz"), state_0=np.zeros(3, np.float32),
           rounds_done=np.asarray(5), fingerprint=np.asarray(config_io.config_fingerprint(config)))
  assert cli.main(["run", "--resume", out, "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "another layout" in err and "1 state arrays" in err and "new --out" in err


def test_a_checkpoint_resumes_under_the_other_regret_pass(tiny_config_file, tmp_path):
  """A checkpoint written with the fused pass's state (the candidate cache, as on a
  machine without the native kernel) loads into a certified run, and back: the regret
  state is replaced by a fresh one (scored in full in the next round), every other
  state array is kept as written."""
  import jax

  from jaxbandit import instance as instance_lib
  from jaxbandit import metrics
  from jaxbandit import simulate as sim

  config = config_io.load_config(tiny_config_file)
  stacked = instance_lib.stack_instances([a.instance for a in experiment.build_instances(config)])
  n_populations = len(config.populations)
  templates = {mode: sim.init_states(dataclasses.replace(config.simulation_config(),
                                                         regret_evaluation=mode),
                                     stacked, config.n_seeds)
               for mode in ("full", "certified")}
  for written, resumed in [("full", "certified"), ("certified", "full")]:
    states = templates[written]
    states = states._replace(round=states.round + 5,
                             params=states.params + np.float32(0.25))  # a state mid-run
    shape = (n_populations, config.n_seeds, 5)
    records = sim.RoundRecord(*[np.zeros(shape, np.float32)] * len(sim.RoundRecord._fields))
    out = tmp_path / f"{written}-to-{resumed}"
    out.mkdir()
    config_io.save_checkpoint(str(out), config, sim.Progress(5, config.horizon, states, records))
    loaded = config_io.load_checkpoint(str(out), config, templates[resumed]).states
    kind = metrics.CertifiedCells if resumed == "certified" else metrics.RegretCache
    assert isinstance(loaded.regret_cache, kind)
    for got, fresh in zip(jax.tree_util.tree_leaves(loaded.regret_cache),
                          jax.tree_util.tree_leaves(templates[resumed].regret_cache)):
      np.testing.assert_array_equal(got, np.asarray(fresh))
    for name in ("params", "round", "data", "solver"):
      for got, saved in zip(jax.tree_util.tree_leaves(getattr(loaded, name)),
                            jax.tree_util.tree_leaves(getattr(states, name))):
        np.testing.assert_array_equal(got, np.asarray(saved), err_msg=name)


def test_sweep_compiles_once_and_matches_single_runs(tmp_path, tiny_config_file):
  """A beta sweep is one compiled call whose lanes equal separate runs."""
  from jaxbandit import experiment, simulate

  config = config_io.load_config(tiny_config_file)
  config = dataclasses.replace(config, horizon=12, chunk_size=None, populations=(2,))
  simulate.make_chunk_kernel.cache_clear()
  summary = experiment.run_sweep(config, "beta", [0.3, 3.0], str(tmp_path / "sweep"),
                                 progress=False)
  assert simulate.make_chunk_kernel.cache_info().misses == 1  # one kernel for the grid
  records = summary["_records"]
  for lane, beta in enumerate([0.3, 3.0]):
    single = experiment.run_experiment(dataclasses.replace(config, beta=beta), None,
                                       progress=False)["_records"]
    np.testing.assert_array_equal(records.context[lane], single.context[0])
    np.testing.assert_allclose(records.regret[lane], single.regret[0], atol=1e-6)
  # The two temperatures change the trajectories (the sweep is not a no-op).
  assert not np.array_equal(records.regret[0], records.regret[1])
  rows = open(tmp_path / "sweep" / "sweep.csv").read().splitlines()
  assert len(rows) == 3 and rows[0].startswith("value,n_users")
  assert (tmp_path / "sweep" / "figure.png").stat().st_size > 1000
  assert cli.main(["sweep", tiny_config_file, "--param", "horizon", "--values", "1,2"]) == 2


def test_bench_forwards_to_the_benchmark_script(capsys):
  with pytest.raises(SystemExit) as stop:
    cli.main(["bench", "--", "--help"])
  assert stop.value.code == 0
  assert "--quick" in capsys.readouterr().out


def test_toml_instance_file_and_simulation_options(tmp_path):
  """Array-valued options reach the run through instance_file; scalar ones through keys."""
  rng = np.random.default_rng(0)
  arrays = {"contexts": rng.normal(size=(2, 2)), "actions": rng.normal(size=(2, 3, 2)),
            "maps": rng.normal(size=(2, 2, 2)) / 2, "heads": np.eye(2),
            "user_weights": np.array([0.25, 0.75]),
            "reference_policy": np.array([0.5, 0.5, 0.0])}
  np.savez(tmp_path / "inst.npz", **arrays)
  (tmp_path / "c.toml").write_text(
      f'preset = "smoke"\ninstance_file = "{tmp_path / "inst.npz"}"\npopulations = [2]\n'
      'horizon = 12\nn_seeds = 2\nfirst_seed = 5\nregret_evaluation = "full"\n'
      'data_layout = "table"\n')
  config = config_io.load_config(str(tmp_path / "c.toml"))
  assert config.simulation_config().data_layout == "table"
  summary = experiment.run_experiment(config, str(tmp_path / "out"), progress=False,
                                      make_figure=False)
  records = summary["_records"]
  assert records.regret.shape == (1, 2, 12)
  assert set(np.unique(records.user)) <= {0, 1}
  built = experiment.build_instances(config)[0].instance
  np.testing.assert_allclose(built.user_weights, [0.25, 0.75])
  np.testing.assert_allclose(built.reference_policy, [[0.5, 0.5, 0.0]] * 2)
  assert summary["populations"][0]["n_users"] == 2
  # first_seed shifts the seed ids: seeds 5 and 6 differ from seeds 0 and 1.
  shifted = dataclasses.replace(config, first_seed=0)
  other = experiment.run_experiment(shifted, None, progress=False)["_records"]
  assert not np.array_equal(other.context, records.context)
  (tmp_path / "bad.toml").write_text(f'instance_file = "{tmp_path / "inst.npz"}"\n'
                                     'populations = [3]\n')
  with pytest.raises(ValueError, match="populations"):
    experiment.build_instances(config_io.load_config(str(tmp_path / "bad.toml")))


CACHE_SCRIPT = """
import sys, jax, jax.numpy as jnp
from jaxbandit import cli
hits = []
jax.monitoring.register_event_listener(lambda name, **_: hits.append(name))
path = cli.use_compilation_cache(sys.argv[1], min_compile_seconds=0.0)
jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.cos(x))(jnp.arange(5.0)).block_until_ready()
print(path, sum(name.endswith("/cache_hits") for name in hits))
"""


def _cached_compile(folder, **env_extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAXBANDIT_NO_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
  env.update(env_extra)
  done = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(folder)], env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  path, hits = done.stdout.split()[-2:]
  return path, int(hits)


def test_console_script_cache_reuses_compiled_kernels_across_processes(tmp_path):
  """The console script's persistent compilation cache: the first process compiles and
  stores, a second one loads instead of compiling; the opt-outs leave JAX alone."""
  folder = tmp_path / "xla"
  assert _cached_compile(folder) == (str(folder), 0)
  assert any(folder.iterdir())  # the executable was written
  path, hits = _cached_compile(folder)  # a new process reads them back
  assert path == str(folder) and hits >= 1
  assert _cached_compile(tmp_path / "off", JAXBANDIT_NO_COMPILATION_CACHE="1") == ("None", 0)
  assert not (tmp_path / "off").exists()
  assert _cached_compile(tmp_path / "theirs", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "j"))[0] == (
      "None")
  assert cli.compilation_cache_dir().endswith(os.path.join("jaxbandit", "xla"))
