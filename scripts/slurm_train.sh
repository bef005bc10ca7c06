#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, c10d rendezvous on the first node.
#   sbatch --nodes 2 scripts/slurm_train.sh configs/dual.yaml --set distributed=fsdp
#SBATCH --job-name=maskloop
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch --nodes N scripts/slurm_train.sh CONFIG [maskloop train args]}
shift
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS=${SLURM_GPUS_ON_NODE:-8}
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS" \
  --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" --rdzv-id "$SLURM_JOB_ID" \
  -m maskloop.cli train --config "$CONFIG" --resume auto "$@"
