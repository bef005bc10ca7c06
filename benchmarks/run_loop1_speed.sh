#!/usr/bin/env bash
# Loop-1 speed on one GPU (issue 21): the measurements of benchmarks/results/gpu_loop1.md, one part per device
# call (each under the 10-minute limit of one call; rows are compared only within one part, one process):
#   benchmarks/run_loop1_speed.sh OUT b8     # 4B, B = 8: FLOPs, the plain assembly, graphed / +nostop / +sameimage
#   benchmarks/run_loop1_speed.sh OUT b16    # 4B, graphed at B = 16 and B = 1
#   benchmarks/run_loop1_speed.sh OUT gen    # 4B teacher decoding alone at B = 1 / 8 (+ early-stop rows), host syncs
#   benchmarks/run_loop1_speed.sh OUT 1b     # the sa2va-1b shape at B = 8 (graphed, plain, decoding), its profile
#   benchmarks/run_loop1_speed.sh OUT profile [BEFORE_TREE]   # 4B B = 8 profile (by phase); the "before" row
# BEFORE_TREE: a checkout of the code before the change (`git archive REV maskloop benchmarks | tar -x -C DIR`),
# measured at B = 8 in the same call.
# CACHE=FILE: torch.compile's caches read from / written to FILE (carry it to the next machine: less compiling).
# Tables: python benchmarks/loop1_report.py OUT/*.json
set -u
usage="usage: run_loop1_speed.sh OUT b8|b16|gen|1b|profile [BEFORE_TREE]"
OUT=${1:?$usage}
PART=${2:?$usage}
BEFORE=${3:-}
CC=()
[ -n "${CACHE:-}" ] && CC=(--compile-cache "$CACHE")
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=python3
quiet() { grep -v '^W[0-9]' "$1" | tail -"$2"; }
case "$PART" in
b8)
    timeout 560 $py benchmarks/gpu_loop1.py --batches "" --plain-batches 8 --skip gumbel,generation,overlap_check \
        --compare 8 --variants graphed,graphed+nostop,graphed+sameimage "${CC[@]}" --out "$OUT/loop1_4b_b8.json" \
        > "$OUT/loop1_4b_b8.log" 2>&1
    quiet "$OUT/loop1_4b_b8.log" 12
    ;;
b16)
    timeout 560 $py benchmarks/gpu_loop1.py --batches "" --plain-batches "" --skip flops,plain,gumbel,generation,overlap_check \
        --compare 16,1 --variants graphed "${CC[@]}" --out "$OUT/loop1_4b_b16.json" > "$OUT/loop1_4b_b16.log" 2>&1
    quiet "$OUT/loop1_4b_b16.log" 8
    ;;
gen)
    timeout 360 $py benchmarks/gpu_loop1.py --only-generation "${CC[@]}" --out "$OUT/gen_4b.json" > "$OUT/gen_4b.log" 2>&1
    grep -E '^(gen|early stop)' "$OUT/gen_4b.log"
    timeout 200 $py benchmarks/gpu_loop1.py --sync-sites 8 --profile-variant graphed "${CC[@]}" \
        --profile-out "$OUT/syncs_4b_b8.txt" > "$OUT/syncs.log" 2>&1
    head -12 "$OUT/syncs_4b_b8.txt"
    ;;
1b)
    timeout 400 $py benchmarks/gpu_loop1.py --preset sa2va-1b --batches "" --plain-batches 8 --compare 8 \
        --variants graphed --skip gumbel,overlap_check --out "$OUT/loop1_1b.json" > "$OUT/loop1_1b.log" 2>&1
    quiet "$OUT/loop1_1b.log" 8
    timeout 150 $py benchmarks/gpu_loop1.py --preset sa2va-1b --profile 8 --profile-variant graphed \
        --profile-out "$OUT/profile_1b_b8.txt" > "$OUT/profile_1b.log" 2>&1
    grep "CUDA kernels" "$OUT/profile_1b_b8.txt"
    ;;
profile)
    # top kernels, host-side ops and the by-phase table of one step, and one teacher generation, at B = 8
    timeout 300 $py benchmarks/gpu_loop1.py --profile 8 --profile-variant graphed "${CC[@]}" \
        --profile-out "$OUT/profile_4b_b8.txt" > "$OUT/profile.log" 2>&1
    grep "CUDA kernels" "$OUT/profile_4b_b8.txt"
    if [ -n "$BEFORE" ]; then
        (cd "$BEFORE" && PYTHONPATH=$PWD timeout 240 $py benchmarks/gpu_loop1.py --batches "" --plain-batches "" \
            --compare 8 --variants graphed --skip flops,plain,gumbel,generation,overlap_check \
            --out "$OUT/before_4b_b8.json" > "$OUT/before.log" 2>&1)
        quiet "$OUT/before.log" 3
    fi
    ;;
*)
    echo "error: PART must be b8, b16, gen, 1b or profile, got '$PART'" >&2
    exit 2
    ;;
esac
