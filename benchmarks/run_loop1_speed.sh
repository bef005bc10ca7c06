#!/usr/bin/env bash
# Loop-1 speed on one GPU (issue 21): every measurement of benchmarks/results/gpu_loop1.md in one call.
#   benchmarks/run_loop1_speed.sh OUT [BEFORE_TREE]
# BEFORE_TREE: a checkout of the code before the change (its maskloop/ and benchmarks/), measured at B = 8
# on the same GPU in the same session (`git archive REV maskloop benchmarks | tar -x -C DIR`).
set -u
OUT=${1:?usage: run_loop1_speed.sh OUT [BEFORE_TREE]}
BEFORE=${2:-}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
py=python3
# 4B: batch 1 / 8 / 16, the plain assembly at 8, compiled LLM layers at 8, decode at 1 and 8, FLOPs (MFU)
timeout 330 $py benchmarks/gpu_loop1.py --batches 1,8,16 --plain-batches 8 --compare 8 --variants compiled \
    --skip gumbel --out "$OUT/loop1_4b.json" > "$OUT/loop1_4b.log" 2>&1
tail -25 "$OUT/loop1_4b.log"
# top kernels of one step and of one teacher generation at batch 8
timeout 70 $py benchmarks/gpu_loop1.py --profile 8 --profile-out "$OUT/profile_4b_b8.txt" > "$OUT/profile.log" 2>&1
grep "CUDA kernels" "$OUT/profile_4b_b8.txt"
# the sa2va-1b shape: batch 8, plain at 8, decode at 1 and 8
timeout 110 $py benchmarks/gpu_loop1.py --preset sa2va-1b --batches 8 --plain-batches 8 --compare "" --skip gumbel \
    --out "$OUT/loop1_1b.json" > "$OUT/loop1_1b.log" 2>&1
tail -12 "$OUT/loop1_1b.log"
if [ -n "$BEFORE" ]; then
    (cd "$BEFORE" && PYTHONPATH=$PWD timeout 80 $py benchmarks/gpu_loop1.py --batches 8 --plain-batches "" --compare "" \
        --skip flops,plain,gumbel,generation --out "$OUT/before_4b_b8.json" > "$OUT/before.log" 2>&1)
    tail -4 "$OUT/before.log"
fi
