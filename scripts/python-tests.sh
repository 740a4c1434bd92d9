#!/usr/bin/env bash
# Python bindings: create (or reuse) the test venv with its pinned dependencies (scripts/venv.sh),
# install ./bindings/python (which builds libcalibrl.so with cargo), and run pytest.
#
#   scripts/python-tests.sh [pytest args...]
#
# Environment:
#   CALIBRL_VENV           the virtual environment (default: <repo>/.venv); reused when present
#   PYTHON                 the interpreter that creates it (default: python3)
#   CALIBRL_PY_INTEGRATIONS=0   skip installing deepspeed, megatron-core and trl (their tests skip)
#   CALIBRL_PY_VERL=0      skip the verl drop-in's tests (scripts/verl-tests.sh, own venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CALIBRL_VENV:-$ROOT/.venv}"
export CALIBRL_VENV="$VENV"
bash "$ROOT/scripts/venv.sh"
PY="$VENV/bin/python"

# Builds the Rust library (cargo build --release) and installs it inside the package.
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install --quiet --force-reinstall --no-deps "$ROOT/bindings/python"

# The verl drop-in against the real verl 0.9.1, in its own venv (verl pins torch/transformers).
if [ "${CALIBRL_PY_VERL:-1}" != "0" ]; then
    bash "$ROOT/scripts/verl-tests.sh"
fi

# Run from the repository root with the installed package (never the source tree's copy).
# The venv's bin first on PATH: torch.utils.cpp_extension runs `ninja` (DeepSpeed's CPU Adam).
cd "$ROOT"
unset CALIBRL_LIBRARY
export PATH="$VENV/bin:$PATH"
export DS_ACCELERATOR=cpu
exec "$VENV/bin/pytest" "$ROOT/bindings/python/tests" -q -rs "$@"
