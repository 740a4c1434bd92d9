#!/usr/bin/env bash
# The project's test command (README): Rust tests (CPU backend, C ABI, header freshness, NVRTC
# compile of every kernel with NVRTC 13 and 12; the GPU tests are reported as ignored unless
# nvidia-smi lists a GPU), the host emulation of every CUDA kernel (scripts/emulate-kernels.sh:
# the GPU tests on an emulated driver),
# the Python binding tests, the C++ binding tests and the packaging check (scripts/wheel-tests.sh:
# sdist and the manylinux_2_28 release wheel installed in fresh venvs). Installs what it needs on
# first use.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
. scripts/dev-env.sh
export CALIBRL_REQUIRE_NVRTC="${CALIBRL_REQUIRE_NVRTC:-1}"
export CALIBRL_REQUIRE_NVRTC_VERSION="${CALIBRL_REQUIRE_NVRTC_VERSION:-13.0}"

failed=()
run() {
  local name="$1"; shift
  echo "=== $name: $*"
  if "$@"; then echo "=== $name: ok"; else echo "=== $name: FAILED"; failed+=("$name"); fi
}

# The GPU tests are #[ignore]d (they need a device); run them too where the driver lists a GPU.
gpu_args=()
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpu_args=(-- --include-ignored); fi
run rust cargo test --release "${gpu_args[@]}"
# Every kernel again with NVRTC 12.9 (the CUDA 12 generation; the library picks it on 12.x
# drivers), PTX and cubin.
run rust-nvrtc12 env CALIBRL_NVRTC_MAJOR=12 CALIBRL_REQUIRE_NVRTC_VERSION=12.9 \
  cargo test --release --test nvrtc_compile
# The CUDA kernels on the host (emulated driver; the GPU tests against the CPU backend).
run emulation bash scripts/emulate-kernels.sh
[ -f scripts/python-tests.sh ] && run python bash scripts/python-tests.sh
[ -f scripts/cpp-tests.sh ] && run cpp bash scripts/cpp-tests.sh
[ -f scripts/wheel-tests.sh ] && run packaging bash scripts/wheel-tests.sh

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED suites: ${failed[*]}"
  exit 1
fi
echo "all test suites passed"
