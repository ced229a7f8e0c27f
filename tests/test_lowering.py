"""The unrolled Threefry lowering on the CPU (jaxbandit.lowering).

The hash is checked against the Random123 known-answer vectors for
Threefry-2x32 with 20 rounds (an independent reference), both as a function
and through ``jax.random`` once registered; the registered program must hold
no loop, which is its point.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxbandit import lowering
from jaxbandit import simulate  # noqa: F401  (importing it registers the lowering)

# Random123's kat_vectors, threefry2x32_20: (key, counter) -> output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize("key,count,want", KNOWN_ANSWERS)
def test_unrolled_threefry_gives_the_known_answers(key, count, want):
  got = jax.jit(lowering.threefry2x32_unrolled)(*(np.uint32(v) for v in key + count))
  assert tuple(int(v) for v in got) == want


def test_registered_lowering_has_no_loop_and_draws_the_known_answers():
  assert lowering.unroll_threefry_on_cpu()
  from jax.extend.random import threefry_2x32

  keys = np.array([k for k, _, _ in KNOWN_ANSWERS], np.uint32)
  counts = np.array([c for _, c, _ in KNOWN_ANSWERS], np.uint32)
  hash_one = jax.jit(lambda key, count: threefry_2x32(key, count))
  for key, count, (_, _, want) in zip(keys, counts, KNOWN_ANSWERS):
    assert tuple(int(v) for v in hash_one(key, count)) == want
  program = jax.jit(lambda k: jax.random.uniform(k, (64,))).lower(jax.random.key(3)).as_text()
  assert "while" not in program and "threefry" in program
