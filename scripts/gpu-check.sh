#!/usr/bin/env bash
# One-command GPU check. On a machine with an NVIDIA GPU:
#   1. NVRTC compile check (and PTX for step 4),
#   2. every prebuilt test executable in .devbuild/bin with --include-ignored (the GPU tests are
#      #[ignore]d for a plain `cargo test`; they compare with the CPU backend),
#   3. compute-sanitizer memcheck, racecheck, initcheck, synccheck over each gpu_* test executable
#      in quick mode (CALIBRL_GPU_TEST_QUICK=1; CALIBRL_SANITIZER_TIMEOUT_S per run, default 60),
#   4. registers / spills per kernel (scripts/kernel-resources.sh, needs ptxas),
#   5. the benchmarks (benchmarks/bench_loss.py, bench_logits.py), only in the time left,
# then prints a summary table last. Exit status: 0 when every step that ran passed.
# The log ($OUT/gpu-check.log, also on stdout) starts with what was tested: the commit (and
# whether the tree was dirty), the device, the driver and the NVRTC version. Steps 1-4 fit one
# device call of under 5 minutes (the default deadline, 270 s, bounds every step's timeout), so
# run it first whenever a GPU is available (docs/cuda.md).
#
# The GPU machine needs no cargo: build here with `scripts/devbuild.sh` and carry `.devbuild/`
# (or point CALIBRL_DEVBUILD at the folder). Where cargo exists and .devbuild/ is missing, this
# script runs scripts/devbuild.sh itself.
#
# Environment:
#   OUT                       results folder (default ./out): logs, PTX, bench CSV
#   CALIBRL_DEVBUILD          prebuilt folder (default .devbuild)
#   CALIBRL_CHECK_SKIP        space-separated steps to skip: tests sanitizer resources bench
#   CALIBRL_CHECK_DEADLINE_S  total seconds to aim for (default 270); each step's timeout is cut to
#                             what is left, the benchmarks get what remains after step 4
#   CALIBRL_BENCH_ARGS        extra arguments for bench_logits.py (e.g. "--sizes 16384x152064")
#   CALIBRL_NVRTC_DIR         folder holding libnvrtc.so.13 (otherwise searched)
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
t_start=$(date +%s)
out="${OUT:-$root/out}"
mkdir -p "$out"
devbuild="${CALIBRL_DEVBUILD:-$root/.devbuild}"
skip=" ${CALIBRL_CHECK_SKIP:-} "
deadline=$((t_start + ${CALIBRL_CHECK_DEADLINE_S:-270}))
summary=()
failed=0
exec > >(tee "$out/gpu-check.log") 2>&1

step() { # name status seconds note
  summary+=("$(printf '%-26s %-8s %6ss  %s' "$1" "$2" "$3" "$4")")
  [[ "$2" == FAIL ]] && failed=1
  return 0
}
skipped() { [[ "$skip" == *" $1 "* ]]; }
now() { date +%s; }
# Seconds a step may take: at most $1, and what is left before the deadline (at least 10).
left() { local l=$((deadline - $(now))); ((l > $1)) && l=$1; ((l < 10)) && l=10; echo "$l"; }

# ---- environment ---------------------------------------------------------------------------
find_nvrtc() {
  local d
  for d in "${CALIBRL_NVRTC_DIR:-}" "${CUDA_HOME:-}/lib64" /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 \
    /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -n "$d" && -e "$d/libnvrtc.so.13" ]] && { echo "$d"; return; }
  done
  python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    for p in nvidia.__path__:
        for d in sorted(glob.glob(os.path.join(p, "*", "lib"))):
            if glob.glob(os.path.join(d, "libnvrtc.so.13")):
                print(d)
                raise SystemExit
except ImportError:
    pass
PY
}
nvrtc_dir="$(find_nvrtc)"
if [[ -n "$nvrtc_dir" ]]; then
  export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0; do
  [[ -n "$d" && -d "$d/bin" ]] && export PATH="$PATH:$d/bin" && [[ -z "${CUDA_HOME:-}" ]] && export CUDA_HOME="$d"
