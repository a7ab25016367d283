#!/usr/bin/env bash
# Issue 18's closed-loop benchmark on the GPU host: a random-weight OpenVLA-7B snapshot written here, evaluated
# through the user path (pytest suites/SUITE), and the kernel alone at the batch sizes the loop ran, in one run.
# Usage from the repo root (OUT defaults to bench_out; the rest goes to benchmarks/bench_closed_loop.py):
#   bash tools/gpu/bench_closed_loop.sh OUT [--tasks 1 2] [--episodes 16] [--workers 16] [--phases write,loop,kernel]
# Figures: OUT/bench_closed_loop.json; pytest's output: OUT/loop.log. The 15 GB snapshot goes to .bench/ (kept while
# the host stays warm, so a second command reuses it).
set -uo pipefail
out=${1:-bench_out}; shift || true
. tools/gpu/setup_host.sh
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
python3 benchmarks/bench_closed_loop.py --out "$out" "$@"
