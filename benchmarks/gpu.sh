#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one script, each stage under
# its own time limit so that a slow stage cannot take the others with it:
#   bash benchmarks/gpu.sh OUT_DIR [FIGURE_SECONDS]
# 1. the whole paper-users figure at 1,000 seeds per population (chunk times
#    are printed as it goes: a stage stopped at its limit still gives the speed);
# 2. the table's main row, 256 seeds x 2,000 rounds, with the NumPy reference;
# 3. repeatability with deterministic GPU kernels (reruns and a half batch, bit
#    for bit; add --compare-to a CPU run's repeatability.npz to compare machines).
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [FIGURE_SECONDS]}
figure_seconds=${2:-540}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXBANDIT_NO_COMPILATION_CACHE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout "$figure_seconds" python3 benchmarks/run.py --figure --figure-seeds 1000 --in-process \
  --out "$out/figure" 2>&1 | tail -28
timeout 180 python3 benchmarks/run.py --seeds 256 --horizon 2000 --no-variants \
  --out "$out/bench" 2>&1 | tail -6
XLA_FLAGS=--xla_gpu_deterministic_ops=true timeout 90 python3 benchmarks/run.py \
  --repeatability --seeds 8 --horizon 300 --out "$out/repeat" 2>&1 | tail -6
