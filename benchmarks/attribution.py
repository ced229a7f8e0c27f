"""Where a round's time goes, measured inside the compiled kernel.

Usage::

    python benchmarks/attribution.py                       # t = 500, 2000, 4000; ~6 min
    python benchmarks/attribution.py --rounds-at 2000 --repeats 20 --out results/bench
    python benchmarks/attribution.py --regret-modes        # 'full' against 'certified'
    python benchmarks/attribution.py --gradient-modes      # erm_gradient 'xla' against 'native'
    python benchmarks/attribution.py --only Woodbury       # the base kernel and one variant
    python benchmarks/attribution.py --whole-seed 5000 --window 250 --repeats 3 \
        --only "regret pass removed,native"                # every window of a seed, summed

    # one core, one XLA thread (as each host device of a two-core run):
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        taskset -c 1 python benchmarks/attribution.py

A profiler's per-operation cost inflates small XLA:CPU operations (RESULTS.md,
thirteenth session), and pieces timed alone have repeatedly run faster than
they do inside the kernel. This script instead compiles **variants of the
whole kernel** in one process and times them against it, alternating:

* ``regret pass removed``: the population regret replaced by zeros. The
  regret is only recorded, never fed back, so every other record field stays
  bit-identical (but the count of cells re-scored, which is the pass's own:
  none without it). The difference is the pass's cost, plus what XLA then drops
  with it: the regret's score queries and the truth tables the kernel builds
  once per call (about 10-12 ms at paper size, 0.02 ms a round over a
  500-round window), and whatever the pass costs other operations around it.
* ``<piece> twice``: the piece's function computed a second time, with one
  small argument moved by ``where(flag, arg + 1, arg)`` and the result taken
  as ``where(flag, second, first)``, for a kernel input ``flag`` that is
  always False (:func:`run_twice`). XLA can neither merge the two copies
  nor drop the second, and the values are the first copy's bit for bit, so
  the trajectory is unchanged (checked: every record field compared with the
  base kernel's); the difference is the piece's cost where it runs. The
  final select is one more pass over the piece's output, which for the
  carried inverse Hessian (p x p) is not free. A second copy can be cheaper
  than the first (its inputs already in cache), so for the regret pass the
  two variants bracket its cost.

With ``--regret-modes`` it compares the kernel's regret evaluations instead
(``'full'``, the fused pass over every cell, against ``'certified'``, the
native kernel re-scoring only the cells whose greedy action may have
changed): each mode keeps its own state, both advanced to each ``t`` (from
where their first timed calls of the previous window left them), and the
table adds the cells re-scored a round. The pieces above are measured on the
kernel as ``'auto'`` resolves (``'certified'`` on a CPU with the native
kernel, whose pass the regret variants then replace). ``--gradient-modes``
compares the ERM's gradient passes the same way (``erm_gradient`` ``'xla'``,
the per-user sums and the cell table, against ``'native'``, the C++ row
loop); there the records differ by the rounding of the sums, and the table
says how far: the largest difference in the round's regret, and the rounds
whose context, user or converged flag differ.

``--whole-seed H`` times every window of ``[0, H)`` instead of a few (the
same as ``--rounds-at 0,W,2W,...``) and adds a second table: per variant the
seconds one seed's ``H`` rounds take (each window's minimum and median ms a
round times its rounds, summed) and what a piece costs over the whole seed
(the variant's summed medians less the base kernel's), which the windows at
a few rounds can only suggest.

Each variant is one ``run_rounds`` scan of ``--window`` rounds for one seed
of the paper-users instance at U = 100 (benchmark ``Case`` defaults, horizon
5,000), compiled before any timing (``jit(...).lower(...).compile()`` with
the piece patched in, then restored). The seed is advanced with the base
kernel to each round ``t`` of ``--rounds-at``, from where its first timed
call of the previous window left it; then every variant runs the
same window from the same state, in turn, ``--repeats`` times. The table
gives the minimum and median ms a round, the median's difference from the
base kernel's, that difference as a share of the base median, and whether
the records matched.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (benchmarks/run.py: cases, table writing)


# ---------------------------------------------------------------------------
# Running a piece twice without changing what it returns
# ---------------------------------------------------------------------------

# While a variant traces, the kernel's extra input: a runtime boolean that is
# always False. XLA cannot fold it, so it can neither merge the two copies of a
# piece (common-subexpression elimination; an optimization barrier does not
# stop that on the CPU) nor drop the second as dead code.
_RUNTIME_FALSE = []


@contextlib.contextmanager
def runtime_false(flag):
  """Makes ``flag`` (a traced boolean, False when run) the one :func:`run_twice` uses."""
  _RUNTIME_FALSE.append(flag)
  try:
    yield
  finally:
    _RUNTIME_FALSE.pop()


def run_twice(fn, argnum: int):
  """``fn`` computed twice, returning the first result bit for bit.

  The second copy's argument ``argnum`` is ``where(flag, arg + 1, arg)`` and
  the result is ``where(flag, second, first)``, leafwise, for a ``flag`` that
  is the runtime false of :func:`runtime_false` and a test on the first
  copy's result: equal to ``arg`` and to ``first`` when run, but XLA can
  prove neither, so both copies are computed, one after the other.
  """
  import jax
  import jax.numpy as jnp

  def twice(*args, **kwargs):
    first = fn(*args, **kwargs)
    # The flag also depends on the first copy's result, so the second copy
    # runs after it and XLA cannot fuse the two into one loop over shared inputs.
    leaf = jax.tree_util.tree_leaves(first)[0]
    flag = _RUNTIME_FALSE[-1] & (jnp.sum(leaf.astype(jnp.float32)) == jnp.inf)
    moved = list(args)
    moved[argnum] = jax.tree_util.tree_map(lambda a: jnp.where(flag, a + 1, a), args[argnum])
    second = fn(*moved, **kwargs)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, b, a), first, second)

  return twice


def zero_regret(truth, queries, keys, subset=None):
  """A stand-in for ``metrics.factor_cell_regret``: every cell's regret 0."""
  import jax.numpy as jnp

  return jnp.zeros(truth.weights.shape, queries.dtype)


