"""Every public entry point rejects bad input on the host, before compiling.

One parametrized case per bad input. Each case asserts that a ``ValueError``
is raised whose message names the parameter, shows the bad value where it
can be shown, and says what is allowed (the ``allowed:`` clause of
``jaxbandit.validation``); and, for every entry point that validates before
touching JAX, that no XLA compilation happened during the call (counted
through ``jax.monitoring``) and that it raised fast.

The compile counter only sees compilations that are not cached, so the
instances built here use a shape no other test module uses (5 contexts x 3
actions, d=3, J=4, 2 users): if a check ran after a draw, the first such call
of the session would compile and fail its case.

The CLI cases check the exit code 2 returned by ``jaxbandit.cli.main`` and
that the message goes to stderr without a traceback; one case runs the real
console script in a subprocess. argparse's own type errors (``--seeds 2.5``)
exit through ``SystemExit(2)`` with its usage message instead of returning.

Bad inputs checked: the 147 ``CASES``, the 11 ``CLI_CASES``, an unreachable
``min_gap`` (which must draw instances, so it may compile), the argparse type
error and the subprocess run: 161 in all.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbandit import choice as choice_lib
from jaxbandit import cli
from jaxbandit import experiment as experiment_lib
from jaxbandit import instance as instance_lib
from jaxbandit import learners as learners_lib
from jaxbandit import policies as policies_lib
from jaxbandit import presets as presets_lib
from jaxbandit import simulate as S

# ---------------------------------------------------------------------------
# Compilation counter
# ---------------------------------------------------------------------------

_COMPILES = [0]


def _count_compiles(event, duration, **kwargs):
  del duration, kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)

# A host-side check takes milliseconds; a compile of the smallest kernel takes
# seconds. Generous for a loaded 2-core machine.
FAST_SECONDS = 1.0

# ---------------------------------------------------------------------------
# Inputs shared by the cases (built once, at import, outside any measurement)
# ---------------------------------------------------------------------------

SIZES = dict(n_contexts=5, n_actions=3, dim=3, latent_dim=4, n_users=2)
KEY = jax.random.key(0)
_RNG = np.random.default_rng(7)
ARRAYS = dict(contexts=_RNG.normal(size=(5, 3)), actions=_RNG.normal(size=(5, 3, 3)),
              maps=_RNG.normal(size=(4, 3, 3)), heads=_RNG.normal(size=(2, 4)))
INSTANCE = instance_lib.from_arrays(**ARRAYS)
# Context 0 supports only actions 0 and 1 (top_k slates of 3 impossible).
NARROW_REFERENCE = np.full((5, 3), 1.0 / 3.0)
NARROW_REFERENCE[0] = [0.5, 0.5, 0.0]
NARROW_INSTANCE = instance_lib.from_arrays(**ARRAYS, reference_policy=NARROW_REFERENCE)
CONFIG = S.SimulationConfig(horizon=3)
EXPERIMENT = experiment_lib.ExperimentConfig(
    name="validation", populations=(2,), n_contexts=5, n_actions=3, dim=3, latent_dim=4,
    problem_seed=0, horizon=3, n_seeds=1)
INT32_SEEDS = 2**32


def sizes(**override):
  return {**SIZES, **override}


def make(**override):
  return lambda: instance_lib.make_instance(KEY, **sizes(**override))


def arrays(**override):
  return {**{k: v.copy() for k, v in ARRAYS.items()}, **override}


def with_value(name, index, value):
  """ARRAYS with ``ARRAYS[name][index] = value``."""
  out = arrays()
  out[name][index] = value
  return out


def from_arrays(**override):
  return lambda: instance_lib.from_arrays(**arrays(**override))


def from_bad_array(name, index, value):
  return lambda: instance_lib.from_arrays(**with_value(name, index, value))


def simulate(config=CONFIG, instance=INSTANCE, params=None, **kwargs):
  kwargs.setdefault("n_seeds", 1)
  return lambda: S.simulate(instance, config, params, **kwargs)


def sim_config(**override):
  return dataclasses.replace(CONFIG, **override)


def experiment(**override):
  return lambda: dataclasses.replace(EXPERIMENT, **override).validate()


def run_experiment(out_dir):
  return lambda: experiment_lib.run_experiment(EXPERIMENT, out_dir, progress=False,
                                               make_figure=False)


def params(**override):
  return lambda: S.SimulationParams.make(**override)


def raw_params(beta=1.0, ridge=1.0, mixture_weight=0.5):
  """SimulationParams built directly, bypassing ``make``'s checks."""
  f = lambda v: jnp.asarray(v, jnp.float32)
  return S.SimulationParams(f(beta), f(ridge), f(mixture_weight))


