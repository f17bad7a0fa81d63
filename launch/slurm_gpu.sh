#!/usr/bin/env bash
# SLURM batch script for multi-node GPU training, one process per GPU (what jax's SLURM
# auto-detection assumes).
#
#   sbatch --nodes=2 launch/slurm_gpu.sh lapa train configs/laq.py:paper --workdir /shared/runs/laq
#   bash launch/slurm_gpu.sh --dry-run lapa train ...   # prints the environment and the srun line only
#
# Install once on the cluster: pip install -r requirements.txt 'jax[cuda12]==0.10.2' && pip install -e .
# (sbatch passes your environment on: activate that virtualenv before submitting.)
#SBATCH --job-name=lapa
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
set -euo pipefail
# sbatch runs a copy of this file, so messages name it rather than $0.
fail() { echo "launch/slurm_gpu.sh: $1; usage: sbatch [options] launch/slurm_gpu.sh [--dry-run] <lapa command ...>" >&2; exit 2; }
dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
[ $# -gt 0 ] || fail "no command, e.g. lapa train configs/laq.py:paper --workdir DIR"

# SIGTERM 300 s before the time limit: the train loop saves a checkpoint and exits 0, and
# resubmitting the same command resumes from it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
# Each process calls jax.distributed.initialize(), which reads the SLURM_* variables srun sets.
export LAPA_DISTRIBUTED=1
# XLA:CPU's temporaries on huge pages (lapa_jax/host_memory.py); a value you chose is kept.
[[ ${GLIBC_TUNABLES:-} == *glibc.malloc.hugetlb* ]] ||
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"

command=(srun --kill-on-bad-exit=1 "$@")
if [ $dry_run = 1 ]; then
  for name in XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS LAPA_DISTRIBUTED GLIBC_TUNABLES; do
    echo "export $name=$(printf %q "${!name}")"
  done
  words="$(printf '%q ' "${command[@]}")"
  echo "${words% }"
else
  "${command[@]}"
fi