def zero_certified(truth, tables, cells, queries, user_vectors=None):
  """A stand-in for ``metrics.certified_cell_values``: every cell at its best value (regret
  0), no cell re-scored or measured, the cells unchanged."""
  import jax.numpy as jnp

  return cells, truth.best, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)


def measure_every_cell(certified_cell_values):
  """``metrics.certified_cell_values`` without the user vectors: the same cells re-scored,
  but every cell's distance measured every round (the pass before its drift bound)."""
  def without_drift(truth, tables, cells, queries, user_vectors=None):
    return certified_cell_values(truth, tables, cells, queries, None)
  return without_drift


@contextlib.contextmanager
def patched(module, name, value):
  saved = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, saved)


def variants(evaluation: str = "full", only=None):
  """``(label, module, attribute, make, regret_may_differ)`` rows: the kernel
  with ``module.attribute`` replaced by ``make(original)`` (``module`` None:
  the kernel as it is), and whether its regret fields may differ from the
  base kernel's (every other field must not). ``evaluation``: the kernel's
  resolved ``regret_evaluation``, 'full' or 'certified' (whose pass is
  ``metrics.certified_cell_values``, its queries argument 3). ``only``: words; if
  given, just the base rows and the variants whose label holds one of them."""
  from jaxbandit import learners, metrics

  twice = lambda argnum: (lambda fn: run_twice(fn, argnum))
  if evaluation == "certified":
    regret = ("certified_cell_values", lambda f: zero_certified, twice(3))
  else:
    regret = ("factor_cell_regret", lambda f: zero_regret, twice(1))
  drift = []
  if evaluation == "certified":  # without user vectors the pass measures every cell
    drift = [("certified, every cell measured (no drift bound)", metrics,
              "certified_cell_values", measure_every_cell, False)]
  rows = [
      ("base", None, None, None, False),
      ("base, again (noise)", None, None, None, False),
      ("regret pass removed", metrics, regret[0], regret[1], True),
      ("regret pass twice", metrics, regret[0], regret[2], False),
  ] + drift + [
      ("ERM gradient passes twice", learners, "_cell_table_user_gradient", twice(2), False),
      ("score queries twice (regret + gradients)", learners, "score_queries", twice(1),
       False),
      ("Woodbury update twice", learners, "add_observation", twice(3), False),
      ("BFGS updates twice", learners, "_secant_update", twice(2), False),
      ("preconditioning twice", learners, "_precondition", twice(2), False),
      # With the native steps (the CPU's 'auto' for known_heads) XLA no longer runs the
      # BFGS updates, and preconditions only the first direction: the loop is this row.
      ("native quasi-Newton steps twice", learners, "native_carried_steps", twice(3), False),
  ]
  return [row for row in rows
          if not only or row[1] is None or any(word in row[0] for word in only)]


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def _records_match(base, other, regret_may_differ: bool) -> bool:
  fields = base._fields
  # A variant without the regret pass also reports no cells re-scored: that count is the pass's.
  skip = ({"regret", "realised_regret", "kl_regret", "rescored_cells"} if regret_may_differ
          else set())
  return all(np.array_equal(np.asarray(getattr(base, f)), np.asarray(getattr(other, f)))
             for f in fields if f not in skip)


