#!/usr/bin/env bash
# Installs into .venv if needed and runs the test suite (CPU only). Extra args go to pytest.
LAPA_REQUIREMENTS="requirements.txt requirements-test.txt requirements-metaworld.txt requirements-nodeps.txt"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# XLA:CPU's per-step temporaries on transparent huge pages, ~1.4x faster on a CPU (lapa_jax/host_memory.py);
# glibc reads it at process start, so it is set here. A value you chose is kept.
[[ ${GLIBC_TUNABLES:-} == *glibc.malloc.hugetlb* ]] ||
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
python -m pytest tests "$@"
