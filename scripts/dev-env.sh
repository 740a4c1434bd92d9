#!/usr/bin/env bash
# Creates (once) the Python environment the tests use: NVRTC 13.0 from PyPI (so CUDA kernels
# compile on a CPU-only machine), and whatever the Python binding tests need.
# Source it: `. scripts/dev-env.sh` exports CALIBRL_VENV, PATH and LD_LIBRARY_PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALIBRL_VENV="${CALIBRL_VENV:-$root/.venv}"
if [ ! -x "$CALIBRL_VENV/bin/python" ]; then
  python3 -m venv "$CALIBRL_VENV"
fi
stamp="$CALIBRL_VENV/.calibrl-deps-v2"
if [ ! -f "$stamp" ]; then
  "$CALIBRL_VENV/bin/pip" install -q --upgrade pip
  # NVRTC compiles the kernels; ptxas (from nvcc) reports their registers and spills.
  "$CALIBRL_VENV/bin/pip" install -q "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-nvcc==13.0.*"
  touch "$stamp"
fi
nvidia_dir="$("$CALIBRL_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
export CALIBRL_VENV
export CALIBRL_CUDA_INCLUDE="$nvidia_dir/include"
export CUDA_HOME="${CUDA_HOME:-$nvidia_dir}"
export LD_LIBRARY_PATH="$nvidia_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
set +euo pipefail
