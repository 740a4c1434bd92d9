#!/usr/bin/env bash
# Registers, spills and shared memory of every kernel, from `ptxas -v` on the PTX that NVRTC
# generates at run time. Needs ptxas (CUDA toolkit); without it, says so and exits 0.
# `CALIBRL_PTXAS=<path>` picks the ptxas; with `CALIBRL_NVRTC_MAJOR=12` the PTX comes from NVRTC
# 12 (CI runs both: NVRTC 13.0 with ptxas 13.0, NVRTC 12.9 with ptxas 12.9).
#
# PTX comes from $CALIBRL_PTX_DIR if it already holds *.ptx, else from the nvrtc_compile test
# (.devbuild/bin/nvrtc_compile, or `cargo test --test nvrtc_compile` where cargo exists).
# Architectures: $CALIBRL_SM (e.g. "90"), else the visible GPU's, else 90 and 80.
set -uo pipefail
cd "$(dirname "$0")/.."
devbuild="${CALIBRL_DEVBUILD:-.devbuild}"
ptx_dir="${CALIBRL_PTX_DIR:-${TMPDIR:-/tmp}/calibrl-ptx}"

ptxas_bin="${CALIBRL_PTXAS:-$(command -v ptxas || true)}"
for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0; do
  [[ -z "$ptxas_bin" && -n "$d" && -x "$d/bin/ptxas" ]] && ptxas_bin="$d/bin/ptxas"
done
if [[ -z "$ptxas_bin" ]]; then
  echo "kernel-resources: ptxas not found (install the CUDA toolkit or set CUDA_HOME); skipped"
  exit 0
fi

if ! ls "$ptx_dir"/*.ptx >/dev/null 2>&1; then
  mkdir -p "$ptx_dir"
  if [[ -x "$devbuild/bin/nvrtc_compile" ]]; then
    CALIBRL_REQUIRE_NVRTC=1 CALIBRL_PTX_DIR="$ptx_dir" "$devbuild/bin/nvrtc_compile" --test-threads=1 --exact every_kernel_compiles_with_nvrtc >/dev/null || exit 1
  elif command -v cargo >/dev/null; then
    CALIBRL_REQUIRE_NVRTC=1 CALIBRL_PTX_DIR="$ptx_dir" cargo test -q --release --test nvrtc_compile -- --exact every_kernel_compiles_with_nvrtc >/dev/null || exit 1
  else
    echo "kernel-resources: no PTX in $ptx_dir, no $devbuild/bin/nvrtc_compile and no cargo"; exit 1
  fi
fi

archs="${CALIBRL_SM:-}"
if [[ -z "$archs" ]] && command -v nvidia-smi >/dev/null; then
  archs="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')"
fi
archs="${archs:-90 80}"

status=0
echo "ptxas: $("$ptxas_bin" --version | tail -1)"
echo "PTX: $(grep -h -m1 '^// Cuda compilation tools' "$ptx_dir"/*.ptx | head -1 | sed 's|^// ||') ($(grep -h -m1 '^.version' "$ptx_dir"/*.ptx | head -1))"
printf '%-8s %-34s %5s %7s %7s %6s %6s\n' sm kernel regs spillST spillLD stack smem
for sm in $archs; do
  # The PTX compiled for the nearest architecture at or below the device's.
  ptx_arch=""
  for a in $sm 90 80; do
    [[ $a -le $sm && -f "$ptx_dir/logits.compute_$a.ptx" ]] && { ptx_arch=$a; break; }
  done
  for f in "$ptx_dir"/*.compute_"${ptx_arch:-90}".ptx; do
    ptx="$f"
    if ! out="$("$ptxas_bin" -v --gpu-name "sm_$sm" "$ptx" -o /dev/null 2>&1)"; then
      echo "$out"; status=1; continue
    fi
    echo "$out" | awk -v sm="sm_$sm" '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); k = substr($0, RSTART+1, RLENGTH-2) }
      /bytes stack frame/ { st = $1; ss = $5; sl = $9 }
      /Used [0-9]+ registers/ {
        r = $0; sub(/.*Used /, "", r); sub(/ registers.*/, "", r)
        sm_b = 0; if (match($0, /[0-9]+ bytes smem/)) { sm_b = substr($0, RSTART, RLENGTH); sub(/ bytes smem/, "", sm_b) }
        printf "%-8s %-34s %5s %7s %7s %6s %6s\n", sm, k, r, ss, sl, st, sm_b
      }'
  done
done
exit $status
