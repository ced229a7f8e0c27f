"""Shared test settings and fixtures.

The package runs in float32 (x64 stays off); the tests' references are
float64 NumPy/SciPy and each test states how far float32 may drift from them.

Strict JAX settings (STYLE.md, "optimistix / equinox") are opt-in per module
with ``pytestmark = pytest.mark.usefixtures("strict_jax")``: implicit rank
promotion then raises, so a broadcast the code did not mean fails loudly.

Compilation dominates test time, so instances are tiny and shared: modules
use the ``tiny_instance`` shape where they can, and jitted exact-ERM fits are
built once per choice model for the whole session (``jit_fit``).
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import inspect
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbandit import choice as choice_lib
from jaxbandit import instance as instance_lib
from jaxbandit import learners as learners_lib

assert not jax.config.jax_enable_x64, "the package is tested in float32 (x64 off)"

# Console scripts the tests start (subprocesses inherit this) compile afresh and write
# nothing under the user's cache folder; test_cli checks the cache on its own folder.
os.environ.setdefault("JAXBANDIT_NO_COMPILATION_CACHE", "1")


def load_benchmark_module(filename: str):
  """Imports ``benchmarks/<filename>`` by path (``benchmarks`` is not installed)."""
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / filename
  spec = importlib.util.spec_from_file_location(f"benchmarks_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


# The shape shared by most tests: 4 contexts, 5 actions, d=2, J=3, 3 users.
TINY_SIZES = dict(n_contexts=4, n_actions=5, dim=2, latent_dim=3, n_users=3)


@pytest.fixture
def strict_jax():
  """Runs a test with ``jax_numpy_rank_promotion='raise'``."""
  with jax.numpy_rank_promotion("raise"):
    yield


@pytest.fixture(scope="session")
def tiny_instance() -> instance_lib.Instance:
  """A small Gaussian instance (key 0), uniform weights and reference policy."""
  return instance_lib.make_instance(jax.random.key(0), **TINY_SIZES)


@pytest.fixture
def rng() -> np.random.Generator:
  """A fresh seeded NumPy generator for test-side randomness."""
  return np.random.default_rng(20260517)


# Traces of the shared jitted fits, keyed (choice_name, top_m, model class name).
jit_fit_traces: collections.Counter = collections.Counter()

# fit_erm's own default stopping tolerance, read from its signature.
DEFAULT_TOL = inspect.signature(learners_lib.fit_erm).parameters["tol"].default


@functools.lru_cache(maxsize=None)
def _jit_fit(choice_name: str, top_m):
  choice_model = choice_lib.get_choice_model(choice_name, top_m)

  @jax.jit
  def fit(model, params_init, data, ridge, tol):
    jit_fit_traces[(choice_name, top_m, model.name)] += 1  # runs only while tracing
    # The per-user Hessian adds a (q, q) identity to a (U, q, q) batch by
    # implicit rank promotion, so the solver is traced with promotion allowed
    # even inside a strict test; everything around it stays strict.
    with jax.numpy_rank_promotion("allow"):
      return learners_lib.fit_erm(model, choice_model, params_init, data, ridge, tol=tol)

  def call(model, params_init, data, ridge, tol=DEFAULT_TOL):
    return fit(model, params_init, data, jnp.float32(ridge), jnp.float32(tol))

  return call


@pytest.fixture(scope="session")
def jit_fit():
  """``jit_fit(choice_name, top_m=None)`` -> ``(model, params, data, ridge, tol=default)`` fit.

  One jitted exact-ERM function per choice model for the whole session
  (default ``max_iterations``); the model class is an argument and the ridge
  and ``tol`` are traced, so a new ridge, tolerance or dataset of the same
  shape does not recompile. Each trace is counted in ``jit_fit_traces``.
  """
  return lambda choice_name, top_m=None: _jit_fit(choice_name, top_m)
