#!/usr/bin/env bash
# Installs into .venv if needed and runs the test suite (CPU only). Extra args go to pytest.
LAPA_REQUIREMENTS="requirements.txt requirements-test.txt requirements-nodeps.txt"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# XLA:CPU's per-call temporaries on transparent huge pages (lapa_jax/host_memory.py; `lapa` sets it itself).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
python -m pytest tests "$@"
