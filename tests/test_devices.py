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