def paper_seed(rounds_at, window: int):
  """``(instance, config, params, key)``: seed 0 of the paper-users instance at U = 100
  (benchmark ``Case`` defaults), with a horizon that holds every window."""
  from jaxbandit import simulate

  case = bench.Case("attribution", n_seeds=1, horizon=max(5000, max(rounds_at) + window))
  instance, _ = bench.build_instance(case)
  config, preset = bench.simulation_config(case)
  params = simulate.SimulationParams.make(beta=preset.beta, ridge=preset.ridge,
                                          mixture_weight=preset.mixture_weight)
  return instance, config, params, simulate.seed_keys(0, np.arange(1))[0]


def labels_of(config, instance):
  """The instance's regret-pass labels for ``config`` (C, V), or None."""
  import jax

  from jaxbandit import simulate

  labels = simulate.action_labels(config, instance)
  return None if labels is None else jax.numpy.asarray(labels[0])


def measure(rounds_at, repeats: int, window: int, only=None):
  import jax

  from jaxbandit import simulate

  instance, config, params, key = paper_seed(rounds_at, window)
  labels = labels_of(config, instance)
  state = simulate.init_state(config, instance)
  inputs = (instance, labels, params, key)
  false = jax.numpy.zeros((), bool)

  def kernel():  # a new function object each time: jit caches traces by function
    def window_of_rounds(instance, labels, params, key, state, flag):
      with runtime_false(flag):
        return simulate.run_rounds(config, instance, params, key, state, window,
                                   action_labels=labels)
    return jax.jit(window_of_rounds)

  compiled, compile_s = [], []
  evaluation = simulate.resolve_regret_evaluation(config)
  print(f"regret_evaluation: {evaluation}", flush=True)
  for label, module, attribute, make, regret_may_differ in variants(evaluation, only):
    started = time.perf_counter()
    if module is None:
      executable = kernel().lower(*inputs, state, false).compile()
    else:
      with patched(module, attribute, make(getattr(module, attribute))):
        executable = kernel().lower(*inputs, state, false).compile()
    compiled.append((label, executable, regret_may_differ))
    compile_s.append(time.perf_counter() - started)
    print(f"compiled {label} in {compile_s[-1]:.1f} s", flush=True)

  rows, done = [], 0
  base_kernel = compiled[0][1]
  ahead = None  # (round, state) the base kernel's first timed call of the last window reached
  for t in sorted(rounds_at):
    if ahead is not None and ahead[0] <= t:  # contiguous windows (--whole-seed): no rerun
      done, state = ahead
    while done + window <= t:
      state, _ = base_kernel(*inputs, state, false)
      done += window
    jax.block_until_ready(state)
    times = {label: [] for label, _, _ in compiled}
    matched = {}
    base_records = None
    load_before = bench.load1()
    for _ in range(repeats):
      for label, executable, regret_may_differ in compiled:
        started = time.perf_counter()
        reached, records = jax.block_until_ready(executable(*inputs, state, false))
        times[label].append((time.perf_counter() - started) / window * 1e3)
        if base_records is None:
          base_records = records
          ahead = (done + window, reached)
        if label not in matched:
          matched[label] = _records_match(base_records, records, regret_may_differ)
    base = float(np.median(times[compiled[0][0]]))
    steps = float(np.mean(np.asarray(base_records.erm_iterations)))
    for (label, _, regret_may_differ), seconds in zip(compiled, compile_s):
      median = float(np.median(times[label]))
      rows.append({
          "t": done, "window": window, "variant": label,
          "ms_min": float(np.min(times[label])), "ms_median": median,
          "delta_ms": median - base, "share_pct": 100.0 * (median - base) / base,
          "records": ("same" if matched[label] else "DIFFER") +
                     (" (but the regret)" if regret_may_differ else ""),
          "erm_steps": steps, "compile_s": seconds,
          "load1": f"{load_before:.1f}-{bench.load1():.1f}",
      })
    print(bench.format_table([r for r in rows if r["t"] == done], COLUMNS), flush=True)
  return rows


