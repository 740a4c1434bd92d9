#!/usr/bin/env bash
# Installs (once) the pinned CUDA 13.0 and 12.9 compiler tools from PyPI into .cuda13/ and
# .cuda12/ (so the kernels compile with both NVRTC majors on a CPU-only machine) and names the
# Python environment of the binding tests.
# Source it: `. scripts/dev-env.sh` exports CALIBRL_VENV, CALIBRL_CUDA_TOOLS,
# CALIBRL_CUDA12_TOOLS, CUDA_HOME and LD_LIBRARY_PATH (both NVRTCs on it; the library picks one,
# CALIBRL_NVRTC_MAJOR=12 forces NVRTC 12).
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
# The CUDA 12 generation (drivers 525-575): NVRTC 12.9 (the wheel cu12 PyTorch builds ship) and
# ptxas 12.9, apart from the 13.0 tools (their wheels share the nvidia/ namespace).
CALIBRL_CUDA12_TOOLS="${CALIBRL_CUDA12_TOOLS:-$root/.cuda12}"
stamp12="$CALIBRL_CUDA12_TOOLS/.calibrl-cuda12-v1"
if [ ! -f "$stamp12" ]; then
  python3 -m pip install -q --root-user-action=ignore --upgrade --target "$CALIBRL_CUDA12_TOOLS" \
    "nvidia-cuda-nvrtc-cu12==12.9.*" "nvidia-cuda-nvcc-cu12==12.9.*"
  touch "$stamp12"
fi
nvidia_dir="$CALIBRL_CUDA_TOOLS/nvidia/cu13"
export CALIBRL_VENV CALIBRL_CUDA_TOOLS CALIBRL_CUDA12_TOOLS
export CALIBRL_CUDA_INCLUDE="$nvidia_dir/include"
export CUDA_HOME="${CUDA_HOME:-$nvidia_dir}"
# ptxas of each generation, for scripts/kernel-resources.sh.
export CALIBRL_PTXAS13="$nvidia_dir/bin/ptxas"
export CALIBRL_PTXAS12="$CALIBRL_CUDA12_TOOLS/nvidia/cuda_nvcc/bin/ptxas"
export LD_LIBRARY_PATH="$nvidia_dir/lib:$CALIBRL_CUDA12_TOOLS/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
set +euo pipefail
