"""Command line: ``jaxbandit run``, ``jaxbandit presets``."""

from __future__ import annotations

import argparse
import sys
import time

RUN_EXAMPLE = """example:
  jaxbandit run --preset paper-users                  # the README's main job
  jaxbandit run --preset smoke --out results/smoke    # a seconds-long try
  jaxbandit run --preset paper-users --seeds 64 --horizon 2000
"""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxbandit",
      description="Vectorized simulator of greedy exact-ERM preference learning.")
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="run a preset and write summary.json, curves.csv, figure.png",
                       epilog=RUN_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
  run.add_argument("--preset", default="paper-users", help="preset name (see 'jaxbandit presets')")
  run.add_argument("--out", default=None, help="results folder (default results/PRESET)")
  run.add_argument("--seeds", type=int, default=None, help="Monte Carlo seeds per population")
  run.add_argument("--horizon", type=int, default=None, help="rounds per seed")
  run.add_argument("--chunk-size", type=int, default=None, help="rounds per compiled call")
  run.add_argument("--quiet", action="store_true", help="no progress lines")
  sub.add_parser("presets", help="list the presets with a one-line description",
                 epilog="example:\n  jaxbandit presets",
                 formatter_class=argparse.RawDescriptionHelpFormatter)
  return parser


def _run(args) -> int:
  from jaxbandit import experiment, presets

  config = presets.get_preset(args.preset)
  horizon = args.horizon if args.horizon is not None else config.horizon
  chunk = args.chunk_size
  if chunk is None and config.chunk_size is not None:
    chunk = min(config.chunk_size, horizon) if isinstance(horizon, int) and horizon > 0 else None
  config = presets.with_overrides(config, n_seeds=args.seeds, horizon=args.horizon,
                                  chunk_size=chunk)
  config.validate()
  out = args.out or f"results/{args.preset}"
  print(f"jaxbandit run {config.name}: populations {list(config.populations)}, "
        f"{config.n_seeds} seeds, {config.horizon} rounds -> {out}", flush=True)
  started = time.time()
  summary = experiment.run_experiment(config, out, progress=not args.quiet)
  print(f"done in {time.time() - started:.1f}s")
  print(f"{'users':>6} {'seed':>6} {'Delta_min':>10} {'cum. regret (95% CI)':>30} "
        f"{'ERM conv.':>9}")
  for pop in summary["populations"]:
    reg = pop["final_cumulative_regret"]
    print(f"{pop['n_users']:>6} {pop['accepted_seed']:>6} {pop['min_gap']:>10.3g} "
          f"{reg['mean']:>10.3f} [{reg['lower95']:.3f}, {reg['upper95']:.3f}]"
          f"{pop['erm_converged_fraction']:>9.4f}")
  print(f"wrote {out}/summary.json, curves.csv, figure.png")
  return 0


def _presets(args) -> int:
  del args
  from jaxbandit.presets import PRESETS

  for name, (description, _) in sorted(PRESETS.items()):
    print(f"{name:24s} {description}")
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "run":
      return _run(args)
    return _presets(args)
  except ValueError as err:
    print(f"jaxbandit: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