def replaced(**fields):
  """INSTANCE with fields replaced directly (bypassing from_arrays' checks)."""
  return INSTANCE._replace(**{k: jnp.asarray(v, jnp.float32) for k, v in fields.items()})


NAN_HEADS = np.array(ARRAYS["heads"])
NAN_HEADS[1, 2] = np.nan
WIDE_HEADS = np.zeros((3, 4))
SHORT_RANK = instance_lib.low_rank_heads(5)  # above latent_dim=4

# (id, call, substrings the message must hold)
CASES = [
    # --- zero / negative sizes ---------------------------------------------
    ("make_instance-n_contexts-zero", make(n_contexts=0), ["n_contexts=0"]),
    ("make_instance-n_actions-negative", make(n_actions=-1), ["n_actions=-1"]),
    ("make_instance-dim-zero", make(dim=0), ["dim=0"]),
    ("make_instance-latent_dim-zero", make(latent_dim=0), ["latent_dim=0"]),
    ("make_instance-n_users-negative", make(n_users=-3), ["n_users=-3"]),
    ("experiment-n_contexts-zero", experiment(n_contexts=0), ["n_contexts=0"]),
    ("experiment-n_actions-zero", experiment(n_actions=0), ["n_actions=0"]),
    ("experiment-dim-negative", experiment(dim=-2), ["dim=-2"]),
    ("experiment-latent_dim-zero", experiment(latent_dim=0), ["latent_dim=0"]),
    ("experiment-populations-zero", experiment(populations=(2, 0)), ["populations", "0"]),
    ("experiment-populations-empty", experiment(populations=()), ["populations=()"]),
    ("experiment-n_seeds-zero", experiment(n_seeds=0), ["n_seeds=0"]),
    ("experiment-horizon-zero", experiment(horizon=0), ["horizon=0"]),
    ("experiment-max_tries-zero", experiment(max_tries=0), ["max_tries=0"]),
    ("simulate-horizon-zero", simulate(sim_config(horizon=0)), ["horizon=0"]),
    ("simulate-horizon-negative", simulate(sim_config(horizon=-5)), ["horizon=-5"]),
    ("simulate-n_seeds-zero", simulate(n_seeds=0), ["n_seeds=0"]),
    ("simulate-n_seeds-negative", simulate(n_seeds=-1), ["n_seeds=-1"]),
    ("simulate-chunk_size-zero", simulate(chunk_size=0), ["chunk_size=0"]),
    ("simulate-chunk_size-above-horizon", simulate(chunk_size=4), ["chunk_size=4", "horizon=3"]),
    ("experiment-chunk_size-zero", experiment(chunk_size=0), ["chunk_size=0"]),
    ("pad_users-below-population", lambda: instance_lib.pad_users(INSTANCE, 1),
     ["n_users=1"]),
    ("stack_instances-empty", lambda: instance_lib.stack_instances([]), ["instances"]),
    # --- slate sizes, top_m, top_k ------------------------------------------
    ("simulate-slate_size-one", simulate(sim_config(slate_size=1)), ["slate_size=1"]),
    ("simulate-slate_size-above-n_actions",
     simulate(sim_config(slate_size=4, choice_model="multinomial_logit")),
     ["slate_size=4", "n_actions=3"]),
    ("config-slate_size-one", lambda: sim_config(slate_size=1).validate(), ["slate_size=1"]),
    ("experiment-slate_size-one", experiment(slate_size=1), ["slate_size=1"]),
    ("experiment-slate_size-above-n_actions",
     experiment(slate_size=4, choice_model="plackett_luce"), ["slate_size=4", "n_actions=3"]),
    ("simulate-bradley_terry-slate-3", simulate(sim_config(slate_size=3)),
     ["slate_size=3", "bradley_terry"]),
    ("experiment-bradley_terry-slate-3", experiment(slate_size=3),
     ["slate_size=3", "bradley_terry"]),
    ("simulate-top_m-above-slate",
     simulate(sim_config(slate_size=2, choice_model="plackett_luce", top_m=3)),
     ["top_m=3", "slate_size=2"]),
    ("experiment-top_m-above-slate",
     experiment(slate_size=3, choice_model="plackett_luce", top_m=4), ["top_m=4"]),
    ("simulate-top_m-zero", simulate(sim_config(choice_model="plackett_luce", top_m=0)),
     ["top_m=0"]),
    ("plackett_luce-top_m-negative", lambda: choice_lib.plackett_luce(-1), ["top_m=-1"]),
    ("simulate-top_k-above-support",
     simulate(sim_config(slate_size=3, choice_model="multinomial_logit", slate_policy="top_k"),
              instance=NARROW_INSTANCE), ["slate_size=3", "top_k", "2"]),
    # --- temperature, ridge, mixture weight, reward scale ---------------------
    ("params-beta-zero", params(beta=0.0), ["beta=0.0"]),
    ("params-beta-negative", params(beta=-1.0), ["beta=-1.0"]),
    ("params-beta-nan", params(beta=float("nan")), ["beta=nan"]),
    ("params-beta-inf", params(beta=float("inf")), ["beta=inf"]),
    ("params-ridge-negative", params(ridge=-0.5), ["ridge=-0.5"]),
    ("params-ridge-inf", params(ridge=float("inf")), ["ridge=inf"]),
    ("params-mixture_weight-above-one", params(mixture_weight=1.5), ["mixture_weight=1.5"]),
    ("params-mixture_weight-negative", params(mixture_weight=-0.1), ["mixture_weight=-0.1"]),
    ("params-mixture_weight-nan", params(mixture_weight=float("nan")), ["mixture_weight=nan"]),
    ("experiment-beta-zero", experiment(beta=0.0), ["beta=0.0"]),
    ("experiment-ridge-negative", experiment(ridge=-1.0), ["ridge=-1.0"]),
    ("experiment-mixture_weight-above-one", experiment(mixture_weight=2.0),
     ["mixture_weight=2.0"]),
    ("simulate-raw-params-beta-negative", simulate(params=raw_params(beta=-1.0)), ["beta"]),
    ("simulate-raw-params-ridge-negative", simulate(params=raw_params(ridge=-2.0)), ["ridge"]),
    ("simulate-raw-params-mixture_weight-nan",
     simulate(params=raw_params(mixture_weight=np.nan)), ["mixture_weight"]),
    ("make_instance-reward_scale-zero", make(reward_scale=0.0), ["reward_scale=0.0"]),
    ("make_instance-reward_scale-inf", make(reward_scale=float("inf")), ["reward_scale=inf"]),
    ("from_arrays-reward_scale-negative", from_arrays(reward_scale=-2.0),
     ["reward_scale=-2.0"]),
    ("experiment-reward_scale-zero", experiment(reward_scale=0.0), ["reward_scale=0.0"]),
    ("simulate-instance-reward_scale-zero", simulate(instance=replaced(reward_scale=0.0)),
     ["reward_scale"]),
    ("experiment-erm_tol-zero", experiment(erm_tol=0.0), ["erm_tol=0.0"]),
    ("simulate-erm_max_iterations-zero", simulate(sim_config(erm_max_iterations=0)),
     ["erm_max_iterations=0"]),
    ("simulate-rescore_budget-zero", simulate(sim_config(rescore_budget=0)),
     ["rescore_budget=0"]),
    ("experiment-eps0-negative", experiment(eps0=-1.0), ["eps0=-1.0"]),
    # --- weights: negative, non-finite, not summing to 1, wrong shape --------
    ("make_instance-context_weights-negative",
     make(context_weights=[1.2, -0.2, 0.0, 0.0, 0.0]), ["context_weights", "-0.2"]),
    ("make_instance-context_weights-nan",
     make(context_weights=[np.nan, 0.25, 0.25, 0.25, 0.25]), ["context_weights", "nan"]),
    ("make_instance-context_weights-sum",
     make(context_weights=[0.1, 0.1, 0.1, 0.1, 0.1]), ["context_weights", "0.5"]),
    ("make_instance-context_weights-shape", make(context_weights=[0.5, 0.5]),
     ["context_weights", "(2,)"]),
    ("make_instance-user_weights-negative", make(user_weights=[1.5, -0.5]),
     ["user_weights", "-0.5"]),
    ("make_instance-user_weights-inf", make(user_weights=[np.inf, 0.0]),
     ["user_weights", "inf"]),
    ("make_instance-user_weights-sum", make(user_weights=[1.0, 1.0]), ["user_weights", "2.0"]),
    ("make_instance-reference_policy-negative",
     make(reference_policy=[1.5, -0.5, 0.0]), ["reference_policy", "-0.5"]),
    ("make_instance-reference_policy-nan",
     make(reference_policy=[np.nan, 0.5, 0.5]), ["reference_policy", "nan"]),
    ("make_instance-reference_policy-row-sum",
     make(reference_policy=np.vstack([np.full((4, 3), 1 / 3), [0.2, 0.2, 0.2]])),
     ["reference_policy row 4", "0.6"]),
    ("make_instance-reference_policy-shape", make(reference_policy=np.full((3, 3), 1 / 3)),
     ["reference_policy", "(3, 3)"]),
    ("from_arrays-context_weights-sum", from_arrays(context_weights=[0.5] * 5),
     ["context_weights", "2.5"]),
    ("from_arrays-user_weights-negative", from_arrays(user_weights=[2.0, -1.0]),
     ["user_weights", "-1.0"]),
    ("from_arrays-reference_policy-row-sum",
     from_arrays(reference_policy=np.full((5, 3), 0.5)), ["reference_policy row", "1.5"]),
    ("simulate-instance-user_weights-sum", simulate(instance=replaced(user_weights=[0.75, 0.75])),
     ["user_weights sums to 1.5"]),
    ("simulate-instance-context_weights-negative",
     simulate(instance=replaced(context_weights=[1.5, -0.5, 0.0, 0.0, 0.0])),
     ["context_weights", "-0.5"]),
    ("simulate-instance-reference_policy-row-sum",
     simulate(instance=replaced(reference_policy=np.full((5, 3), 0.2))), ["reference_policy"]),
    # --- heads and maps of the wrong shape; head rank ------------------------
    ("from_arrays-contexts-1d", from_arrays(contexts=ARRAYS["contexts"][0]), ["contexts", "(3,)"]),
    ("from_arrays-actions-shape", from_arrays(actions=ARRAYS["actions"][:, :, :2]),
     ["actions", "(5, 3, 2)"]),
    ("from_arrays-actions-contexts", from_arrays(actions=ARRAYS["actions"][:4]),
     ["actions", "(4, 3, 3)"]),
    ("from_arrays-maps-shape", from_arrays(maps=ARRAYS["maps"][:, :2]), ["maps", "(4, 2, 3)"]),
    ("from_arrays-maps-2d", from_arrays(maps=ARRAYS["maps"][0]), ["maps", "(3, 3)"]),
    ("from_arrays-heads-shape", from_arrays(heads=ARRAYS["heads"][:, :3]), ["heads", "(2, 3)"]),
    ("supplied_heads-shape", make(heads=instance_lib.supplied_heads(WIDE_HEADS)),
     ["heads", "(3, 4)", "n_users"]),
    ("supplied_heads-1d", lambda: instance_lib.supplied_heads(np.zeros(4)), ["heads", "(4,)"]),
    ("low_rank_heads-rank-above-latent_dim", make(heads=SHORT_RANK), ["rank=5", "latent_dim=4"]),
    ("low_rank_heads-rank-zero", lambda: instance_lib.low_rank_heads(0), ["rank=0"]),
    ("experiment-head_rank-above-latent_dim", experiment(head_rank=5),
     ["head_rank=5", "latent_dim=4"]),
    ("experiment-head_rank-zero", experiment(head_rank=0), ["head_rank=0"]),
    # --- NaN / infinity in supplied arrays -------------------------------------
    ("from_arrays-contexts-nan", from_bad_array("contexts", (1, 0), np.nan),
     ["contexts", "nan", "(1, 0)"]),
    ("from_arrays-actions-inf", from_bad_array("actions", (0, 2, 1), np.inf),
     ["actions", "inf", "(0, 2, 1)"]),
    ("from_arrays-maps-nan", from_bad_array("maps", (3, 1, 1), np.nan), ["maps", "nan"]),
    ("from_arrays-heads-neg-inf", from_bad_array("heads", (0, 0), -np.inf), ["heads", "-inf"]),
    ("from_arrays-context_weights-nan",
     from_arrays(context_weights=[np.nan, 0.25, 0.25, 0.25, 0.25]), ["context_weights", "nan"]),
    ("from_arrays-user_weights-inf", from_arrays(user_weights=[0.0, np.inf]),
     ["user_weights", "inf"]),
    ("from_arrays-reference_policy-nan",
     from_arrays(reference_policy=np.full((5, 3), np.nan)), ["reference_policy", "nan"]),
    ("from_arrays-reward_scale-nan", from_arrays(reward_scale=np.nan), ["reward_scale=nan"]),
    ("supplied_heads-nan", lambda: instance_lib.supplied_heads(NAN_HEADS), ["heads", "nan"]),
    ("simulate-instance-heads-nan", simulate(instance=replaced(heads=NAN_HEADS)),
     ["heads", "nan"]),
    ("simulate-instance-actions-inf",
     simulate(instance=replaced(actions=np.full((5, 3, 3), np.inf))), ["actions", "inf"]),
    # --- unknown names (the message lists the valid ones) -------------------
    ("preset-unknown", lambda: presets_lib.get_preset("nope"),
     ["preset='nope'", "'paper-users'", "'smoke'"]),
    ("simulate-model_class-unknown", simulate(sim_config(model_class="linear")),
     ["model_class='linear'", *map(repr, learners_lib.MODEL_CLASSES)]),
    ("simulate-choice_model-unknown", simulate(sim_config(choice_model="logit")),
     ["choice_model='logit'", *map(repr, choice_lib.CHOICE_MODELS)]),
    ("simulate-slate_policy-unknown", simulate(sim_config(slate_policy="greedy")),
     ["slate_policy='greedy'", *map(repr, policies_lib.SLATE_POLICIES)]),
    ("simulate-seed_batching-unknown", simulate(sim_config(seed_batching="gpu")),
     ["seed_batching='gpu'", "'vmap'", "'map'"]),
    ("simulate-regret_evaluation-unknown", simulate(sim_config(regret_evaluation="approx")),
     ["regret_evaluation='approx'", "'auto'", "'full'", "'incremental'", "'certified'"]),
    ("simulate-erm_gradient-unknown", simulate(sim_config(erm_gradient="fast")),
     ["erm_gradient='fast'", "'auto'", "'xla'", "'native'"]),
    ("simulate-erm_gradient-native-known_directions",
     simulate(sim_config(erm_gradient="native", model_class="known_directions")),
     ["erm_gradient='native'", "model_class='known_directions'", "'known_heads'", "'xla'"]),
    ("experiment-model_class-unknown", experiment(model_class="linear"),
     ["model_class='linear'", "'known_heads'"]),
    ("experiment-choice_model-unknown", experiment(choice_model="bt"),
     ["choice_model='bt'", "'bradley_terry'"]),
    ("experiment-slate_policy-unknown", experiment(slate_policy="greedy"),
     ["slate_policy='greedy'", "'current_reference'"]),
    ("get_choice_model-unknown", lambda: choice_lib.get_choice_model("probit"),
     ["choice_model='probit'", "'plackett_luce'"]),
    ("make_slate_policy-unknown", lambda: policies_lib.make_slate_policy("best", 2),
     ["slate_policy='best'", "'top_k'"]),
    ("make_model_class-unknown", lambda: learners_lib.make_model_class("tree", INSTANCE),
     ["model_class='tree'", "'pooled'"]),
    # --- minimum-gap acceptance ------------------------------------------------
    ("accept_problem_seed-min_gap-negative",
     lambda: instance_lib.accept_problem_seed(0, min_gap=-1.0, **SIZES), ["min_gap=-1.0"]),
    ("accept_problem_seed-min_gap-nan",
     lambda: instance_lib.accept_problem_seed(0, min_gap=float("nan"), **SIZES),
     ["min_gap=nan"]),
    ("accept_problem_seed-max_tries-zero",
     lambda: instance_lib.accept_problem_seed(0, min_gap=0.0, max_tries=0, **SIZES),
     ["max_tries=0"]),
    ("accept_problem_seed-problem_seed-negative",
     lambda: instance_lib.accept_problem_seed(-1, min_gap=0.0, **SIZES), ["problem_seed=-1"]),
    ("accept_problem_seed-problem_seed-above-32-bits",
     lambda: instance_lib.accept_problem_seed(INT32_SEEDS, min_gap=0.0, **SIZES),
     ["problem_seed=4294967296"]),
    ("accept_problem_seed-n_users-zero",
     lambda: instance_lib.accept_problem_seed(0, min_gap=0.0, **sizes(n_users=0)),
     ["n_users=0"]),
    ("experiment-min_gap-negative", experiment(min_gap=-0.5), ["min_gap=-0.5"]),
    ("experiment-problem_seed-above-32-bits", experiment(problem_seed=INT32_SEEDS),
     ["problem_seed=4294967296"]),
    # --- output folder -----------------------------------------------------------
    ("run_experiment-out-proc", run_experiment("/proc/forbidden/results"),
     ["out='/proc/forbidden/results'"]),
    ("run_experiment-out-under-a-file", run_experiment(os.path.abspath(__file__) + "/results"),
     ["out=", "test_validation.py/results"]),
    # --- wrong types -------------------------------------------------------------
    ("make_instance-n_users-str", make(n_users="2"), ["n_users='2'"]),
    ("make_instance-n_users-bool", make(n_users=True), ["n_users=True"]),
    ("make_instance-n_actions-float", make(n_actions=2.5), ["n_actions=2.5"]),
    ("make_instance-dim-float-integral", make(dim=3.0), ["dim=3.0"]),
    ("make_instance-reward_scale-str", make(reward_scale="1"), ["reward_scale='1'"]),
    ("simulate-horizon-float", simulate(sim_config(horizon=2.5)), ["horizon=2.5"]),
    ("simulate-slate_size-float", simulate(sim_config(slate_size=2.0)), ["slate_size=2.0"]),
    ("simulate-top_m-bool", simulate(sim_config(choice_model="plackett_luce", top_m=True)),
     ["top_m=True"]),
    ("simulate-record_kl-str", simulate(sim_config(record_kl="yes")), ["record_kl='yes'"]),
    ("simulate-n_seeds-str", simulate(n_seeds="4"), ["n_seeds='4'"]),
    ("simulate-n_seeds-bool", simulate(n_seeds=True), ["n_seeds=True"]),
    ("simulate-master_seed-float", simulate(master_seed=2.0), ["master_seed=2.0"]),
    ("simulate-master_seed-negative", simulate(master_seed=-1), ["master_seed=-1"]),
    ("simulate-master_seed-above-32-bits", simulate(master_seed=INT32_SEEDS),
     ["master_seed=4294967296"]),
    ("simulate-first_seed-negative", simulate(first_seed=-1), ["first_seed=-1"]),
    ("simulate-n_devices-zero", simulate(n_devices=0), ["n_devices=0"]),
    ("simulate-n_devices-above-local", simulate(n_devices=1000), ["n_devices=1000"]),
    ("simulate-seed-ids-above-32-bits", simulate(first_seed=INT32_SEEDS - 1, n_seeds=2),
     ["first_seed=4294967295", "n_seeds=2"]),
    ("params-beta-str", params(beta="1.0"), ["beta='1.0'"]),
    ("params-ridge-bool", params(ridge=True), ["ridge=True"]),
    ("experiment-n_seeds-str", experiment(n_seeds="4"), ["n_seeds='4'"]),
    ("experiment-horizon-bool", experiment(horizon=True), ["horizon=True"]),
    ("experiment-populations-float", experiment(populations=(2.5,)), ["populations", "2.5"]),
    ("experiment-populations-str", experiment(populations="10"), ["populations='10'"]),
    ("experiment-record_kl-int", experiment(record_kl=1), ["record_kl=1"]),
    ("experiment-master_seed-above-32-bits", experiment(master_seed=INT32_SEEDS),
     ["master_seed=4294967296"]),
]

