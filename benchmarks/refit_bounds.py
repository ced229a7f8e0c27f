"""Bounds on the round's remaining work, measured on one paper-users seed (U = 100).

Usage::

    python benchmarks/refit_bounds.py steps  [--rounds 2000]   # ~20 s
    python benchmarks/refit_bounds.py replay [--rounds 400]    # ~1 min
    python benchmarks/refit_bounds.py drift  [--rounds 2000]   # ~2 min

``steps``: quasi-Newton steps a refit takes with the carried inverse Hessian,
against the same seed with the carried inverse replaced, before every refit's
steps, by the exact inverse Hessian at the warm start (all data, the new row
included). The second run is slow (a Hessian and its inverse every round);
its step counts bound what any better curvature could save.

``replay``: the seed's estimates round by round, then, in NumPy (float64),
how many (context, user) cells the certified regret pass's rule would make
due a round (the query left the ball whose radius is the distance to the
nearest boundary of its greedy region), how many would be due if each cell
also kept its K nearest rivals and tested them exactly (the ball then covering
only the other actions), and how many greedy actions actually changed.
RESULTS.md, twentieth session, has the numbers and why neither idea was adopted.

``drift``: how many cells the certified pass must measure a round (their
allowance ran out) under other bounds on how far a user's queries can have
moved: the kernel's (each round's drift ``||w_u - w_u'||`` subtracted from
the allowance, a path length), the same with the spectral norm of the move of
``W_u`` (d x d) instead of its Frobenius norm (tighter: ``||x^T dW|| <=
||x|| ||dW||_2``), and the net displacement from a per-user reference vector
rebased every k rounds (a cell checked at s stays quiet while ``||w(t) -
ref|| < room / scale - ||w(s) - ref||``). Each bound is checked to skip no
cell the exact test makes due. RESULTS.md, twenty-third session.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import attribution  # noqa: E402  (benchmarks/attribution.py: the paper seed)
import run as bench  # noqa: E402  (benchmarks/run.py: table formatting)

WINDOWS = [(0, 50), (50, 250), (250, 500), (500, 1000), (1000, 1500), (1500, 2000)]


def exact_curvature():
  """Makes every carried refit start from the exact inverse Hessian at its warm start."""
  from jaxbandit import learners

  original = learners.carried_quasi_newton

  def patched(model, choice_model, params_init, carry, data, new_observation, ridge, **kw):
    ridge_, _, _ = learners._setup(params_init, data, ridge, 1.0)
    functions = learners._objective_functions(model, choice_model, data, ridge_,
                                              kw.get("block_size"), kw.get("n_rows"),
                                              params_init.dtype)

    def exact(model_, choice_model_, inverse, params, *observation):
      _, hessian = functions[2](params)
      return learners._inverse_from_factor(model_, learners._factor(model_, hessian, 0.0))

    saved, learners.add_observation = learners.add_observation, exact
    try:
      return original(model, choice_model, params_init, carry, data, new_observation, ridge, **kw)
    finally:
      learners.add_observation = saved

  learners.carried_quasi_newton = patched


def run_seed(rounds: int):
  import jax

  from jaxbandit import simulate

  instance, config, params, key = attribution.paper_seed([0], rounds)
  labels = attribution.labels_of(config, instance)
  state = simulate.init_state(config, instance)
  # The instance and the other arrays are arguments, not constants XLA would fold at compile.
  run = jax.jit(lambda instance, params, key, labels, s: simulate.run_rounds(
      config, instance, params, key, s, rounds, action_labels=labels))
  started = time.perf_counter()
  _, records = jax.block_until_ready(run(instance, params, key, labels, state))
  return records, time.perf_counter() - started


def steps(rounds: int) -> None:
  rows = []
  for label, prepare in (("carried inverse", None),
                         ("exact inverse every round", exact_curvature)):
    if prepare is not None:
      prepare()
    records, seconds = run_seed(rounds)
    steps_ = np.asarray(records.erm_iterations)
    regret = float(np.sum(np.asarray(records.regret, np.float64)))
    rows.append((label, steps_, regret, seconds))
    print(f"{label}: {steps_.sum()} steps, cumulative regret {regret:.3f}, {seconds:.1f} s",
          flush=True)
  print(window_table("refit", {label: s for label, s, *_ in rows}, "steps a round",
                     [(a, b) for a, b in WINDOWS if b <= rounds]))


def seed_estimates(rounds: int):
  """One paper seed's estimates deployed in rounds 0 .. ``rounds`` (the one of round t
  follows t refits), as the certified pass sees them.

  Returns:
    ``(queries, vectors, keys, norms, scale)``: the queries (T + 1, C, U, r) and
    user vectors (T + 1, U, q) as float32, the regret pass's slot keys (C, V, r)
    and every action's largest key norm per context (C,) as float64, and the
    query scales (C,).
  """
  import jax
  import jax.numpy as jnp

  from jaxbandit import simulate

  instance, config, params, key = attribution.paper_seed([0], 1)
  labels = np.asarray(attribution.labels_of(config, instance))  # (C, V)
  _, learner, _ = simulate._components(config, instance)
  # The arrays are arguments, not constants XLA would fold at compile (as in run_seed).
  step = jax.jit(lambda instance, params, key, labels, s: simulate.run_rounds(
      config, instance, params, key, s, 1, action_labels=labels)[0])
  one_round = lambda s: step(instance, params, key, jnp.asarray(labels), s)
  factors = jax.jit(lambda p: (learner.score_queries(p), learner.user_vectors(p)))
  state = simulate.init_state(config, instance)
  queries, vectors = [], []
  for t in range(rounds + 1):
    query, vector = factors(state.params)
    queries.append(np.asarray(query, np.float32))
    vectors.append(np.asarray(vector, np.float32))
    if t < rounds:
      state = one_round(state)
  all_keys = np.asarray(learner.score_keys, np.float64)
  keys = np.take_along_axis(all_keys, labels[:, :, None], 1)
  norms = np.max(np.linalg.norm(all_keys, axis=-1), axis=1)
  return (np.stack(queries), np.stack(vectors), keys, norms,
          np.asarray(learner.query_scale, np.float64))


def boundary_distances(g, keys, norms):
  """Per cell, how far its query ``g`` (C, U, r) may move towards each slot before that
  slot's score reaches the greedy one's, less the rounding allowance (the certified
  pass's rule, float64).

  Returns:
    ``(scores (C, U, V), best (C, U) greedy slots, rounding (C, U), distance (C, U, V))``,
    the distance inf for the greedy slot and slots with its key.
  """
  rows = np.arange(g.shape[0])[:, None, None]
  scores = np.einsum("cur,cvr->cuv", g, keys)
  best = scores.argmax(-1)
  top = np.take_along_axis(scores, best[..., None], -1)
  rounding = 1e-5 * (1 + np.linalg.norm(g, axis=-1) * norms[:, None])
  gap = np.linalg.norm(keys[:, None] - keys[rows, best[..., None]], axis=-1)  # (C, U, V)
  with np.errstate(divide="ignore", invalid="ignore"):
    distance = np.where(gap > 0, (top - scores - rounding[..., None]) / gap, np.inf)
  return scores, best, rounding, distance


def window_table(first: str, series, what: str, windows) -> str:
  """A Markdown table in ``benchmarks/run.py``'s format: a row per ``name: (T,)
  per-round values`` in ``series`` (titled ``first``), a column ``what, a-b`` per
  window ``(a, b)`` holding the mean of the values over rounds ``a .. b - 1``."""
  columns = [(first, "name")] + [(f"{what}, {a}-{b}", f"{a}-{b}") for a, b in windows]
  rows = [{"name": name, **{f"{a}-{b}": float(np.mean(values[a:b])) for a, b in windows}}
          for name, values in series.items()]
  return bench.format_table(rows, columns)


def replay(rounds: int, kept_counts=(0, 1, 2, 3, 4)) -> None:
  queries, _, keys, norms, _ = seed_estimates(rounds)
  n_contexts, n_users, r = queries.shape[1:]
  cells = (n_contexts, n_users)
  # Per kept-rival count, its own anchors, radii, greedy slots and rivals; a
  # round's scores, distances and their order are the same for every count.
  state = {kept: {"anchor": np.zeros(cells + (r,)), "radius": np.full(cells, -np.inf),
                  "greedy": np.zeros(cells, int), "rivals": np.zeros(cells + (max(kept, 1),), int)}
           for kept in kept_counts}
  due_per_round = {kept: [] for kept in kept_counts}
  changed, previous = [0], None
  for t in range(rounds):
    g = queries[t].astype(np.float64)
    scores, best, rounding, distance = boundary_distances(g, keys, norms)
    if previous is not None:
      changed.append(int(np.sum(best != previous)))
    previous = best
    order = np.argsort(distance, axis=-1, kind="stable")
    nearest = np.take_along_axis(distance, order, -1)
    for kept, cell in state.items():
      quiet = np.linalg.norm(g - cell["anchor"], axis=-1) < cell["radius"]
      if kept:
        top = np.take_along_axis(scores, cell["greedy"][..., None], -1)
        margins = top - np.take_along_axis(scores, cell["rivals"], -1)
        quiet &= np.all(margins > rounding[..., None], axis=-1)
      due = ~quiet
      due_per_round[kept].append(int(due.sum()))
      cell["anchor"] = np.where(due[..., None], g, cell["anchor"])
      cell["radius"] = np.where(due, nearest[..., kept] * (1 - 1e-5), cell["radius"])
      cell["greedy"] = np.where(due, best, cell["greedy"])
      if kept:
        cell["rivals"] = np.where(due[..., None], order[..., :kept], cell["rivals"])

  windows = [(1, 50), (50, 250), (250, rounds)] + ([(1000, rounds)] if rounds > 1000 else [])
  series = {str(kept): np.asarray(due) for kept, due in due_per_round.items()}
  series["(greedy actions changed)"] = np.asarray(changed)
  print(window_table("kept rivals", series, "due a round", windows))


def drift_counts(queries, vectors, keys, norms, scale, rules):
  """Cells measured a round by the certified pass under each of ``rules`` (NumPy, float64).

  Args:
    queries: (T, C, U, r) each round's queries; vectors: (T, U, q) the user
      vectors they are linear in, with ``||dq_cu|| <= scale[c] ||dw_u||``
      (Frobenius) and, where ``q == r * r`` and the query is ``W_u^T x_c``,
      ``<= scale[c] ||dW_u||_2``; keys: (C, V, r) the visited actions' keys;
      norms: (C,) the rounding allowance's key norms; scale: (C,).
    rules: ``{name: (norm, rebase)}``; ``norm`` 'frobenius' or 'spectral';
      ``rebase(t, since)`` -> whether the per-user reference moves to the
      current vector this round (``since``: rounds since it last did); a
      reference rebased every round is the kernel's per-round drift.

  Every cell counts as weighted (the paper instance has no padded users) and
  the arithmetic is float64, without the kernel's float32 rounding margins.

  Returns:
    ``({name: (T,) cells measured}, (T,) cells due)``. Raises AssertionError
    if a rule would leave a due cell unmeasured (the bound would be unsound).
  """
  n_rounds, n_contexts, n_users, r = queries.shape
  scale = np.asarray(scale, np.float64)[:, None]
  anchor = np.zeros((n_contexts, n_users, r))
  radius = np.full((n_contexts, n_users), -np.inf)
  state = {name: {"allowance": np.full((n_contexts, n_users), -np.inf),
                  "reference": vectors[0].astype(np.float64), "since": 0} for name in rules}
  measured, due_counts = {name: [] for name in rules}, []
  for t in range(n_rounds):
    g = queries[t].astype(np.float64)
    w = vectors[t].astype(np.float64)
    distance = np.linalg.norm(g - anchor, axis=-1)
    due = ~(distance < radius)
    new_radius = boundary_distances(g, keys, norms)[3].min(-1) * (1 - 1e-5)
    # How far w_u may still move: from the anchor's radius less the distance
    # measured now (quiet cells), or the new radius (re-scored cells).
    room = np.where(due, new_radius, radius - distance) / scale
    for name, (norm, rebase) in rules.items():
      cell = state[name]
      move = w - cell["reference"]
      if norm == "spectral":
        moved = np.linalg.norm(move.reshape(n_users, r, -1), ord=2, axis=(1, 2))
      else:
        moved = np.linalg.norm(move, axis=-1)
      cell["since"] += 1
      if rebase(t, cell["since"]):  # allowances now count from w: they lose the move
        cell["allowance"] = cell["allowance"] - moved[None]
        cell["reference"], cell["since"], moved = w.copy(), 0, np.zeros(n_users)
      check = ~(cell["allowance"] > moved[None]) | ~(radius > 0)
      assert not np.any(due & ~check), f"{name}: a due cell went unmeasured in round {t}"
      measured[name].append(int(check.sum()))
      cell["allowance"] = np.where(check, room - moved[None], cell["allowance"])
    due_counts.append(int(due.sum()))
    anchor = np.where(due[..., None], g, anchor)
    radius = np.where(due, new_radius, radius)
  return {name: np.asarray(m) for name, m in measured.items()}, np.asarray(due_counts)


def drift(rounds: int) -> None:
  queries, vectors, keys, norms, scale = seed_estimates(rounds)
  every = lambda k: (lambda t, since: since >= k)
  rules = {
      "per-round drift (the kernel's)": ("frobenius", every(1)),
      "per-round drift, spectral norm": ("spectral", every(1)),
      "net move, reference rebased every 8 rounds": ("frobenius", every(8)),
      "every 32 rounds": ("frobenius", every(32)),
      "every t/16 rounds": ("frobenius", lambda t, since: since >= max(1, t // 16)),
  }
  measured, due = drift_counts(queries, vectors, keys, norms, scale, rules)
  windows = [(a, b) for a, b in [(0, 50), (50, 250), (250, 500), (500, 1000), (1000, 2000),
                                 (2000, 5000)] if b <= rounds + 1]
  print(window_table("bound", {**measured, "(cells due: re-scored)": due},
                     "cells measured a round", windows))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=["steps", "replay", "drift"])
  parser.add_argument("--rounds", type=int, default=None)
  args = parser.parse_args(argv)
  if args.what == "steps":
    steps(args.rounds or 2000)
  elif args.what == "drift":
    drift(args.rounds or 2000)
  else:
    replay(args.rounds or 400)


if __name__ == "__main__":
  main()