def compare_regret_modes(rounds_at, repeats: int, window: int,
                         modes=("full", "certified"), field: str = "regret_evaluation"):
  """The same seed's kernel with each value of the config ``field`` in ``modes``: every
  mode's state is advanced to each round ``t`` by its own kernel, then the modes run the
  same window in turn, ``repeats`` times. Rows as :func:`measure`'s, ``variant`` the mode;
  ``records`` compares every field but ``rescored_cells`` with the first mode's, and
  ``regret_diff`` is the largest difference in a round's regret from the first mode's."""
  import dataclasses

  import jax

  from jaxbandit import simulate

  instance, config, params, key = paper_seed(rounds_at, window)
  runs = []
  for mode in modes:
    mode_config = dataclasses.replace(config, **{field: mode})
    labels = labels_of(mode_config, instance)
    started = time.perf_counter()
    step = jax.jit(lambda instance, labels, params, key, state, mode_config=mode_config:
                   simulate.run_rounds(mode_config, instance, params, key, state, window,
                                       action_labels=labels))
    state = simulate.init_state(mode_config, instance)
    executable = step.lower(instance, labels, params, key, state).compile()
    print(f"compiled {mode} in {time.perf_counter() - started:.1f} s", flush=True)
    runs.append([mode, executable, labels, state])

  rows, done = [], 0
  skip = {"rescored_cells"}
  ahead = None  # (round, [state per mode]) the modes' first timed calls of the last window reached
  for t in sorted(rounds_at):
    if ahead is not None and ahead[0] <= t:  # start from there instead of running it again
      done = ahead[0]
      for run, reached in zip(runs, ahead[1]):
        run[3] = reached
    while done + window <= t:
      for run in runs:
        run[3], _ = run[1](instance, run[2], params, key, run[3])
      done += window
    jax.block_until_ready([run[3] for run in runs])
    times = {run[0]: [] for run in runs}
    records, reached = {}, {}
    load_before = bench.load1()
    for _ in range(repeats):
      for mode, executable, labels, state in runs:
        started = time.perf_counter()
        after, out = jax.block_until_ready(executable(instance, labels, params, key, state))
        times[mode].append((time.perf_counter() - started) / window * 1e3)
        records.setdefault(mode, out)
        reached.setdefault(mode, after)
    ahead = (done + window, [reached[mode] for mode in modes])
    first = records[modes[0]]
    base = float(np.median(times[modes[0]]))
    for mode in modes:
      same = all(np.array_equal(np.asarray(getattr(first, f)), np.asarray(getattr(records[mode], f)))
                 for f in first._fields if f not in skip)
      median = float(np.median(times[mode]))
      regret_diff = float(np.max(np.abs(np.asarray(first.regret, np.float64) -
                                        np.asarray(records[mode].regret, np.float64))))
      rows.append({
          "t": done, "window": window, "variant": mode, "regret_diff": regret_diff,
          "ms_min": float(np.min(times[mode])), "ms_median": median,
          "delta_ms": median - base, "share_pct": 100.0 * (median - base) / base,
          "records": "same" if same else "DIFFER",
          "erm_steps": float(np.mean(np.asarray(records[mode].erm_iterations))),
          "rescored": float(np.mean(np.asarray(records[mode].rescored_cells))),
          "load1": f"{load_before:.1f}-{bench.load1():.1f}",
      })
    print(bench.format_table([r for r in rows if r["t"] == done], mode_columns(field)),
          flush=True)
  return rows


COLUMNS = [  # (title, key), as benchmarks/run.py's tables
    ("t", "t"), ("variant", "variant"), ("ms/round min", "ms_min"),
    ("median", "ms_median"), ("median - base", "delta_ms"), ("% of base", "share_pct"),
    ("records", "records"), ("ERM steps", "erm_steps"), ("load1", "load1"),
]


TOTAL_COLUMNS = [
    ("variant", "variant"), ("rounds", "rounds"), ("s a seed (sum of minima)", "s_min"),
    ("s a seed (sum of medians)", "s_median"), ("median - base, s", "delta_s"),
    ("% of base", "share_pct"), ("records", "records"),
]


def seed_totals(rows):
  """Per variant, the seconds one seed spends over the rounds that ``rows`` time.

  ``rows`` as :func:`measure` returns them, their windows tiling ``[0, H)``
  (``--whole-seed``): each window's minimum and median ms a round times its
  rounds, summed over the windows, and the summed medians less the base
  kernel's (the first variant) as seconds and as a share. ``records`` is the
  windows' verdict where they all agree, else "DIFFER".
  """
  by_variant = {}  # label -> its windows' rows, in the order first timed
  for row in rows:
    by_variant.setdefault(row["variant"], []).append(row)
  totals = []
  for label, windows in by_variant.items():
    records = {window["records"] for window in windows}
    totals.append({
        "variant": label, "rounds": sum(window["window"] for window in windows),
        "s_min": sum(window["ms_min"] * window["window"] for window in windows) / 1e3,
        "s_median": sum(window["ms_median"] * window["window"] for window in windows) / 1e3,
        "records": records.pop() if len(records) == 1 else "DIFFER",
    })
  base = totals[0]["s_median"]
  for total in totals:
    total["delta_s"] = total["s_median"] - base
    total["share_pct"] = 100.0 * total["delta_s"] / base
  return totals


