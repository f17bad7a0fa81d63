#!/usr/bin/env bash
# Runs a lapa command on every worker of a Cloud TPU VM pod slice (single slice).
#
#   TPU=my-v4-64 ZONE=us-central2-b bash launch/tpu_pod.sh setup
#   TPU=my-v4-64 ZONE=us-central2-b bash launch/tpu_pod.sh run [--log FILE] [--wait] \
#       lapa train configs/laq.py:paper --workdir /mnt/runs/laq \
#       --config.data.data_dir=gs://bucket/oxe --config.data.mixture=lapa_openx
#   TPU=my-v4-64 ZONE=us-central2-b bash launch/tpu_pod.sh stop
#   TPU=... ZONE=... bash launch/tpu_pod.sh --dry-run run lapa ...   # prints the gcloud commands only
#
# `setup` copies this checkout (git's tracked and untracked files, not the ignored ones such as .venv)
# to ~/$REMOTE_DIR on every worker and installs it there with libtpu JAX. `run` starts the same command
# on all workers (JAX requires every worker to run it) in the background, its output in FILE on each
# worker (default ~/lapa.log; a relative FILE is under the home directory), after stopping the run
# this script started before; with --wait it returns when the command has ended on every worker, so
# stages can follow each other (each worker's ssh session ends with the command's exit status).
# `stop` stops the run: SIGTERM, so a training run saves a checkpoint, then up to 10 minutes' wait.
# Only that process (its pid is in ~/lapa.pid) is stopped; if another one holds the TPU, JAX's error
# names its pid. Each process calls jax.distributed.initialize() with no arguments (auto-detected on
# TPU) because LAPA_DISTRIBUTED=1 is set.
# Workdirs must be a directory every worker sees (an NFS/Filestore or gcsfuse mount); data may be gs://.
set -euo pipefail
usage="usage: TPU=<name> ZONE=<zone> bash launch/tpu_pod.sh [--dry-run] setup | run [--log FILE] [--wait] <lapa command ...> | stop"
fail() { echo "launch/tpu_pod.sh: $1; $usage" >&2; exit 2; }

dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
[ -n "${TPU:-}" ] && [ -n "${ZONE:-}" ] || fail "set TPU (the TPU VM's name) and ZONE (its zone)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-lapa_jax}"
remote_dir="$(printf %q "$REMOTE_DIR")"

# Runs a command, or with --dry-run prints it, each word quoted as the shell needs.
run() { if [ $dry_run = 1 ]; then local words; words="$(printf '%q ' "$@")"; echo "${words% }"; else "$@"; fi; }
# The remote command is a one-line shell script: shown in single quotes, which keep it readable.
single_quoted() { local q="'"; printf "'%s'" "${1//$q/$q\\$q$q}"; }
ssh_all() {
  local ssh=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command)
  if [ $dry_run = 1 ]; then echo "$(printf '%q ' "${ssh[@]}")$(single_quoted "$1")"; else "${ssh[@]}" "$1"; fi
}

# On each worker: SIGTERM to the run started by `run` (if still alive), and wait for it to exit (a
# zombie has exited: its parent shell is gone and it waits only to be reaped).
stop_previous='if [ -f ~/lapa.pid ]; then pid=$(cat ~/lapa.pid); kill "$pid" 2>/dev/null && for _ in $(seq 600); do ps -o stat= -p "$pid" | grep -qv "^Z" || break; sleep 1; done; rm -f ~/lapa.pid; fi'
# XLA:CPU's temporaries on huge pages (lapa_jax/host_memory.py); kept if the user chose a value.
huge_pages='[[ ${GLIBC_TUNABLES:-} == *glibc.malloc.hugetlb* ]] || export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"'

case "${1:-}" in
  setup)
    tarball="${TMPDIR:-/tmp}/lapa_jax_src.tar.gz"
    if [ $dry_run = 1 ]; then
      echo "git -C $(printf %q "$ROOT") ls-files -z -co --exclude-standard | tar -czf $(printf %q "$tarball") -C $(printf %q "$ROOT") --null -T -"
    else
      git -C "$ROOT" ls-files -z -co --exclude-standard | tar -czf "$tarball" -C "$ROOT" --null -T -
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU:lapa_jax_src.tar.gz" --zone "$ZONE" --worker=all
    ssh_all "mkdir -p $remote_dir && tar -xzf lapa_jax_src.tar.gz -C $remote_dir && cd $remote_dir \
&& python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
&& .venv/bin/pip install -q \"jax[tpu]==0.10.2\" && .venv/bin/pip install -q --no-deps -e ."
    ;;
  run)
    shift
    log=lapa.log wait=''
    while [ $# -gt 0 ]; do
      case "$1" in
        --log) [ $# -ge 2 ] || fail "--log needs a file"; log="$2"; shift 2 ;;
        --log=*) log="${1#--log=}"; shift ;;
        --wait) wait='; wait $!'; shift ;;  # each worker's shell then ends with the command's exit status
        *) break ;;
      esac
    done
    [ $# -gt 0 ] || fail "run needs a command, e.g. lapa train configs/laq.py:paper --workdir DIR"
    if [[ $log == /* ]]; then remote_log="$(printf %q "$log")"; else remote_log="~/$(printf %q "$log")"; fi
    # `&` backgrounds only the nohup'd command, so $! is the lapa process itself (nohup execs it).
    ssh_all "$stop_previous; cd $remote_dir && source .venv/bin/activate || exit 1; $huge_pages; \
LAPA_DISTRIBUTED=1 nohup $(printf '%q ' "$@")> $remote_log 2>&1 < /dev/null & echo \$! > ~/lapa.pid$wait"
    [ $dry_run = 1 ] || [ -n "$wait" ] || echo "started on all workers of $TPU; output in $remote_log on each worker"
    ;;
  stop)
    ssh_all "$stop_previous"
    ;;
  '') fail "no command" ;;
  *) fail "unknown command '$1'" ;;
esac
