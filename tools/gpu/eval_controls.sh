#!/usr/bin/env bash
# The embedded controls (expert, noop, random) on every LIBERO-Spatial task at the full reference protocol
# (50 episodes per task), with one simulator process per core of the GPU host. Usage from the repo root:
#   bash tools/gpu/eval_controls.sh OUT_DIR [WORKERS]
set -uo pipefail
out=${1:?output folder}; workers=${2:-16}
. tools/gpu/setup_host.sh
python3 -c "import mujoco, numpy, robosuite, sys; print('python', sys.version.split()[0], 'mujoco', mujoco.__version__, 'numpy', numpy.__version__, 'robosuite', robosuite.__version__)" 2>&1 | grep -v WARNING
start=$(date +%s)
python3 -m pytest suites/libero_spatial --checkpoint expert --checkpoint noop --checkpoint random \
  --vla-workers "$workers" --vla-results "$out/spatial.sqlite" -q -p no:randomly > "$out/spatial.log" 2>&1
echo "pytest exit $? after $(( $(date +%s) - start )) s"
python3 -m vla_bench.cli report --results "$out/spatial.sqlite" 2>&1 | grep -v WARNING
