#!/usr/bin/env bash
# SLURM batch script for multi-node GPU training, one process per GPU (what jax's SLURM
# auto-detection assumes).
#
#   sbatch --nodes=2 launch/slurm_gpu.sh lapa train configs/laq.py:paper --workdir /shared/runs/laq
#
# Install once on the cluster: pip install -r requirements.txt 'jax[cuda12]==0.10.2' && pip install -e .
#SBATCH --job-name=lapa
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: sbatch launch/slurm_gpu.sh <lapa command ...>" >&2; exit 2; }
# SIGTERM 300 s before the time limit: the train loop saves a checkpoint and exits 0, and
# resubmitting the same command resumes from it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export LAPA_DISTRIBUTED=1
srun --kill-on-bad-exit=1 "$@"
