#!/usr/bin/env bash
# Loop-1 speed on one GPU (issue 21): the measurements of benchmarks/results/gpu_loop1.md, in two device calls
# (each under the 10-minute limit of one call):
#   benchmarks/run_loop1_speed.sh OUT 4b                # 4B: batch 1 / 8 / 16, plain, variants, decode, FLOPs
#   benchmarks/run_loop1_speed.sh OUT rest [BEFORE_TREE] # 1B rows, the profile at 4B batch 8, the "before" row
# BEFORE_TREE: a checkout of the code before the change (its maskloop/ and benchmarks/), measured at B = 8
# on the same GPU in the same session (`git archive REV maskloop benchmarks | tar -x -C DIR`).
# CACHE=FILE: torch.compile's caches read from / written to FILE (carry it to the next machine: less compiling).
# Tables: python benchmarks/loop1_report.py OUT/*.json
set -u
OUT=${1:?usage: run_loop1_speed.sh OUT 4b|rest [BEFORE_TREE]}
PART=${2:?usage: run_loop1_speed.sh OUT 4b|rest [BEFORE_TREE]}
BEFORE=${3:-}
CC=()
[ -n "${CACHE:-}" ] && CC=(--compile-cache "$CACHE")
mkdir -p "$OUT"
export PYTHONPATH=$PWD
py=python3
case "$PART" in
4b)
    # the side-stream check, batch 1 / 8 / 16, decode at 1 and 8, the plain assembly at 8, then at 8 and 16
    # every LLM layer + encoder block compiled and the LLM layers replayed as CUDA graphs (graphed)
    timeout 540 $py benchmarks/gpu_loop1.py --batches 1,8,16 --plain-batches 8 --compare 8,16 \
        --variants graphed --skip gumbel "${CC[@]}" --out "$OUT/loop1_4b.json" > "$OUT/loop1_4b.log" 2>&1
    grep -v '^W[0-9]' "$OUT/loop1_4b.log" | tail -14
    ;;
rest)
    timeout 260 $py benchmarks/gpu_loop1.py --preset sa2va-1b --batches 8 --plain-batches 8 --compare 8 \
        --variants graphed --skip gumbel,overlap_check --out "$OUT/loop1_1b.json" > "$OUT/loop1_1b.log" 2>&1
    grep -v '^W[0-9]' "$OUT/loop1_1b.log" | tail -6
    # top kernels and host-side ops of one step, and of one teacher generation, at batch 8 (graphed)
    timeout 170 $py benchmarks/gpu_loop1.py --profile 8 --profile-variant graphed "${CC[@]}" \
        --profile-out "$OUT/profile_4b_b8.txt" > "$OUT/profile.log" 2>&1
    grep "CUDA kernels" "$OUT/profile_4b_b8.txt"
    if [ -n "$BEFORE" ]; then
        (cd "$BEFORE" && PYTHONPATH=$PWD timeout 90 $py benchmarks/gpu_loop1.py --batches 8 --plain-batches "" \
            --compare "" --skip flops,plain,gumbel,generation --out "$OUT/before_4b_b8.json" > "$OUT/before.log" 2>&1)
        grep -v '^W[0-9]' "$OUT/before.log" | tail -3
    fi
    ;;
*)
    echo "error: PART must be 4b or rest, got '$PART'" >&2
    exit 2
    ;;
esac
