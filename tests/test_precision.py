"""Every matrix product the package traces asks for full float32 precision.

By default JAX lets NVIDIA GPUs compute float32 products in TensorFloat-32
(10 mantissa bits) and TPUs in bfloat16 passes. A CPU always computes them in
full float32, so on CI's machine the results cannot show the difference; the
lowered programs can. Each ``stablehlo.dot_general`` must carry
``precision = [HIGHEST, HIGHEST]``, even when the caller has asked JAX for
bfloat16 products.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from jaxbandit import instance as instance_lib
from jaxbandit import simulate as S

DOT = re.compile(r"stablehlo\.dot_general\b")
HIGHEST = "precision = [HIGHEST, HIGHEST]"


def dot_lines(lowered) -> list[str]:
  return [line for line in lowered.as_text().splitlines() if DOT.search(line)]


def assert_every_product_highest(lowered, at_least: int) -> None:
  lines = dot_lines(lowered)
  assert len(lines) >= at_least, f"expected at least {at_least} dot_general, got {len(lines)}"
  loose = [line.strip() for line in lines if HIGHEST not in line]
  assert not loose, f"{len(loose)} of {len(lines)} products below full precision:\n" + \
      "\n".join(loose[:5])


def test_a_callers_lower_precision_is_visible_in_a_plain_jitted_product():
  # The check's own premise: the setting reaches the lowered text.
  with jax.default_matmul_precision("bfloat16"):
    lowered = jax.jit(lambda a, b: a @ b).lower(np.ones((3, 3), np.float32),
                                                 np.ones((3, 3), np.float32))
  lines = dot_lines(lowered)
  assert len(lines) == 1 and HIGHEST not in lines[0]


def test_true_scores_and_gap_summary_products_are_full_precision(tiny_instance):
  with jax.default_matmul_precision("bfloat16"):
    assert_every_product_highest(jax.jit(instance_lib.true_scores).lower(tiny_instance), 1)
    assert_every_product_highest(instance_lib._gap_summary.lower(tiny_instance), 1)


def test_every_product_in_the_chunk_kernel_is_full_precision(tiny_instance):
  # Lowered, not compiled: the carried-Hessian ERM (Woodbury, BFGS, the Newton
  # fallback's Hessian and solves), the queries and the regret evaluation.
  config = S.SimulationConfig(horizon=4, slate_size=2, choice_model="bradley_terry",
                              model_class="known_heads", slate_policy="current_reference")
  instances = jax.tree_util.tree_map(lambda x: x[None], tiny_instance)
  params = S.SimulationParams.make(beta=1.0, ridge=1.0)
  keys = S.seed_keys(0, np.arange(2))
  states = S.init_states(config, instances, 2)
  with jax.default_matmul_precision("bfloat16"):
    lowered = S.make_chunk_kernel(config, 2).lower(instances, params, keys, states)
  assert_every_product_highest(lowered, 5)
