#!/usr/bin/env bash
# The Python environment of the tests: creates $CALIBRL_VENV (default <repo>/.venv) when it is
# missing and installs the pinned packages of scripts/requirements-test.txt into it (a satisfied
# pin is not downloaded again). Callers put "$CALIBRL_VENV/bin" first on PATH, so the tests find
# the venv's ninja and cmake.
#
# Environment:
#   CALIBRL_VENV                the virtual environment (default: <repo>/.venv)
#   PYTHON                      the interpreter that creates it (default: python3)
#   CALIBRL_PY_INTEGRATIONS=0   leave out the "# integration" lines (deepspeed, megatron-core, trl)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CALIBRL_VENV:-$root/.venv}"
req="$root/scripts/requirements-test.txt"

if [ ! -x "$venv/bin/python" ]; then
    echo "venv: creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
fi
if [ "${CALIBRL_PY_INTEGRATIONS:-1}" = "0" ]; then
    filtered="$(mktemp)"
    trap 'rm -f "$filtered"' EXIT
    grep -v '# integration' "$req" >"$filtered"
    req="$filtered"
fi
echo "venv: installing $(grep -cE '^[a-z]' "$req") pinned packages into $venv (first time: about 6 GB from PyPI)" >&2
PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install --quiet -r "$req"