@pytest.mark.parametrize("call,expected", [pytest.param(c, e, id=i) for i, c, e in CASES])
def test_bad_input_raises_before_compiling(call, expected):
  compiles = _COMPILES[0]
  started = time.perf_counter()
  with pytest.raises(ValueError) as info:
    call()
  elapsed = time.perf_counter() - started
  message = str(info.value)
  for part in expected:
    assert part in message, f"{part!r} missing from: {message}"
  assert "allowed" in message, message
  assert _COMPILES[0] == compiles, f"compiled before rejecting: {message}"
  assert elapsed < FAST_SECONDS, f"took {elapsed:.2f}s to reject: {message}"


@pytest.mark.parametrize("kwargs", [dict(n_seeds=0), dict(master_seed=-1), dict(chunk_size=0),
                                    dict(n_devices=0)], ids=lambda k: next(iter(k)))
def test_argument_errors_do_not_wait_for_the_native_build(monkeypatch, kwargs):
  """simulate's own arguments are checked before anything asks for the native kernels,
  whose first use in a process builds them (seconds): the native module is never asked."""
  from jaxbandit import native

  asked = []
  monkeypatch.setattr(native, "status", lambda: asked.append(1) or native.Status(False, "x"))
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    simulate(**kwargs)()
  assert not asked


