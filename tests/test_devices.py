"""Seeds sharded over several local devices, and over two processes with jax.distributed.

Each case runs in fresh subprocesses (the device count is fixed when JAX starts)
and compares per-seed records with a one-device, one-process run.
"""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    mode, out = sys.argv[1], sys.argv[2]
    if mode.startswith("process"):
      pid, port = int(mode[-1]), sys.argv[3]
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                 process_id=pid)
    from jaxbandit import instance as I, simulate as S
    inst = I.make_instance(jax.random.key(3), n_contexts=3, n_actions=4, dim=2, latent_dim=2,
                           n_users=2)
    r = S.simulate(inst, S.SimulationConfig(horizon=8), n_seeds=6, master_seed=5)
    if jax.process_index() == 0:
      np.savez(out, regret=r.records.regret, realised=r.records.realised_regret,
               context=r.records.context, user=r.records.user, ids=r.seed_ids,
               devices=jax.device_count(), processes=jax.process_count())
""")


def _run(tmp_path, mode, env_extra=None, port=None):
  script = tmp_path / "run.py"
  script.write_text(SCRIPT)
  out = tmp_path / f"{mode}.npz"
  env = dict(os.environ, **(env_extra or {}))
  args = [sys.executable, str(script), mode, str(out)] + ([str(port)] if port else [])
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out


def _load(process, out):
  output = process.communicate(timeout=300)[0].decode()
  assert process.returncode == 0, output
  return np.load(out)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("one")
  return _load(*_run(tmp, "single"))


def _assert_same_seeds(a, b):
  # Draws bit-identical; regrets agree to float tolerance (bit-identical measured on CPU).
  np.testing.assert_array_equal(a["ids"], b["ids"])
  np.testing.assert_array_equal(a["context"], b["context"])
  np.testing.assert_array_equal(a["user"], b["user"])
  np.testing.assert_allclose(a["regret"], b["regret"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(a["realised"], b["realised"], rtol=0, atol=1e-6)


@pytest.mark.slow  # ~16 s; two processes (two devices in all) are checked in the default run
def test_four_local_devices_match_one(tmp_path, one_device):
  four = _load(*_run(tmp_path, "sharded",
                     {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}))
  assert int(four["devices"]) == 4
  assert four["regret"].shape == (1, 6, 8)  # 6 seeds padded to 8 lanes, extras dropped
  _assert_same_seeds(four, one_device)


def test_two_processes_match_one(tmp_path, one_device):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  first = _run(tmp_path, "process0", port=port)
  second = _run(tmp_path, "process1", port=port)
  output = second[0].communicate(timeout=300)[0].decode()
  assert second[0].returncode == 0, output
  both = _load(*first)
  assert int(both["processes"]) == 2
  _assert_same_seeds(both, one_device)


def _last_line_of_python(code: str, xla_flags: str) -> str:
  """Runs ``code`` in a fresh Python with ``XLA_FLAGS=xla_flags``; its last printed line.
  XLA aborts on an option it does not know, so a clean exit also says it accepted them."""
  done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, XLA_FLAGS=xla_flags),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  return done.stdout.strip().splitlines()[-1]


def _devices_after_use_every_core(env_extra):
  code = ("import os, jax\nfrom jaxbandit import cli\nn = cli.use_every_core()\n"
          "print(n, jax.local_device_count(), len(os.sched_getaffinity(0)))")
  return [int(v) for v in _last_line_of_python(code, env_extra["XLA_FLAGS"]).split()]


def test_console_script_uses_one_device_per_core_unless_told():
  """The CLI's run/sweep make one host device per available core (the seeds are then split
  over them); XLA_FLAGS's host device count, when given, wins (1 opts out)."""
  made, devices, cores = _devices_after_use_every_core({"XLA_FLAGS": ""})
  assert (made, devices) == (cores, cores)
  made, devices, _ = _devices_after_use_every_core(
      {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert (made, devices) == (0, 1)
  made, devices, _ = _devices_after_use_every_core(
      {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"})
  assert (made, devices) == (0, 3)


def _flags_after_use_deterministic_gpu_ops(flags):
  code = ("import os, jax\nfrom jaxbandit import cli\nadded = cli.use_deterministic_gpu_ops()\n"
          "jax.numpy.ones(2).block_until_ready()\nprint(repr((added, os.environ['XLA_FLAGS'])))")
  return eval(_last_line_of_python(code, flags))


def test_console_script_asks_for_deterministic_gpu_kernels_unless_told():
  added, flags = _flags_after_use_deterministic_gpu_ops("--xla_force_host_platform_device_count=1")
  assert added and flags.split() == ["--xla_force_host_platform_device_count=1",
                                     "--xla_gpu_deterministic_ops=true"]
  added, flags = _flags_after_use_deterministic_gpu_ops("--xla_gpu_deterministic_ops=false")
  assert not added and flags == "--xla_gpu_deterministic_ops=false"


RESUME_SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    from jaxbandit import instance as I, simulate as S
    assert jax.local_device_count() == 2
    inst = I.make_instance(jax.random.key(3), n_contexts=3, n_actions=4, dim=2, latent_dim=2,
                           n_users=2)
    config = S.SimulationConfig(horizon=8)
    # Every run below uses chunks of 4 rounds: two compiled kernels in all (1 and 2 devices).
    whole = S.simulate(inst, config, n_seeds=3, master_seed=5, chunk_size=4, n_devices=1)
    # Interrupted on one device (3 seed lanes) ...
    saved = []
    def stop(progress):
      saved.append(S.Progress(progress.rounds_done, progress.horizon,
                              jax.device_get(progress.states),
                              jax.tree_util.tree_map(np.copy, progress.records)))
      return True
    S.simulate(inst, config, n_seeds=3, master_seed=5, chunk_size=4, callback=stop, n_devices=1)
    # ... resumed on two (4 lanes: one fresh padding lane).
    resumed = S.simulate(inst, config, n_seeds=3, master_seed=5, chunk_size=4,
                         resume_from=saved[0], n_devices=2)
    for a, b in zip(whole.records, resumed.records):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("resumed-identical")
    # A fresh two-chunk run reuses the kernel the resume compiled (same input shardings).
    S.simulate(inst, config, n_seeds=3, master_seed=5, chunk_size=4, n_devices=2)
    print("compiled", S.make_chunk_kernel(config, 4, 2)._cache_size())
""")


def test_resume_on_more_devices_pads_fresh_lanes(tmp_path):
  """A run stopped on one device and resumed with its seeds split over two (one padding lane
  more) gives the records of an uninterrupted run, bit for bit; and a run of several chunks on
  two devices compiles its chunk kernel once."""
  script = tmp_path / "resume.py"
  script.write_text(RESUME_SCRIPT)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "resumed-identical" in done.stdout
  assert "compiled 1" in done.stdout, done.stdout
