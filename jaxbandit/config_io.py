"""TOML config files and checkpoints of long runs.

A TOML config holds the fields of :class:`experiment.ExperimentConfig` as
top-level keys, optionally starting from a preset::

    preset = "paper-users"     # optional: start from this preset's values
    n_seeds = 64
    horizon = 2000
    populations = [10, 50, 100]
    reward_scale = 1.0

Keys left out keep the preset's (or the default) value; an unknown key or a
value of the wrong type is refused with the key, the value and what is
allowed. A results folder stores the fully resolved ``config.toml``, so
``jaxbandit run DIR/config.toml`` repeats the run exactly.

Checkpoints (``checkpoint.npz``) hold the simulator state and every record
so far; they are written to a temporary file and renamed, so a crash
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import os
import typing
from typing import Optional

import jax
import numpy as np

try:  # Python >= 3.11
  import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
  import tomli as tomllib

from jaxbandit import simulate as sim

CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.npz"


def _field_types(config_cls):
  hints = typing.get_type_hints(config_cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _describe(hint) -> str:
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if origin is typing.Union and type(None) in args:
    inner = [a for a in args if a is not type(None)][0]
    return f"{_describe(inner)} (or leave the key out)"
  if origin in (collections.abc.Sequence, list, tuple):
    return "a list of integers"
  return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
      hint, str(hint))


def _coerce(key, value, hint):
  """Checks a TOML value against a field type; returns the Python value."""
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if origin is typing.Union and type(None) in args:
    inner = [a for a in args if a is not type(None)][0]
    return _coerce(key, value, inner)
  ok = False
  if origin in (collections.abc.Sequence, list, tuple):
    ok = isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
    value = tuple(value) if ok else value
  elif hint is bool:
    ok = isinstance(value, bool)
  elif hint is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif hint is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif hint is str:
    ok = isinstance(value, str)
  if not ok:
    raise ValueError(f"config key {key!r} has value {value!r} of type "
                     f"{type(value).__name__}; allowed: {_describe(hint)}")
  return value


def config_from_dict(values: dict, base=None):
  """An :class:`ExperimentConfig` from a dict of TOML values (validated)."""
  from jaxbandit import presets
  from jaxbandit.experiment import ExperimentConfig

  values = dict(values)
  if "preset" in values:
    preset = values.pop("preset")
    if not isinstance(preset, str):
      raise ValueError(f"config key 'preset' has value {preset!r}; allowed: a preset name")
    base = presets.get_preset(preset)
  base = base if base is not None else ExperimentConfig()
  types = _field_types(ExperimentConfig)
  unknown = sorted(set(values) - set(types))
  if unknown:
    raise ValueError(f"config key {unknown[0]!r} is not known; allowed keys: preset, "
                     f"{', '.join(sorted(types))}")
  changes = {key: _coerce(key, value, types[key]) for key, value in values.items()}
  return dataclasses.replace(base, **changes).validate()


def load_config(path: str):
  """Reads and validates a TOML config file."""
  try:
    with open(path, "rb") as handle:
      values = tomllib.load(handle)
  except FileNotFoundError:
    raise ValueError(f"config file {path!r} does not exist; allowed: a readable .toml file "
                     f"or a preset name (see 'jaxbandit presets')") from None
  except tomllib.TOMLDecodeError as err:
    raise ValueError(f"config file {path!r} is not valid TOML ({err})") from None
  return config_from_dict(values)


def _toml_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"
  if isinstance(value, str):
    return json.dumps(value)
  if isinstance(value, float):
    return repr(value)
  return str(value)


def config_to_toml(config) -> str:
  """The resolved config as TOML (``None`` fields are left out: they mean 'unset')."""
  lines = ["# jaxbandit experiment config (resolved); run it with: jaxbandit run THIS_FILE"]
  for key, value in config.to_dict().items():
    if value is None:
      lines.append(f"# {key} is unset")
      continue
    lines.append(f"{key} = {_toml_value(value)}")
  return "\n".join(lines) + "\n"


def config_fingerprint(config) -> str:
  """A hash of every field: a checkpoint only resumes under the same config."""
  text = json.dumps(config.to_dict(), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_write_bytes(path: str, payload: bytes) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as handle:
    handle.write(payload)
    handle.flush()
    os.fsync(handle.fileno())
  os.replace(tmp, path)


def save_checkpoint(out_dir: str, config, progress: sim.Progress) -> None:
  """Writes ``checkpoint.npz`` atomically: state, records so far, rounds done.

  Only the run's ``n_seeds`` seeds are saved, not the padding lanes of the
  device count (see ``simulate``), so a run can resume under another device
  count.
  """
  arrays = {}
  n_seeds = config.n_seeds
  leaves, _ = jax.tree_util.tree_flatten(jax.device_get(progress.states))
  for i, leaf in enumerate(leaves):
    arrays[f"state_{i}"] = np.asarray(leaf)[:, :n_seeds]
  for name, value in progress.records._asdict().items():
    arrays[f"record_{name}"] = np.asarray(value)[:, :n_seeds]
  arrays["rounds_done"] = np.asarray(progress.rounds_done)
  arrays["fingerprint"] = np.asarray(config_fingerprint(config))
  import io

  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  atomic_write_bytes(os.path.join(out_dir, CHECKPOINT_FILE), buffer.getvalue())


def _with_fresh_regret_state(template, leaves):
  """``leaves`` (a checkpoint's state) with its regret-pass state replaced by the
  ``template``'s (a fresh one), when only that part differs; else None.

  The regret state (``metrics.CertifiedCells`` or ``metrics.RegretCache``) only
  caches exact values, and a fresh one is scored in full in the next round, so a
  run checkpointed with one regret pass resumes under the other: on a machine
  without the native kernel (``jaxbandit.native``), or the other way round. The
  records then match an uninterrupted run up to near-ties (docs/config.md).
  """
  per_field = [jax.tree_util.tree_leaves(getattr(template, name)) for name in template._fields]
  index = template._fields.index("regret_cache")
  before = sum(len(field) for field in per_field[:index])
  after = sum(len(field) for field in per_field[index + 1:])
  if len(leaves) < before + after:
    return None
  swapped = (list(leaves[:before]) + [np.asarray(leaf) for leaf in per_field[index]] +
             list(leaves[len(leaves) - after:]))
  expected = [(tuple(np.shape(x)), np.dtype(x.dtype)) for field in per_field for x in field]
  found = [(tuple(leaf.shape), leaf.dtype) for leaf in swapped]
  return swapped if found == expected else None


def load_checkpoint(out_dir: str, config, state_template) -> Optional[sim.Progress]:
  """Reads ``checkpoint.npz`` if present; refuses one made under another config."""
  path = os.path.join(out_dir, CHECKPOINT_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as data:
    if str(data["fingerprint"]) != config_fingerprint(config):
      raise ValueError(f"checkpoint in {out_dir!r} was made by a different config; allowed: "
                       f"resume with the folder's own {CONFIG_FILE}, or start a new --out folder")
    treedef = jax.tree_util.tree_structure(state_template)
    expected = [(tuple(np.shape(x)), np.dtype(x.dtype))
                for x in jax.tree_util.tree_leaves(state_template)]
    n_found = sum(name.startswith("state_") for name in data.files)
    leaves = [data[f"state_{i}"] for i in range(n_found)]
    found = [(tuple(leaf.shape), leaf.dtype) for leaf in leaves]
    if found != expected:
      leaves = _with_fresh_regret_state(state_template, leaves)
    if leaves is None:
      raise ValueError(
          f"checkpoint in {out_dir!r} holds a simulator state of another layout "
          f"({n_found} state arrays, this version expects {len(expected)}; it was "
          f"written by another version of jaxbandit); allowed: resume with the version "
          f"that wrote it, or start a new --out folder")
    states = jax.tree_util.tree_unflatten(treedef, leaves)
    records = sim.RoundRecord(**{name: data[f"record_{name}"]
                                 for name in sim.RoundRecord._fields})
    done = int(data["rounds_done"])
  return sim.Progress(done, config.horizon, states, records)