def test_unreachable_min_gap_raises_after_max_tries_quickly():
  started = time.perf_counter()
  with pytest.raises(ValueError) as info:
    instance_lib.accept_problem_seed(0, min_gap=1e6, max_tries=3, **SIZES)
  message = str(info.value)
  for part in ("min_gap=1000000.0", "max_tries=3", "allowed"):
    assert part in message, message
  assert time.perf_counter() - started < 30.0


def test_valid_boundary_values_are_accepted():
  """The checks are not stricter than documented: NumPy integers, weights summing to 1."""
  instance_lib.make_instance(KEY, **sizes(n_users=np.int64(2)),
                             user_weights=np.array([1.0, 0.0], np.float32),
                             reference_policy=[0.5, 0.5, 0.0])
  S.SimulationParams.make(beta=1e-6, ridge=0.0, mixture_weight=1.0)
  S.SimulationParams.make(beta=np.float32(2.0), ridge=np.int64(1), mixture_weight=0)
  sim_config(slate_size=3, choice_model="plackett_luce", top_m=3).validate(n_actions=3)
  dataclasses.replace(EXPERIMENT, head_rank=4, master_seed=INT32_SEEDS - 1).validate()


# ---------------------------------------------------------------------------
# Command line: exit code 2, message on stderr, no traceback
# ---------------------------------------------------------------------------