def mode_columns(field: str):
  """The table of :func:`compare_regret_modes` for the config ``field`` compared."""
  return [
      ("t", "t"), (field, "variant"), ("ms/round min", "ms_min"),
      ("median", "ms_median"), ("median - first", "delta_ms"), ("% of first", "share_pct"),
      ("records", "records"), ("max regret diff", "regret_diff"),
      ("cells re-scored", "rescored"), ("ERM steps", "erm_steps"), ("load1", "load1"),
  ]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds-at", default="500,2000,4000",
                 help="comma-separated rounds t at which the window starts")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--window", type=int, default=500, help="rounds a timed call runs")
  p.add_argument("--out", default="results/bench")
  p.add_argument("--only", default="",
                 help="comma-separated words: time only the variants whose label holds one "
                      "(and the base kernel), e.g. --only Woodbury,BFGS")
  p.add_argument("--whole-seed", type=int, default=0, metavar="H",
                 help="time every window of rounds [0, H) (replaces --rounds-at) and sum "
                      "them per variant: the seconds a seed takes and each piece's share")
  p.add_argument("--regret-modes", action="store_true",
                 help="instead of the pieces: the kernel with regret_evaluation 'full' against "
                      "'certified' (writes regret_modes.csv/json)")
  p.add_argument("--gradient-modes", action="store_true",
                 help="instead of the pieces: the kernel with erm_gradient 'xla' against "
                      "'native' (writes gradient_modes.csv/json)")
  args = p.parse_args(argv)
  if args.regret_modes and args.gradient_modes:
    raise SystemExit("--regret-modes and --gradient-modes: give one of them")
  args.rounds_at = [int(v) for v in args.rounds_at.split(",")]
  if args.whole_seed:
    if args.regret_modes or args.gradient_modes:
      raise SystemExit("--whole-seed sums the pieces' variants: not with --regret-modes or "
                       "--gradient-modes")
    if args.whole_seed < args.window or args.whole_seed % args.window:
      raise SystemExit(f"--whole-seed: {args.whole_seed}; allowed: a positive multiple of "
                       f"--window={args.window}")
    args.rounds_at = list(range(0, args.whole_seed, args.window))
  args.only = [word for word in args.only.split(",") if word]
  for t in args.rounds_at:
    if t < 0 or t % args.window:
      raise SystemExit(f"--rounds-at: {t} is not a non-negative multiple of "
                       f"--window={args.window}")
  if args.repeats < 1:
    raise SystemExit(f"--repeats: {args.repeats}; allowed: at least 1")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  from jaxbandit.simulate import one_blas_thread

  started = time.time()
  name, columns = "attribution", COLUMNS
  if args.regret_modes:
    name, columns = "regret_modes", mode_columns("regret_evaluation")
  elif args.gradient_modes:
    name, columns = "gradient_modes", mode_columns("erm_gradient")
  with one_blas_thread():
    if args.regret_modes:
      rows = compare_regret_modes(args.rounds_at, args.repeats, args.window)
    elif args.gradient_modes:
      rows = compare_regret_modes(args.rounds_at, args.repeats, args.window,
                                  modes=("xla", "native"), field="erm_gradient")
    else:
      rows = measure(args.rounds_at, args.repeats, args.window, args.only)
  print()
  print(bench.format_table(rows, columns))
  os.makedirs(args.out, exist_ok=True)
  bench.write_outputs(args.out, name, rows,
                      dict(machine=bench.machine_info(), seconds=time.time() - started,
                           source=bench.source_fingerprint(), argv=sys.argv[1:]),
                      columns)
  if args.whole_seed:
    totals = seed_totals(rows)
    print()
    print(bench.format_table(totals, TOTAL_COLUMNS))
    bench.write_outputs(args.out, name + "_totals", totals,
                        dict(machine=bench.machine_info(), source=bench.source_fingerprint(),
                             argv=sys.argv[1:]), TOTAL_COLUMNS)
  written = f"{name}.csv and {name}.json" + (f", {name}_totals.csv/json" if args.whole_seed else "")
  print(f"\nwrote {written} in {args.out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
  main()
