#!/usr/bin/env bash
# The verl drop-in's tests against the real verl 0.9.1 (CPU): a separate virtual environment
# (verl pins its own torch and transformers), created or reused, with the pinned packages of
# integration/verl/requirements.txt; installs ./bindings/python into it and runs
# integration/verl/tests.
#
#   scripts/verl-tests.sh [pytest args...]
#
# Environment:
#   CALIBRL_VERL_VENV   the virtual environment (default: $HOME/.cache/calibrl/venv-verl)
#   PYTHON              the interpreter that creates it (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CALIBRL_VERL_VENV:-$HOME/.cache/calibrl/venv-verl}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "verl-tests: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install --quiet -r "$ROOT/integration/verl/requirements.txt"
"$PY" -m pip install --quiet --force-reinstall --no-deps "$ROOT/bindings/python"

cd "$ROOT"
unset CALIBRL_LIBRARY

exec "$PY" -m pytest "$ROOT/integration/verl/tests" -q -rs -p no:cacheprovider -W ignore::UserWarning \
    -W ignore::DeprecationWarning "$@"