RUN = ["run", "--quiet"]
CLI_CASES = [
    ("out-proc", RUN + ["--preset", "smoke", "--out", "/proc/forbidden"],
     ["out='/proc/forbidden'"]),
    ("preset-unknown", RUN + ["--preset", "nope"], ["preset='nope'", "'smoke'"]),
    ("target-unknown-preset", RUN + ["nope"], ["preset='nope'", "'paper-users'"]),
    ("target-missing-toml", RUN + ["/nonexistent/config.toml"], ["/nonexistent/config.toml"]),
    ("resume-missing-folder", RUN + ["--resume", "/nonexistent/run"], ["'/nonexistent/run'"]),
    ("seeds-zero", RUN + ["--preset", "smoke", "--seeds", "0"], ["n_seeds=0"]),
    ("horizon-zero", RUN + ["--preset", "smoke", "--horizon", "0"], ["horizon=0"]),
    ("horizon-negative", RUN + ["--preset", "paper-users", "--horizon", "-5"], ["horizon=-5"]),
    ("chunk-size-zero", RUN + ["--preset", "smoke", "--chunk-size", "0"], ["chunk_size=0"]),
    ("chunk-size-above-horizon", RUN + ["--preset", "smoke", "--chunk-size", "61"],
     ["chunk_size=61", "horizon=60"]),
    ("plot-missing-folder", ["plot", "/nonexistent/results"], ["'/nonexistent/results'"]),
]


