# Sourced by the launch scripts: creates .venv and installs the project into it when it is missing
# or stale (a requirements file or setup.py changed since the last install), then activates it.
# LAPA_REQUIREMENTS names the requirement files (default: requirements.txt); test.sh adds the test extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LAPA_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
read -r -a REQUIREMENTS <<< "${LAPA_REQUIREMENTS:-requirements.txt}"
stamp="$(cd "$ROOT" && cat "${REQUIREMENTS[@]}" setup.py | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.lapa_stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "[lapa] installing into $VENV (first run or changed requirements) ..."
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  for file in "${REQUIREMENTS[@]}"; do "$VENV/bin/python" -m pip install -q -r "$ROOT/$file"; done
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  echo "$stamp" > "$VENV/.lapa_stamp"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
# TensorFlow is only the input pipeline here: keep its start-up quiet.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