done
# What this run tests: the commit of the tree (or, without git, the one .devbuild was built
# from), the device and driver, and the NVRTC library the kernels are compiled with.
commit_of_tree() {
  git rev-parse --is-inside-work-tree >/dev/null 2>&1 || return 1
  local dirty=""
  [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] && dirty=" (dirty: uncommitted changes to tracked files)"
  echo "$(git rev-parse HEAD)$dirty"
}
nvrtc_version() {
  [[ -n "${nvrtc_dir:-}" ]] || { echo "not found"; return; }
  python3 - "$nvrtc_dir/libnvrtc.so.13" <<'PY' 2>&1
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
major, minor = ctypes.c_int(), ctypes.c_int()
lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
print(f"{major.value}.{minor.value} ({sys.argv[1]})")
PY
}
echo "== calibrl GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
echo "commit:  $(commit_of_tree || echo "unknown here (no git)")"
[[ -f "$devbuild/COMMIT" ]] && echo "devbuild: built from $(cat "$devbuild/COMMIT")"
echo "device:  $(nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader 2>&1 | head -1)"
echo "driver:  $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -1)"
echo "NVRTC:   $(nvrtc_version)"
echo "== environment"
echo "NVRTC dir: ${nvrtc_dir:-not found (GPU calls will report CUDA_UNAVAILABLE)}"
echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not found')"
echo "ptxas: $(command -v ptxas || echo 'not found')"

if [[ ! -d "$devbuild/bin" ]]; then
  if command -v cargo >/dev/null; then
    echo "== building $devbuild (scripts/devbuild.sh)"
    t=$(now)
    if CALIBRL_DEVBUILD="$devbuild" scripts/devbuild.sh >"$out/devbuild.log" 2>&1; then
      step build ok $(($(now) - t)) "$devbuild"
    else
      tail -30 "$out/devbuild.log"; step build FAIL $(($(now) - t)) "see $out/devbuild.log"
    fi
  else
    echo "no $devbuild/bin and no cargo: build with scripts/devbuild.sh and carry .devbuild/"; exit 2
  fi
fi

# ---- 1. NVRTC compile check ----------------------------------------------------------------
echo "== NVRTC compile check"
t=$(now)
if [[ -x "$devbuild/bin/nvrtc_compile" ]]; then
  if CALIBRL_REQUIRE_NVRTC=1 CALIBRL_PTX_DIR="$out/ptx" "$devbuild/bin/nvrtc_compile" --test-threads=1 --nocapture \
    >"$out/nvrtc_compile.log" 2>&1; then
    step nvrtc-compile ok $(($(now) - t)) "PTX in $out/ptx"
  else
    tail -30 "$out/nvrtc_compile.log"; step nvrtc-compile FAIL $(($(now) - t)) "see $out/nvrtc_compile.log"
  fi
else
  step nvrtc-compile FAIL 0 "$devbuild/bin/nvrtc_compile missing"
fi

