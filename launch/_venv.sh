# Sourced by the launch scripts: creates .venv and installs the project into it when it is missing
# or stale (a requirements file or setup.py changed since the last install), then activates it.
# LAPA_REQUIREMENTS names the requirement files (default: requirements.txt); test.sh adds the test extras.
# Files named *nodeps.txt are installed with --no-deps (packages whose declared pins are too strict).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LAPA_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
read -r -a REQUIREMENTS <<< "${LAPA_REQUIREMENTS:-requirements.txt}"
stamp="$(cd "$ROOT" && cat "${REQUIREMENTS[@]}" setup.py | sha256sum | cut -d' ' -f1)"
# One stamp per set of requirement files, so demo.sh and test.sh do not reinstall after each other.
stamp_file="$VENV/.lapa_stamp.$(echo "${REQUIREMENTS[*]}" | tr ' /' '+_')"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
  echo "[lapa] installing into $VENV (first run or changed requirements) ..."
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  for file in "${REQUIREMENTS[@]}"; do
    if [[ "$file" == *nodeps.txt ]]; then "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/$file"
    else "$VENV/bin/python" -m pip install -q -r "$ROOT/$file"; fi
  done
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  echo "$stamp" > "$stamp_file"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
# TensorFlow is only the input pipeline here: keep its start-up quiet.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
