#!/usr/bin/env bash
# Installs into .venv if needed and runs the test suite (CPU only). Extra args go to pytest.
LAPA_REQUIREMENTS="requirements.txt requirements-test.txt"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m pytest tests "$@"
