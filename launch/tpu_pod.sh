#!/usr/bin/env bash
# Runs a lapa command on every worker of a Cloud TPU VM pod slice (single slice).
#
#   TPU=my-v4-64 ZONE=us-central2-b bash launch/tpu_pod.sh setup
#   TPU=my-v4-64 ZONE=us-central2-b bash launch/tpu_pod.sh run \
#       lapa train configs/laq.py:paper --workdir gs://bucket/laq --config.mesh_dim=-1,1,1
#
# `setup` copies this checkout to every worker and installs it with libtpu JAX. `run` starts the same
# command on all workers (JAX requires every worker to run it), after ending stale Python processes
# that may still hold the TPU. Each process calls jax.distributed.initialize() with no arguments
# (auto-detected on TPU) because LAPA_DISTRIBUTED=1 is set.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-lapa_jax}"
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }

case "${1:-}" in
  setup)
    gcloud compute tpus tpu-vm scp --recurse "$ROOT" "$TPU:$REMOTE_DIR" --zone "$ZONE" --worker=all
    ssh_all "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
      && .venv/bin/pip install -q 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e ."
    ;;
  run)
    shift
    [ $# -gt 0 ] || { echo "usage: $0 run <lapa command ...>" >&2; exit 2; }
    ssh_all "pkill -f 'lapa_jax' || true; cd $REMOTE_DIR && source .venv/bin/activate && \
      LAPA_DISTRIBUTED=1 nohup $* > ~/lapa.log 2>&1 &"
    echo "started on all workers of $TPU; logs in ~/lapa.log on each worker"
    ;;
  *)
    echo "usage: $0 setup | run <lapa command ...>" >&2; exit 2 ;;
esac
