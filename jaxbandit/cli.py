"""Command line: ``jaxbandit run | sweep | presets | plot | bench``."""

from __future__ import annotations

import argparse
import os
import sys
import time

RUN_EXAMPLE = """examples:
  jaxbandit run --preset paper-users                  # the README's main job
  jaxbandit run smoke --out results/smoke             # a preset by name, seconds long
  jaxbandit run my-experiment.toml                    # a TOML config (see docs/config.md)
  jaxbandit run results/paper-users/config.toml       # repeat a finished run exactly
  jaxbandit run --preset paper-users --seeds 64 --horizon 2000
  jaxbandit run --resume results/paper-users          # continue after Ctrl-C / kill
"""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxbandit",
      description="Vectorized simulator of greedy exact-ERM preference learning.")
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="run a preset or TOML config; writes summary.json, "
                       "curves.csv, figure.png", epilog=RUN_EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
  run.add_argument("target", nargs="?", default=None,
                   help="a preset name or a .toml config file (default: paper-users)")
  run.add_argument("--preset", default=None, help="preset name (see 'jaxbandit presets')")
  run.add_argument("--out", default=None, help="results folder (default results/NAME)")
  run.add_argument("--seeds", type=int, default=None, help="Monte Carlo seeds per population")
  run.add_argument("--horizon", type=int, default=None, help="rounds per seed")
  run.add_argument("--chunk-size", type=int, default=None,
                   help="rounds per compiled call (checkpoint interval)")
  run.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the interrupted run in DIR (uses DIR/config.toml)")
  run.add_argument("--quiet", action="store_true", help="no progress lines")
  sweep = sub.add_parser(
      "sweep", help="run a grid over one traced parameter, compiled once",
      epilog="""examples:
  jaxbandit sweep smoke --param beta --values 0.1,1,10
  jaxbandit sweep paper-users --param head_rank --values 1,2,5,10 --seeds 8 --horizon 500
sweepable: beta, ridge, mixture_weight, reward_scale, head_rank, min_gap, problem_seed""",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sweep.add_argument("target", help="a preset name or a .toml config file")
  sweep.add_argument("--param", required=True, help="the parameter to sweep")
  sweep.add_argument("--values", required=True, help="comma-separated values")
  sweep.add_argument("--out", default=None, help="results folder (default results/NAME-sweep-PARAM)")
  sweep.add_argument("--seeds", type=int, default=None, help="Monte Carlo seeds per lane")
  sweep.add_argument("--horizon", type=int, default=None, help="rounds per seed")
  sweep.add_argument("--chunk-size", type=int, default=None, help="rounds per compiled call")
  sweep.add_argument("--quiet", action="store_true", help="no progress lines")
  bench = sub.add_parser(
      "bench", help="the benchmark table (runs benchmarks/run.py of a source checkout)",
      epilog="""examples:
  jaxbandit bench --quick          # about 2 minutes: compile, run, seed-rounds/s, GFLOP/s,
                                   # memory, speedup over the NumPy reference
  jaxbandit bench --scaling        # time against horizon and seeds, with a figure
  jaxbandit bench --figure         # the whole paper-users figure, projected to 1,000 seeds
  jaxbandit bench -- --help        # every option of benchmarks/run.py""",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                     help="options passed to benchmarks/run.py")
  sub.add_parser("presets", help="list the presets with a one-line description",
                 epilog="example:\n  jaxbandit presets",
                 formatter_class=argparse.RawDescriptionHelpFormatter)
  plot = sub.add_parser("plot", help="redraw the figures of a results folder",
                        epilog="example:\n  jaxbandit plot results/paper-users --log-x",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
  plot.add_argument("folder", help="a results folder holding curves.csv")
  plot.add_argument("--log-x", action="store_true", help="logarithmic round axis")
  return parser


def _resolve_config(args):
  from jaxbandit import config_io, presets

  if args.target is not None and args.preset is not None:
    raise ValueError(f"both a target ({args.target!r}) and --preset ({args.preset!r}) were "
                     f"given; allowed: one of them")
  target = args.target if args.target is not None else args.preset
  if args.resume is not None:
    saved_path = os.path.join(args.resume, config_io.CONFIG_FILE)
    if not os.path.exists(saved_path):
      raise ValueError(f"--resume {args.resume!r} holds no {config_io.CONFIG_FILE}; allowed: a "
                       f"results folder written by 'jaxbandit run'")
    config = config_io.load_config(saved_path)
    if target is not None or args.seeds is not None or args.horizon is not None or \
        args.chunk_size is not None:
      asked = _resolve_fresh(target or "paper-users", args)
      if config_io.config_fingerprint(asked) != config_io.config_fingerprint(config):
        raise ValueError(f"--resume {args.resume!r} was made by a different config; allowed: "
                         f"'jaxbandit run --resume {args.resume}' alone, or a new --out")
    return config, args.resume
  config = _resolve_fresh(target or "paper-users", args)
  return config, args.out or f"results/{config.name}"


def _resolve_fresh(target, args):
  args.seeds = getattr(args, "seeds", None)
  from jaxbandit import config_io, presets

  if target.endswith(".toml") or os.path.isfile(target):
    config = config_io.load_config(target)
  else:
    config = presets.get_preset(target)
  horizon = args.horizon if args.horizon is not None else config.horizon
  chunk = args.chunk_size
  if chunk is None and config.chunk_size is not None and isinstance(horizon, int) and horizon > 0:
    chunk = min(config.chunk_size, horizon)
  return presets.with_overrides(config, n_seeds=args.seeds, horizon=args.horizon,
                                chunk_size=chunk).validate()


def _run(args) -> int:
  from jaxbandit import experiment

  config, out = _resolve_config(args)
  resume = args.resume is not None
  print(f"jaxbandit run {config.name}: populations {list(config.populations)}, "
        f"{config.n_seeds} seeds, {config.horizon} rounds -> {out}"
        f"{' (resuming)' if resume else ''}", flush=True)
  started = time.time()
  from jaxbandit import science

  if config.name in science.MULTI_RUN:  # several runs each: jaxbandit.science writes them
    if resume:
      raise ValueError(f"--resume is not supported for {config.name!r} (it is several runs); "
                       f"allowed: run it again")
    summary = science.run_named(config.name, out, config=config, progress=not args.quiet)
    print(f"done in {time.time() - started:.1f}s")
    science.print_table(summary)
    print(f"wrote {out}/summary.json, curves.csv, figure.png, figure.pdf")
    return 0
  try:
    if config.name == "paper-users":  # adds growth verdicts and figure_publication.png/pdf
      summary = science.paper_users(out, config=config, progress=not args.quiet, resume=resume)
    else:
      summary = experiment.run_experiment(config, out, progress=not args.quiet, resume=resume)
  except experiment.RunInterrupted as stop:
    print(f"jaxbandit: {stop}", file=sys.stderr)
    return 130
  print(f"done in {time.time() - started:.1f}s")
  print(f"{'users':>6} {'seed':>6} {'Delta_min':>10} {'cum. regret [95% CI]':>32} "
        f"{'bad rounds':>10} {'ERM conv.':>9}")
  for pop in summary["populations"]:
    reg = pop["final_cumulative_regret"]
    print(f"{pop['n_users']:>6} {pop['accepted_seed']:>6} {pop['min_gap']:>10.3g} "
          f"{reg['mean']:>11.3f} [{reg['lower95']:.3f}, {reg['upper95']:.3f}]"
          f"{pop['bad_rounds']['mean']:>10.1f} {pop['erm_converged_fraction']:>9.4f}")
  print(f"wrote {out}/config.toml, summary.json, curves.csv, figure.png, figure.pdf")
  return 0


def _sweep(args) -> int:
  from jaxbandit import experiment, validation

  validation.one_of("param", args.param, sorted(experiment.SWEEPABLE))
  convert = int if args.param in ("head_rank", "problem_seed") else float
  try:
    values = [convert(v) for v in args.values.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"values={args.values!r} is not allowed; allowed: comma-separated "
                     f"{'integers' if convert is int else 'numbers'}") from None
  config = _resolve_fresh(args.target, args)
  out = args.out or f"results/{config.name}-sweep-{args.param}"
  print(f"jaxbandit sweep {config.name}: {args.param} in {values}, populations "
        f"{list(config.populations)}, {config.n_seeds} seeds, {config.horizon} rounds -> {out}",
        flush=True)
  summary = experiment.run_sweep(config, args.param, values, out, progress=not args.quiet)
  print(f"{args.param:>14} {'users':>6} {'cum. regret [95% CI]':>32} {'tail regret':>12}")
  for row in summary["lanes"]:
    print(f"{row['value']!s:>14} {row['n_users']:>6} {row['final_mean']:>11.3f} "
          f"[{row['final_lower95']:.3f}, {row['final_upper95']:.3f}] {row['tail_mean']:>12.4f}")
  print(f"wrote {out}/sweep.csv, curves.csv, summary.json, figure.png")
  return 0


def _bench(args) -> int:
  import runpy
  from pathlib import Path

  script = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
  if not script.exists():
    raise ValueError(f"benchmarks/run.py not found next to the package ({script}); allowed: "
                     f"an editable install of a source checkout (pip install -e .)")
  forwarded = [a for a in args.bench_args if a != "--"]
  saved = sys.argv
  sys.argv = [str(script)] + forwarded
  try:
    runpy.run_path(str(script), run_name="__main__")
  finally:
    sys.argv = saved
  return 0


def _presets(args) -> int:
  del args
  from jaxbandit.presets import PRESETS

  for name, (description, _) in sorted(PRESETS.items()):
    print(f"{name:24s} {description}")
  return 0


def _plot(args) -> int:
  from jaxbandit import plotting

  curves = os.path.join(args.folder, "curves.csv")
  if not os.path.exists(curves):
    raise ValueError(f"folder={args.folder!r} holds no curves.csv; allowed: a results folder")
  name = "figure_logx.png" if args.log_x else "figure.png"
  plotting.cumulative_regret_figure(curves, os.path.join(args.folder, name),
                                    title=os.path.basename(os.path.normpath(args.folder)),
                                    log_x=args.log_x)
  print(f"wrote {os.path.join(args.folder, name)}")
  return 0


def available_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def use_every_core() -> int:
  """Makes one JAX host device per CPU core available to this process; returns the count.

  ``simulate`` splits the seeds over the local devices, so on a CPU the seeds
  then run on every core at once instead of one after another (1.45-1.7x
  measured on 2 cores, with the same results: a seed's draws do not depend
  on the device count). Nothing changes when ``XLA_FLAGS`` already sets
  ``--xla_force_host_platform_device_count`` (set it to 1 to opt out) or when
  JAX has already started (a Python session that called JAX before), and on
  an accelerator the CPU devices are not used for the kernel.
  """
  import jax

  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 0
  cores = available_cores()
  try:
    jax.config.update("jax_num_cpu_devices", max(cores, 1))
  except RuntimeError:  # the backend is already initialised: keep its devices
    return 0
  return cores


DETERMINISTIC_GPU_OPS = "--xla_gpu_deterministic_ops=true"


def use_deterministic_gpu_ops() -> bool:
  """Asks XLA for deterministic GPU kernels, so that a rerun on a GPU is bit-identical;
  returns whether the option was added to ``XLA_FLAGS``.

  XLA's GPU scatter-adds (the ERM's per-user sums) otherwise accumulate with
  atomics, in an order that varies from run to run. Measured on an NVIDIA H200
  (paper size, 8 seeds x 300 rounds): without the option 25 of 2,400 per-round
  regrets differed between two runs of the same keys (by at most 0.01); with
  it none did (that stage took 48 s against 42 s, two compiles included: the
  cost was not told apart from compile time). A CPU's kernels are deterministic and
  ignore it. Nothing changes when ``XLA_FLAGS`` already names the option
  (``--xla_gpu_deterministic_ops=false`` opts out) or when JAX has already
  started a backend (XLA reads ``XLA_FLAGS`` once, as the first one starts).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_deterministic_ops" in flags:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_GPU_OPS}".strip()
  return True


def compilation_cache_dir() -> str:
  """Where the console script keeps compiled kernels: ``$XDG_CACHE_HOME/jaxbandit/xla``
  (``~/.cache/jaxbandit/xla`` by default)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxbandit", "xla")


def use_compilation_cache(path=None, min_compile_seconds: float = 0.5):
  """Turns on JAX's persistent compilation cache in ``path`` (default
  :func:`compilation_cache_dir`); returns the folder used, or None.

  A second run of the same configuration then loads its compiled kernels from
  disk instead of compiling them: measured at paper size on 2 cores, the
  instance building went from 9.4 s to 2.4 s and the first chunk from 20.7 s
  to 9.4 s, with the same results (the cache holds the same executables; its key
  covers the program, the compile options, the JAX version and the device).
  Nothing changes when ``JAX_COMPILATION_CACHE_DIR`` is already set (JAX uses
  that folder), when ``JAXBANDIT_NO_COMPILATION_CACHE`` is set, or when the
  folder cannot be created. Compiles shorter than ``min_compile_seconds`` are
  not stored.
  """
  import jax

  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get(
      "JAXBANDIT_NO_COMPILATION_CACHE"):
    return None
  path = compilation_cache_dir() if path is None else path
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  return path


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if argv is None and args.command in ("run", "sweep"):  # the console script, not a caller
    use_deterministic_gpu_ops()
    use_every_core()
    use_compilation_cache()
  try:
    if args.command == "run":
      return _run(args)
    if args.command == "plot":
      return _plot(args)
    if args.command == "sweep":
      return _sweep(args)
    if args.command == "bench":
      return _bench(args)
    return _presets(args)
  except ValueError as err:
    print(f"jaxbandit: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
