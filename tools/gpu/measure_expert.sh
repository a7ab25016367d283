#!/usr/bin/env bash
# The scripted expert's per-task success rates at the reference protocol (50 episodes per task) on libero_object,
# libero_goal, libero_10 and libero_90, then the robustness suites (LIBERO-PRO) with the expert and the noop control
# at PRO_EPISODES episodes per task (default 10; 0 skips them). One simulator process per worker.
# Usage from the repo root (GPU host or any Linux box with the simulator):
#   bash tools/gpu/measure_expert.sh OUT [WORKERS]
# Writes OUT/expert.sqlite (every episode, resumable: run it again to finish an interrupted measurement),
# OUT/rates.json ({suite: {task: {successes, episodes, rate, ci_low, ci_high, threshold, passed}}}), OUT/*.log.
# The env SUITES="libero_goal libero_10" narrows the standard suites.
set -uo pipefail
out=${1:?output folder}; workers=${2:-16}
mkdir -p "$out"
# on the GPU host (the simulator bundle is there): unpack it and load the plugin by name
[ -f .bundle/sim312.tar.xz ] && . tools/gpu/setup_host.sh
export OPENBLAS_NUM_THREADS=1 MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
py=${PYTHON:-python3}
results="$out/expert.sqlite"
for suite in ${SUITES:-libero_object libero_goal libero_10 libero_90}; do
  start=$(date +%s)
  $py -m pytest "suites/$suite" --checkpoint expert --vla-workers "$workers" --vla-results "$results" -q \
    -p no:cacheprovider > "$out/$suite.log" 2>&1
  echo "$suite: pytest exit $? after $(( $(date +%s) - start )) s"
done
if [ "${PRO_EPISODES:-10}" -gt 0 ]; then
  start=$(date +%s)
  $py -m pytest suites/libero_pro --checkpoint expert --episodes "${PRO_EPISODES:-10}" --vla-workers "$workers" \
    --vla-results "$results" -q -p no:cacheprovider > "$out/libero_pro-expert.log" 2>&1
  echo "libero_pro expert: pytest exit $? after $(( $(date +%s) - start )) s"
  start=$(date +%s)
  $py -m pytest suites/libero_pro --checkpoint noop --episodes "${PRO_EPISODES:-10}" --vla-curtail \
    --vla-workers "$workers" --vla-results "$results" -q -p no:cacheprovider > "$out/libero_pro-noop.log" 2>&1
  echo "libero_pro noop (curtailed): pytest exit $? after $(( $(date +%s) - start )) s"
fi
$py tools/rates_json.py "$results" "$out/rates.json"
