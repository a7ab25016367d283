#!/usr/bin/env bash
# The embedded controls on every LIBERO-Spatial task at the reference protocol (50 episodes per task), one
# simulator process per core of the GPU host: the expert in full, the negative controls with --vla-curtail (they
# stop once their failure verdict is fixed). Usage from the repo root:  bash tools/gpu/eval_controls.sh OUT [WORKERS]
set -uo pipefail
out=${1:?output folder}; workers=${2:-16}
. tools/gpu/setup_host.sh
python3 -c "import mujoco, numpy, robosuite, sys; print('python', sys.version.split()[0], 'mujoco', mujoco.__version__, 'numpy', numpy.__version__, 'robosuite', robosuite.__version__)" 2>&1 | grep -v WARNING
common=(suites/libero_spatial --vla-workers "$workers" --vla-results "$out/spatial.sqlite" -q)
start=$(date +%s)
python3 -m pytest "${common[@]}" --checkpoint expert > "$out/expert.log" 2>&1
echo "expert: pytest exit $? after $(( $(date +%s) - start )) s"
start=$(date +%s)
python3 -m pytest "${common[@]}" --checkpoint noop --checkpoint random --vla-curtail > "$out/controls.log" 2>&1
echo "noop + random (curtailed): pytest exit $? after $(( $(date +%s) - start )) s"
python3 -m vla_bench.cli report --results "$out/spatial.sqlite" 2>&1 | grep -v WARNING