# ---- 2. test executables -------------------------------------------------------------------
if ! skipped tests; then
  for bin in "$devbuild"/bin/*; do
    name="$(basename "$bin")"
    [[ -x "$bin" && "$name" != nvrtc_compile ]] || continue
    echo "== tests: $name"
    t=$(now)
    if timeout "$(left 150)" "$bin" --include-ignored --test-threads=1 --nocapture >"$out/test_$name.log" 2>&1; then
      note="$(grep -E '^test result' "$out/test_$name.log" | tail -1 | cut -c1-60)"
      if grep -q "skipped: no CUDA device" "$out/test_$name.log"; then
        # On a machine whose driver lists a GPU, a skipped GPU test is a failure.
        if nvidia-smi -L >/dev/null 2>&1; then
          step "test $name" FAIL $(($(now) - t)) "GPU tests skipped although nvidia-smi lists a GPU"
          continue
        fi
        note="NO GPU SEEN: $note"
      fi
      step "test $name" ok $(($(now) - t)) "$note"
    else
      grep -E "panicked|FAILED|failed|error" "$out/test_$name.log" | head -20
      step "test $name" FAIL $(($(now) - t)) "see $out/test_$name.log"
    fi
  done
else
  step tests skipped 0 ""
fi

# ---- 2b. the Python binding on CUDA (PyTorch end to end) -----------------------------------
if ! skipped tests; then
  echo "== tests: Python binding (CUDA)"
  t=$(now)
  if (cd bindings/python && PYTHONPATH="$PWD" CALIBRL_LIBRARY="$devbuild/lib/libcalibrl.so" \
      timeout "$(left 120)" python3 -m pytest -q -p no:cacheprovider tests/ >"$out/test_python.log" 2>&1); then
    step "test python" ok $(($(now) - t)) "$(tail -1 "$out/test_python.log" | cut -c1-60)"
  else
    tail -30 "$out/test_python.log"
    step "test python" FAIL $(($(now) - t)) "$(tail -1 "$out/test_python.log" | cut -c1-60)"
  fi
fi

# ---- 3. compute-sanitizer ------------------------------------------------------------------
if ! skipped sanitizer; then
  gpu_bins=("$devbuild"/bin/gpu_*)
  if command -v compute-sanitizer >/dev/null && [[ -x "${gpu_bins[0]}" ]]; then
    for tool in memcheck racecheck initcheck synccheck; do
      for bin in "${gpu_bins[@]}"; do
        name="$(basename "$bin")"
        if (($(now) >= deadline)); then
          step "$tool $name" skipped 0 "deadline reached (CALIBRL_CHECK_DEADLINE_S)"
          continue
        fi
        echo "== compute-sanitizer --tool $tool $name (quick mode)"
        t=$(now)
        extra=()
        [[ $tool == memcheck ]] && extra=(--leak-check no)
        log="$out/sanitizer_${tool}_$name.log"
        if CALIBRL_GPU_TEST_QUICK=1 timeout "$(left "${CALIBRL_SANITIZER_TIMEOUT_S:-60}")" compute-sanitizer --tool "$tool" \
          "${extra[@]}" --error-exitcode 86 --print-limit 20 "$bin" --include-ignored --test-threads=1 >"$log" 2>&1; then
          step "$tool $name" ok $(($(now) - t)) "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
        else
          grep -E "=========|panicked" "$log" | head -25
          step "$tool $name" FAIL $(($(now) - t)) "see $log (timeout: exit 124)"
        fi
      done
    done
  else
    step sanitizer skipped 0 "compute-sanitizer or gpu_* test binaries not found"
  fi
else
  step sanitizer skipped 0 ""
fi

# ---- 4. kernel resources -------------------------------------------------------------------
if ! skipped resources; then
  echo "== kernel resources"
  t=$(now)
  if CALIBRL_PTX_DIR="$out/ptx" CALIBRL_DEVBUILD="$devbuild" scripts/kernel-resources.sh | tee "$out/kernel_resources.txt"; then
    spills="$(awk 'NR>2 && ($4>0 || $5>0) {print $2"@"$1}' "$out/kernel_resources.txt" | tr '\n' ' ')"
    step kernel-resources ok $(($(now) - t)) "${spills:+spills: $spills}"
  else
    step kernel-resources FAIL $(($(now) - t)) "see output above"
  fi
else
  step kernel-resources skipped 0 ""
fi

# ---- 5. benchmarks -------------------------------------------------------------------------
if ! skipped bench; then
  if [[ $((deadline - $(now))) -lt 40 ]]; then
    step bench-loss skipped 0 "no time left (CALIBRL_CHECK_DEADLINE_S)"
  else
    echo "== benchmark: the loss on log-prob inputs"
    t=$(now)
    if PYTHONPATH="bindings/python" CALIBRL_LIBRARY="$devbuild/lib/libcalibrl.so" timeout "$(left 200)" \
        python3 benchmarks/bench_loss.py --out "$out/bench_loss.csv" 2>&1 | tee "$out/bench_loss.log"; then
      step bench-loss ok $(($(now) - t)) "$out/bench_loss.csv"
    else
      step bench-loss FAIL $(($(now) - t)) "see $out/bench_loss.log"
    fi
  fi
  budget=$((deadline - $(now) - 60))
  if [[ $budget -lt 30 ]]; then
    step bench skipped 0 "no time left (CALIBRL_CHECK_DEADLINE_S)"
  else
    echo "== benchmark (budget ${budget}s)"
    t=$(now)
    # shellcheck disable=SC2086
    if timeout $((budget + 90)) python3 benchmarks/bench_logits.py --lib "$devbuild/lib/libcalibrl.so" \
      --out "$out/bench_logits.csv" --budget-s "$budget" ${CALIBRL_BENCH_ARGS:-} 2>&1 | tee "$out/bench_logits.log"; then
      step bench ok $(($(now) - t)) "$out/bench_logits.csv"
    else
      step bench FAIL $(($(now) - t)) "see $out/bench_logits.log"
    fi
  fi
else
  step bench skipped 0 ""
fi

# ---- summary -------------------------------------------------------------------------------
echo
echo "================ calibrl GPU check summary ($(($(now) - t_start))s) ================"
if [[ -f "$out/bench_loss.log" ]]; then
  sed -n '/^ *tokens method/,$p' "$out/bench_loss.log"
  echo
fi
if [[ -f "$out/bench_logits.log" ]]; then
  sed -n '/^copy bandwidth/,$p' "$out/bench_logits.log"
  echo
fi
printf '%-26s %-8s %7s  %s\n' step status time note
printf '%s\n' "${summary[@]}"
exit $failed
