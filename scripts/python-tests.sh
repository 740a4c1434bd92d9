#!/usr/bin/env bash
# Python bindings: create (or reuse) a virtual environment, install the test dependencies from
# PyPI, install ./bindings/python (which builds libcalibrl.so with cargo), and run pytest.
#
#   scripts/python-tests.sh [pytest args...]
#
# Environment:
#   CALIBRL_VENV           the virtual environment (default: <repo>/.venv); reused when present
#   PYTHON                 the interpreter that creates it (default: python3)
#   CALIBRL_PY_INTEGRATIONS=0   skip installing deepspeed and megatron-core (their tests skip)
#   CALIBRL_PY_VERL=0      skip the verl drop-in's tests (scripts/verl-tests.sh, own venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CALIBRL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "python-tests: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch from PyPI (the only registry reachable in CI); a satisfied requirement is not re-downloaded.
"$PY" -m pip install --quiet numpy torch pytest
if [ "${CALIBRL_PY_INTEGRATIONS:-1}" != "0" ]; then
    "$PY" -m pip install --quiet deepspeed==0.19.8 megatron-core==0.16.1
fi

# Builds the Rust library (cargo build --release) and installs it inside the package.
"$PY" -m pip install --quiet --force-reinstall --no-deps "$ROOT/bindings/python"

# The verl drop-in against the real verl 0.9.1, in its own venv (verl pins torch/transformers).
if [ "${CALIBRL_PY_VERL:-1}" != "0" ]; then
    bash "$ROOT/scripts/verl-tests.sh"
fi

# Run from the repository root with the installed package (never the source tree's copy).
cd "$ROOT"
unset CALIBRL_LIBRARY
export DS_ACCELERATOR=cpu
exec "$VENV/bin/pytest" "$ROOT/bindings/python/tests" -q -rs "$@"
