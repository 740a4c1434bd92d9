#!/usr/bin/env bash
# Installs (once) the pinned CUDA 13.0 compiler tools from PyPI into .cuda13/ (so the kernels
# compile on a CPU-only machine) and names the Python environment of the binding tests.
# Source it: `. scripts/dev-env.sh` exports CALIBRL_VENV, CUDA_HOME and LD_LIBRARY_PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The Python virtual environment of the binding tests (PyTorch installs its own, newer CUDA
# wheels there) ...
CALIBRL_VENV="${CALIBRL_VENV:-$root/.venv}"
# ... and, apart from it, the pinned CUDA 13.0 compiler tools: NVRTC compiles the kernels (13.0
# emits PTX 9.0, which driver 580 JITs), ptxas (from nvcc) reports their registers and spills.
CALIBRL_CUDA_TOOLS="${CALIBRL_CUDA_TOOLS:-$root/.cuda13}"
stamp="$CALIBRL_CUDA_TOOLS/.calibrl-cuda13-v1"
if [ ! -f "$stamp" ]; then
  python3 -m pip install -q --root-user-action=ignore --upgrade --target "$CALIBRL_CUDA_TOOLS" \
    "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvcc==13.0.*"
  touch "$stamp"
fi
nvidia_dir="$CALIBRL_CUDA_TOOLS/nvidia/cu13"
export CALIBRL_VENV CALIBRL_CUDA_TOOLS
export CALIBRL_CUDA_INCLUDE="$nvidia_dir/include"
export CUDA_HOME="${CUDA_HOME:-$nvidia_dir}"
export LD_LIBRARY_PATH="$nvidia_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
set +euo pipefail
