"""Tests of jaxbandit.native: building, caching and refusing the native CPU kernels.

The kernels' results are checked against NumPy in tests/test_metrics.py (the
certified pass) and tests/test_learners.py (the ERM gradient), and against
the XLA passes in tests/test_simulate.py.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import stat

import pytest

from jaxbandit import native
from jaxbandit import simulate as S

CONFIG = S.SimulationConfig(horizon=10, seed_batching="map")


def test_the_kernel_builds_once_into_the_cache_and_registers():
  status = native.status()
  assert status.available, status.reason
  library = pathlib.Path(status.reason)
  assert library.is_file() and library.parent.parent == native.cache_dir()
  assert native.status() == status  # built once per process, then cached
  # Another process (the same source, compiler and CPU) loads the same file.
  assert native.build_and_register() == status
  assert S.resolve_regret_evaluation(CONFIG) == "certified"
  assert S.resolve_erm_gradient(CONFIG) == "native"
  # 'auto' takes the gradient kernel where its vector path runs: the
  # outer-product classes, Bradley-Terry, at most 8 factors.
  assert S.resolve_erm_gradient(CONFIG, 8) == "native"
  for other, n_factors in [(dataclasses.replace(CONFIG, model_class="known_directions"), None),
                           (dataclasses.replace(CONFIG, choice_model="multinomial_logit"), None),
                           (CONFIG, 9)]:
    assert S.resolve_erm_gradient(other, n_factors) == "xla"
  explicit = dataclasses.replace(CONFIG, choice_model="multinomial_logit", erm_gradient="native")
  assert S.resolve_erm_gradient(explicit, 9) == "native"


def test_turned_off_by_the_environment(monkeypatch):
  monkeypatch.setenv("JAXBANDIT_NATIVE", "0")
  assert not native.available()
  assert "JAXBANDIT_NATIVE=0" in native.status().reason
  assert S.resolve_regret_evaluation(CONFIG) == "full"  # 'auto' falls back
  with pytest.raises(ValueError, match="needs the native CPU kernel.*JAXBANDIT_NATIVE=0"):
    S.resolve_regret_evaluation(dataclasses.replace(CONFIG, regret_evaluation="certified"))
  assert S.resolve_erm_gradient(CONFIG) == "xla"
  with pytest.raises(ValueError, match="erm_gradient='native' needs the native CPU kernels"):
    S.resolve_erm_gradient(dataclasses.replace(CONFIG, erm_gradient="native"))


def test_a_missing_or_failing_compiler_is_reported_not_raised(tmp_path):
  missing = native.build_and_register(compiler=str(tmp_path / "no-such-c++"),
                                      directory=tmp_path / "cache")
  assert not missing.available and "no-such-c++" in missing.reason
  failing = tmp_path / "failing-c++"
  failing.write_text("#!/bin/sh\necho 'error: this compiler always fails' >&2\nexit 1\n")
  failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
  failed = native.build_and_register(compiler=str(failing), directory=tmp_path / "cache")
  assert not failed.available
  assert "failed" in failed.reason and "this compiler always fails" in failed.reason
  assert not any(path.suffix == ".so" for path in (tmp_path / "cache").rglob("*"))


def test_certified_with_the_kl_regret_is_refused_before_compiling():
  config = dataclasses.replace(CONFIG, regret_evaluation="certified", record_kl=True)
  with pytest.raises(ValueError, match="record_kl=True"):
    S.resolve_regret_evaluation(config)
  assert S.resolve_regret_evaluation(dataclasses.replace(config, regret_evaluation="auto")) == \
      "full"


def test_the_sources_ship_with_the_package():
  for source in native.SOURCES:
    assert source.is_file() and source.suffix == ".cc"
    assert os.path.commonpath([source, pathlib.Path(native.__file__).parent]) == \
        str(pathlib.Path(native.__file__).parent)
