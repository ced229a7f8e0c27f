"""Host-side input checks, run before anything is compiled.

Every error names the parameter, the value given and what is allowed, e.g.
``ValueError: slate_size=1 is not allowed; allowed: an integer 2 <= slate_size <= n_actions=100``.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional

import numpy as np


def _is_int(value) -> bool:
  return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool)


def positive_int(name: str, value) -> int:
  if not _is_int(value) or value <= 0:
    raise ValueError(f"{name}={value!r} is not allowed; allowed: a positive integer")
  return int(value)


def non_negative_int(name: str, value) -> int:
  if not _is_int(value) or value < 0:
    raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer >= 0")
  return int(value)


def int_in_range(name: str, value, low: int, high: int, what: str = "") -> int:
  if not _is_int(value) or not low <= value <= high:
    extra = f" ({what})" if what else ""
    raise ValueError(
        f"{name}={value!r} is not allowed; allowed: an integer {low} <= {name} <= {high}{extra}")
  return int(value)


def _real(name, value, allowed):
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
    raise ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")
  return value


def positive_float(name: str, value) -> float:
  value_f = _real(name, value, "a finite number > 0")
  if value_f <= 0:
    raise ValueError(f"{name}={value!r} is not allowed; allowed: a finite number > 0")
  return value_f


def non_negative_float(name: str, value) -> float:
  value_f = _real(name, value, "a finite number >= 0")
  if value_f < 0:
    raise ValueError(f"{name}={value!r} is not allowed; allowed: a finite number >= 0")
  return value_f


def unit_interval(name: str, value) -> float:
  value_f = _real(name, value, "a number in [0, 1]")
  if not 0.0 <= value_f <= 1.0:
    raise ValueError(f"{name}={value!r} is not allowed; allowed: a number in [0, 1]")
  return value_f


def one_of(name: str, value, allowed: Iterable[str]) -> str:
  allowed = list(allowed)
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not known; allowed: {', '.join(map(repr, allowed))}")
  return value


def finite_array(name: str, value, ndim: Optional[int] = None, shape=None) -> np.ndarray:
  """Converts to a float64 NumPy array and rejects NaN, infinity and wrong shapes."""
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name} could not be read as a numeric array ({err}); "
                     f"allowed: a real array") from None
  if ndim is not None and array.ndim != ndim:
    raise ValueError(f"{name} has shape {array.shape}; allowed: an array with {ndim} axes")
  if shape is not None and array.shape != tuple(shape):
    raise ValueError(f"{name} has shape {array.shape}; allowed: shape {tuple(shape)}")
  if not np.all(np.isfinite(array)):
    bad = np.argwhere(~np.isfinite(array))[0]
    raise ValueError(f"{name} holds a non-finite value {float(array[tuple(bad)])!r} at index "
                     f"{tuple(int(b) for b in bad)}; allowed: finite numbers only")
  return array


def probability_vector(name: str, value, size: int, atol: float = 1e-5) -> np.ndarray:
  """Weights that are finite, >= 0 and sum to 1 (None means uniform)."""
  if value is None:
    return np.full(size, 1.0 / size)
  array = finite_array(name, value, ndim=1, shape=(size,))
  if np.any(array < 0):
    raise ValueError(f"{name} holds a negative weight {float(array.min())!r}; allowed: "
                     f"weights >= 0 summing to 1")
  total = array.sum()
  if abs(total - 1.0) > atol:
    raise ValueError(f"{name} sums to {float(total)!r}; allowed: weights >= 0 summing to 1 "
                     f"(within {atol})")
  return array


def reference_policy(name: str, value, n_contexts: int, n_actions: int,
                     atol: float = 1e-5) -> np.ndarray:
  """pi0 as (n_contexts, n_actions): None means uniform; a (n_actions,) row is shared."""
  if value is None:
    return np.full((n_contexts, n_actions), 1.0 / n_actions)
  array = finite_array(name, value)
  if array.shape == (n_actions,):
    array = np.broadcast_to(array, (n_contexts, n_actions)).copy()
  if array.shape != (n_contexts, n_actions):
    raise ValueError(f"{name} has shape {array.shape}; allowed: ({n_actions},) or "
                     f"({n_contexts}, {n_actions})")
  if np.any(array < 0):
    raise ValueError(f"{name} holds a negative weight {float(array.min())!r}; allowed: "
                     f"weights >= 0 with rows summing to 1")
  sums = array.sum(axis=1)
  worst = int(np.argmax(np.abs(sums - 1.0)))
  if abs(sums[worst] - 1.0) > atol:
    raise ValueError(f"{name} row {worst} sums to {float(sums[worst])!r}; allowed: rows "
                     f"summing to 1")
  return array


def boolean(name: str, value) -> bool:
  """A real bool (or NumPy bool); 1, 'yes' and the like are rejected."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name}={value!r} is not allowed; allowed: True or False")
  return bool(value)


# Keys hold 32-bit seeds while x64 is off: jax.random.key(2**32) equals key(0).
MAX_SEED = 2**32 - 1


def seed(name: str, value, count: int = 1, count_name: str = "") -> int:
  """A seed ``value`` such that ``value, ..., value + count - 1`` are all distinct 32-bit seeds."""
  if not _is_int(value) or value < 0:
    raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer 0 <= {name} <= "
                     f"{MAX_SEED}")
  if value + count - 1 > MAX_SEED:
    with_count = f" with {count_name}={count}" if count_name else ""
    raise ValueError(
        f"{name}={value!r}{with_count} is not allowed; allowed: {name}"
        f"{' + ' + count_name + ' - 1' if count_name else ''} <= {MAX_SEED} (seeds are 32-bit; "
        f"larger ones would repeat earlier seeds)")
  return int(value)


def instance_values(instance, atol: float = 1e-5) -> None:
  """Checks the arrays of an instance (or of instances stacked on leading axes) on the host.

  Every array finite, ``reward_scale > 0``, and per population ``context_weights``,
  ``user_weights`` and each ``reference_policy`` row >= 0 summing to 1. For
  instances built or modified directly rather than through ``make_instance`` /
  ``from_arrays``.
  """
  arrays = {name: np.asarray(value, np.float64) for name, value in instance._asdict().items()}
  for name, array in arrays.items():
    finite_array(name, array)
  scale = arrays["reward_scale"]
  if np.any(scale <= 0):
    raise ValueError(f"reward_scale={float(scale.min())!r} is not allowed; allowed: a finite "
                     f"number > 0")
  for name in ("context_weights", "user_weights"):
    rows = arrays[name].reshape(-1, arrays[name].shape[-1])
    for row in rows:
      probability_vector(name, row, row.shape[0], atol)
  policy = arrays["reference_policy"]
  for table in policy.reshape((-1,) + policy.shape[-2:]):
    reference_policy("reference_policy", table, *table.shape, atol=atol)


def host_scalar(name: str, value) -> float:
  """A one-element array or number (e.g. a traced-params leaf given directly) as a float."""
  array = np.asarray(value)
  if array.size != 1 or not np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_:
    raise ValueError(f"{name}={value!r} is not allowed; allowed: a single real number")
  return float(array.reshape(()))
