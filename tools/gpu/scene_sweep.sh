#!/usr/bin/env bash
# On the GPU host, after `. tools/gpu/setup_host.sh`: run `vla-bench doctor` (every suite the bundle holds, every
# task and init state) under each mujoco version given: "bundle" is the bundle's own (the validated pin), a version
# number installs ${MJ_DIR:-.mj}/mujoco-VERSION-*.whl over it. Figures go to OUT/doctor-VERSION.{txt,json}.
#   bash tools/gpu/scene_sweep.sh OUT bundle 3.17.0 3.3.3 ...      (WORKERS, default 16; DOCTOR_ARGS, e.g. --init-states 10)
set -uo pipefail
out=$1; shift
mkdir -p "$out"
base=$PYTHONPATH
for v in "$@"; do
  export PYTHONPATH=$base
  if [ "$v" != bundle ]; then
    rm -rf "/tmp/mj-$v" && mkdir -p "/tmp/mj-$v"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "/tmp/mj-$v" "${MJ_DIR:-.mj}"/mujoco-"$v"-*.whl || continue
    export PYTHONPATH=/tmp/mj-$v:$base
  fi
  version=$(python3 -c 'import mujoco; print(mujoco.__version__)')
  start=$(date +%s)
  python3 -m vla_bench.cli doctor --workers "${WORKERS:-16}" ${DOCTOR_ARGS:-} --json "$out/doctor-$version.json" \
    > "$out/doctor-$version.txt" 2>&1
  echo "mujoco $version: doctor exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
  tail -8 "$out/doctor-$version.txt"
done
