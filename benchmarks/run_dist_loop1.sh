#!/usr/bin/env bash
# Loop 1 at the sa2va-1b preset: 1 GPU vs `torchrun --nproc_per_node 2` with the same global batch, and
# 1 GPU at the per-GPU batch (weak scaling).  Usage: benchmarks/run_dist_loop1.sh OUT_DIR [STEPS]
set -euo pipefail
out=${1:?output directory}
steps=${2:-30}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1
b=benchmarks/gpu_dist_loop1.py
python3 $b --global-batch 16 --steps "$steps" --out "$out/dist_1gpu_b16.json"
torchrun --standalone --nproc_per_node 2 $b --global-batch 16 --steps "$steps" --out "$out/dist_2gpu_b16.json"
python3 $b --global-batch 8 --steps "$steps" --out "$out/dist_1gpu_b8.json"
python3 $b --report "$out/dist_1gpu_b16.json" "$out/dist_2gpu_b16.json" "$out/dist_1gpu_b8.json" | tee "$out/dist_report.txt"