@pytest.mark.parametrize("argv,expected", [pytest.param(a, e, id=i) for i, a, e in CLI_CASES])
def test_cli_rejects_bad_input_with_exit_code_2(argv, expected, capsys):
  compiles = _COMPILES[0]
  code = cli.main(argv)
  captured = capsys.readouterr()
  assert code == 2
  assert captured.err.startswith("jaxbandit: error: "), captured.err
  for part in expected + ["allowed"]:
    assert part in captured.err, captured.err
  assert "Traceback" not in captured.err and "error" not in captured.out
  assert _COMPILES[0] == compiles


def test_cli_type_error_is_a_usage_error(capsys):
  """argparse rejects a non-integer --seeds with its usage message and exit status 2."""
  with pytest.raises(SystemExit) as info:
    cli.main(["run", "--preset", "smoke", "--seeds", "2.5"])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert "--seeds" in err and "2.5" in err and "Traceback" not in err


def test_console_script_reports_unwritable_out_on_stderr():
  started = time.perf_counter()
  completed = subprocess.run(
      [sys.executable, "-c", "import sys; from jaxbandit.cli import main; sys.exit(main())",
       "run", "--preset", "smoke", "--quiet", "--out", "/proc/forbidden"],
      capture_output=True, text=True, timeout=120)
  assert completed.returncode == 2, completed
  assert "out='/proc/forbidden'" in completed.stderr
  assert "allowed" in completed.stderr
  assert "Traceback" not in completed.stderr
  assert "error" not in completed.stdout
  assert time.perf_counter() - started < 60.0

