#!/usr/bin/env bash
# The end-to-end proof of `vla-bench finetune` on a GPU host (one GPU, 16 CPU cores; stage timings in e2e_finetune.py).
# Usage: scripts/e2e_finetune_gpu.sh [extra options of scripts/e2e_finetune.py, e.g. --heldout-task 3 --work e2e-2]
# Re-running the same command resumes: each stage skips what it finished (demos, runs, episodes in the results store).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: this recipe trains on the GPU')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" scripts/e2e_finetune.py "$@"
