"""How the kernel's random numbers are lowered on the CPU: Threefry unrolled.

JAX lowers its Threefry-2x32 hash on the CPU as a rolled loop (five trips of
four rounds, to keep programs small), while every other backend gets the
twenty rounds unrolled. A simulator round hashes for its context, user, slate
and choice draws, and each rolled hash is a ``while`` loop of its own, whose
body XLA:CPU runs as separate operations: 320 of the about 930 operations of
a late round (one seed, t = 2,000). Unrolled, the round's compiled program
has 16 loops instead of 24, and a round took 7-9% less time (median of 12
interleaved runs of 200 rounds in one process, at t = 200, 2,000 and 4,000;
``benchmarks/RESULTS.md``, thirteenth session).

:func:`unroll_threefry_on_cpu` registers an unrolled CPU lowering of
``jax.extend.random.threefry2x32_p`` written here from the published
algorithm (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011: Threefry-2x32, 20 rounds). It computes the same function, so every
draw is the same bit for bit (the tests check the Random123 known-answer
vectors; the simulator's records were compared field by field with runs
without it); only the program XLA runs changes. The registration is
process-wide (every CPU program compiled afterwards, the caller's too, gets
the unrolled hash) and idempotent; importing :mod:`jaxbandit.simulate` makes
it. Other backends keep JAX's lowering.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, distance: int):
  return lax.shift_left(x, np.uint32(distance)) | lax.shift_right_logical(
      x, np.uint32(32 - distance))


def threefry2x32_unrolled(key1, key2, count1, count2):
  """Threefry-2x32 (20 rounds) of the counts under the key, every round unrolled.

  All four are uint32 arrays of broadcastable shapes; returns the two output words.
  """
  key1, key2, count1, count2 = jnp.broadcast_arrays(key1, key2, count1, count2)
  keys = (key1, key2, key1 ^ key2 ^ _PARITY)
  x0, x1 = count1 + keys[0], count2 + keys[1]
  for group in range(5):
    for distance in _ROTATIONS[group % 2]:
      x0 = x0 + x1
      x1 = x0 ^ _rotate_left(x1, distance)
    x0 = x0 + keys[(group + 1) % 3]
    x1 = x1 + keys[(group + 2) % 3] + np.uint32(group + 1)
  return x0, x1


def unroll_threefry_on_cpu() -> bool:
  """Registers the unrolled Threefry lowering for the CPU (registering again
  replaces it with the same rule).

  Returns whether it is registered; False (and the JAX default stays) where
  this JAX lacks ``jax.extend.random.threefry2x32_p``.
  """
  try:
    from jax.extend.random import threefry2x32_p
    from jax.interpreters import mlir
  except ImportError:  # pragma: no cover - older JAX: keep its lowering
    return False
  mlir.register_lowering(threefry2x32_p,
                         mlir.lower_fun(threefry2x32_unrolled, multiple_results=True),
                         platform="cpu")
  return True
