"""Float32 matrix products at full float32 precision on every backend.

JAX lets a backend compute float32 matrix products with fewer mantissa bits by
default: TensorFloat-32 (10 bits) on NVIDIA GPUs since Ampere, bfloat16
passes on TPUs. The simulator is exact where it claims exactness (problem-seed
acceptance at a minimum gap of 1e-4 on scores of size ~30, the ERM's Newton
decrement at 1e-12 per observation, greedy ties broken to the lowest action),
and a 10-bit product would move every one of those decisions. So each entry
point that builds a score or runs the kernel traces its matrix products at
``"highest"`` precision (``precision = [HIGHEST, HIGHEST]`` on every
``dot_general`` of the lowered program), whatever the caller's
``jax.default_matmul_precision``.

On a CPU float32 products are always full precision: nothing changes there,
not a bit of any result.
"""

from __future__ import annotations

import functools

import jax

MATMUL_PRECISION = "highest"


def full_precision(fn):
  """``fn`` with its matrix products traced (or run eagerly) at full float32 precision."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision(MATMUL_PRECISION):
      return fn(*args, **kwargs)

  return wrapped
