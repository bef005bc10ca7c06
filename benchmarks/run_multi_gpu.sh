#!/usr/bin/env bash
# Issue 19's runs on one node of N GPUs (N >= 2), all through the real Trainer (benchmarks/gpu_dist_loop1.py):
#   benchmarks/run_multi_gpu.sh OUT_DIR N [STEPS]
# 1. Loop 1 at sa2va-4b, distributed: ddp — weak scaling at per-GPU batch 8 (1 GPU x 8 vs N GPUs x 8) and the
#    loss curve of N GPUs vs 1 GPU at the same global batch (8N);  strong scaling at a fixed global batch 32.
# 2. distributed: fsdp at sa2va-8b with activation checkpointing, N GPUs x 4, against ddp-free 1 GPU x 4N.
set -euo pipefail
out=${1:?output directory}; n=${2:?number of GPUs}; steps=${3:-30}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1
b=benchmarks/gpu_dist_loop1.py
run() { torchrun --standalone --nproc_per_node "$1" $b "${@:2}"; }
common=(--preset sa2va-4b --steps "$steps")
run 1 "${common[@]}" --global-batch 8 --distributed ddp --out "$out/ddp_1gpu_b8.json"
run "$n" "${common[@]}" --global-batch $((8 * n)) --distributed ddp --out "$out/ddp_${n}gpu_b$((8 * n)).json"
run 1 "${common[@]}" --global-batch $((8 * n)) --out "$out/one_1gpu_b$((8 * n)).json"
run 1 "${common[@]}" --global-batch 32 --distributed ddp --out "$out/ddp_1gpu_b32.json"
run "$n" "${common[@]}" --global-batch 32 --distributed ddp --out "$out/ddp_${n}gpu_b32.json"
python3 $b --report "$out/ddp_1gpu_b8.json" "$out/ddp_${n}gpu_b$((8 * n)).json" "$out/one_1gpu_b$((8 * n)).json" \
  | tee "$out/weak_scaling_report.txt"
python3 $b --report "$out/ddp_1gpu_b32.json" "$out/ddp_${n}gpu_b32.json" "$out/ddp_1gpu_b32.json" \
  | tee "$out/strong_scaling_report.txt"
run "$n" --preset sa2va-8b --steps "$steps" --global-batch $((4 * n)) --distributed fsdp --activation-checkpointing \
  --out "$out/fsdp8b_${n}gpu.json"
run "$n" --preset sa2va-8b --steps "$steps" --global-batch $((4 * n)) --distributed ddp --activation-checkpointing \
  --out "$out/ddp8b_${n}gpu.json" || echo "ddp at 8b did not fit (expected on 80 GB cards)"
