#!/usr/bin/env bash
# Tests of the C++ binding (bindings/cpp), run by .ci/run on a fresh machine:
#   - uses cmake (and ninja, torch) from the test venv (scripts/venv.sh: pinned, from PyPI, in
#     $CALIBRL_VENV; nothing is installed on the system), and the system's pkg-config and C++
#     compiler (it says so and fails when they are missing);
#   - builds libcalibrl (cargo build --release) and installs it with scripts/install.sh into a
#     temporary prefix;
#   - checks that calibrl.hpp and each of its parts (calibrl/*.hpp) compile on their own, and
#     calibrl.hpp twice, after a dlpack.h and as C++20 (spans);
#     that calibrl.h compiles as C;
#   - builds the tests and the train_step example with CMake through find_package(calibrl)
#     against the installed package, runs them, and compares the example's loss with the value
#     the test program computes through an independent path;
#   - compiles, links and runs a program with `pkg-config --cflags --libs calibrl`;
#   - builds and runs the README's C++ program and checks its loss against the README's C program;
#   - builds and runs the libtorch extension example with the venv's python and torch (or the
#     interpreter in $CALIBRL_TORCH_PYTHON).
# Ends with "N passed, M failed[, K skipped]" and exits non-zero when anything failed.
#
# Usage: scripts/cpp-tests.sh [--keep]      (--keep: leave the temporary directory)
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
keep=0
[[ "${1:-}" == "--keep" ]] && keep=1
work="$(mktemp -d "${TMPDIR:-/tmp}/calibrl-cpp-tests.XXXXXX")"
if [[ $keep -eq 0 ]]; then trap 'rm -rf "$work"' EXIT; else echo "work dir: $work"; fi
prefix="$work/prefix"
jobs="$(nproc 2>/dev/null || echo 2)"

passed=0 failed=0 skipped=0
pass() { passed=$((passed + 1)); echo "PASS: $1"; }
fail() { failed=$((failed + 1)); echo "FAIL: $1"; [[ -n "${2:-}" && -f "$2" ]] && tail -n 40 "$2" | sed 's/^/    /'; }
skip() { skipped=$((skipped + 1)); echo "SKIP: $1"; }
finish() { echo "$passed passed, $failed failed, $skipped skipped"; [[ $failed -eq 0 ]]; exit $?; }

# --- tools -----------------------------------------------------------------------------------
# cmake, ninja and torch come from the pinned test venv (created on first use).
export CALIBRL_VENV="${CALIBRL_VENV:-$root/.venv}"
if ! bash "$root/scripts/venv.sh" >"$work/venv.log" 2>&1; then
  fail "the test venv ($CALIBRL_VENV) is set up by scripts/venv.sh" "$work/venv.log"; finish
fi
export PATH="$CALIBRL_VENV/bin:$PATH"
for tool in cmake pkg-config c++ cargo readelf; do
  if ! command -v "$tool" >/dev/null; then
    fail "tool $tool is available (pkg-config, a C++ compiler and readelf come from the system, e.g. apt-get install pkg-config g++ binutils)"
    finish
  fi
done
CXX="${CXX:-c++}"
CC="${CC:-cc}"
echo "cmake: $(cmake --version | head -n1); c++: $($CXX --version | head -n1)"

# --- build and install -----------------------------------------------------------------------
if "$root/scripts/install.sh" --prefix "$prefix" >"$work/install.log" 2>&1 &&
   [[ -f "$prefix/lib/libcalibrl.so" && -f "$prefix/lib/libcalibrl.a" &&
      -f "$prefix/include/calibrl.hpp" && -f "$prefix/lib/cmake/calibrl/calibrlConfig.cmake" &&
      -f "$prefix/lib/cmake/calibrl/calibrlConfigVersion.cmake" &&
      -f "$prefix/lib/pkgconfig/calibrl.pc" ]]; then
  pass "scripts/install.sh --prefix <tmp> installs libraries, headers, CMake config, calibrl.pc"
else
  fail "scripts/install.sh" "$work/install.log"
  finish
fi
# The SONAME: the real file, libcalibrl.so.0 -> it, libcalibrl.so -> libcalibrl.so.0.
soname_of() { readelf -d "$1" 2>/dev/null | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p'; }
needed_of() { readelf -d "$1" 2>/dev/null | sed -n 's/.*Shared library: \[\(libcalibrl[^]]*\)\].*/\1/p'; }
if [[ "$(soname_of "$prefix/lib/libcalibrl.so")" == "libcalibrl.so.0" &&
      "$(readlink "$prefix/lib/libcalibrl.so")" == "libcalibrl.so.0" &&
      "$(readlink "$prefix/lib/libcalibrl.so.0")" == libcalibrl.so.0.* &&
      ! -L "$prefix/lib/$(readlink "$prefix/lib/libcalibrl.so.0")" ]]; then
  pass "readelf -d: SONAME libcalibrl.so.0; libcalibrl.so -> libcalibrl.so.0 -> $(readlink "$prefix/lib/libcalibrl.so.0")"
else
  ls -l "$prefix/lib" >"$work/soname.log" 2>&1; readelf -d "$prefix/lib/libcalibrl.so" >>"$work/soname.log" 2>&1
  fail "installed library has SONAME libcalibrl.so.0 and versioned symlinks" "$work/soname.log"
fi
inc=(-I"$prefix/include")
warn=(-Wall -Wextra -Wpedantic -Werror)

# --- the headers compile ---------------------------------------------------------------------
syntax() {  # name, source text, extra flags...
  local name="$1" src="$2"; shift 2
  printf '%s\n' "$src" >"$work/$name.cpp"
  if "$CXX" "$@" -fsyntax-only "${inc[@]}" "$work/$name.cpp" >"$work/$name.log" 2>&1; then
    return 0
  fi
  return 1
}
syntax alone '#include <calibrl.hpp>' -std=c++17 "${warn[@]}" &&
  pass "calibrl.hpp compiles on its own (C++17, -Wall -Wextra -Wpedantic -Werror)" ||
  fail "calibrl.hpp compiles on its own" "$work/alone.log"
# Its parts (calibrl/*.hpp, installed next to it) each include what they use.
parts_ok=1 parts=0
for part in "$prefix"/include/calibrl/*.hpp; do
  parts=$((parts + 1))
  name="part_$(basename "$part" .hpp)"
  syntax "$name" "#include <calibrl/$(basename "$part")>" -std=c++17 "${warn[@]}" ||
    { parts_ok=0; fail "calibrl/$(basename "$part") compiles on its own" "$work/$name.log"; }
done
[[ $parts_ok -eq 1 && $parts -ge 8 ]] &&
  pass "the $parts installed parts calibrl/*.hpp each compile on their own" ||
  { [[ $parts -ge 8 ]] || fail "calibrl/*.hpp installed (found $parts, expected 8)"; }

syntax twice $'#include <calibrl.hpp>\n#include <calibrl.hpp>\n#include <calibrl.h>\nint main() { calibrl::TensorView v(static_cast<float*>(nullptr), {0}); return v.dl()->ndim - 1; }' \
  -std=c++17 "${warn[@]}" &&
  pass "calibrl.hpp included twice (and calibrl.h after it)" ||
  fail "calibrl.hpp included twice" "$work/twice.log"

# A stand-in for dlpack.h included first: DLDevice::device_type is an enum there.
syntax dlpack_first $'#ifndef DLPACK_EXTERN_C\n#define DLPACK_EXTERN_C extern "C"\n#include <stdint.h>\ntypedef enum { kDLCPU = 1, kDLCUDA = 2 } DLDeviceType;\ntypedef struct { DLDeviceType device_type; int32_t device_id; } DLDevice;\ntypedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;\ntypedef struct { void* data; DLDevice device; int32_t ndim; DLDataType dtype; int64_t* shape; int64_t* strides; uint64_t byte_offset; } DLTensor;\n#endif\n#include <calibrl.hpp>\nint f(float* p) { calibrl::TensorView v(p, {2}, calibrl::Device::cuda(1)); return v.dl()->device.device_type == kDLCUDA; }' \
  -std=c++17 "${warn[@]}" &&
  pass "calibrl.hpp after a dlpack.h (enum DLDeviceType)" ||
  fail "calibrl.hpp after a dlpack.h" "$work/dlpack_first.log"

syntax cxx20 $'#include <calibrl.hpp>\n#include <span>\nconst DLTensor* f(std::span<float> s, std::span<const double> c) { static calibrl::TensorView a(s), b(c); return b.read_only() ? a.dl() : nullptr; }' \
  -std=c++20 "${warn[@]}" &&
  pass "calibrl.hpp under C++20: std::span views" ||
  fail "calibrl.hpp under C++20" "$work/cxx20.log"

printf '#include <calibrl.h>\nint main(void) { return calibrl_abi_version() == CALIBRL_ABI_VERSION ? 0 : 1; }\n' >"$work/c_header.c"
if "$CC" -std=c99 -Wall -Wextra -Wpedantic -Werror -fsyntax-only "${inc[@]}" "$work/c_header.c" >"$work/c_header.log" 2>&1; then
  pass "calibrl.h compiles as C99"
else
  fail "calibrl.h compiles as C99" "$work/c_header.log"
fi

# --- CMake: tests and example through find_package ---------------------------------------------
cmake_build() {  # source dir, build dir, log
  cmake -S "$1" -B "$2" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >"$3" 2>&1 &&
    cmake --build "$2" -j "$jobs" >>"$3" 2>&1
}

ref_loss=""
if cmake_build "$root/bindings/cpp/tests" "$work/tests-build" "$work/tests-build.log"; then
  pass "bindings/cpp/tests builds with CMake via find_package(calibrl)"
  if [[ "$(needed_of "$work/tests-build/test_calibrl")" == "libcalibrl.so.0" ]]; then
    pass "test_calibrl (find_package(calibrl)) links through the SONAME: NEEDED libcalibrl.so.0"
  else
    fail "test_calibrl records NEEDED libcalibrl.so.0 (got '$(needed_of "$work/tests-build/test_calibrl")')"
  fi
  if "$work/tests-build/test_calibrl" --train-step-reference >"$work/test_calibrl.log" 2>&1; then
    pass "test_calibrl: $(grep '^checks:' "$work/test_calibrl.log")"
  else
    fail "test_calibrl" "$work/test_calibrl.log"
  fi
  ref_loss="$(sed -n 's/^train_step reference loss = //p' "$work/test_calibrl.log")"
else
  fail "bindings/cpp/tests builds with CMake via find_package(calibrl)" "$work/tests-build.log"
fi

# Compares the "loss = X" line of an example's output with the reference (relative 1e-5).
loss_matches() {
  local got
  got="$(sed -n 's/^loss = //p' "$1")"
  [[ -n "$got" && -n "$ref_loss" ]] || return 1
  awk -v a="$got" -v b="$ref_loss" 'BEGIN {
    if (a != a + 0 || a ~ /nan|inf/) exit 1
    d = a - b; if (d < 0) d = -d; m = b < 0 ? -b : b
    exit (d <= 1e-5 * (1 + m)) ? 0 : 1 }'
}

if cmake_build "$root/bindings/cpp/examples" "$work/examples-build" "$work/examples-build.log"; then
  pass "bindings/cpp/examples builds with CMake via find_package(calibrl) (shared and static)"
  for exe in train_step train_step_static; do
    if "$work/examples-build/$exe" >"$work/$exe.log" 2>&1; then
      if loss_matches "$work/$exe.log"; then
        pass "$exe runs; its $(grep '^loss = ' "$work/$exe.log") matches the independent path ($ref_loss)"
      else
        fail "$exe loss matches the independent path ($ref_loss)" "$work/$exe.log"
      fi
    else
      fail "$exe runs" "$work/$exe.log"
    fi
  done
else
  fail "bindings/cpp/examples builds with CMake via find_package(calibrl)" "$work/examples-build.log"
fi

# find_package refuses an incompatible version.
mkdir -p "$work/version-check"
cat >"$work/version-check/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.16)
project(version_check LANGUAGES NONE)
find_package(calibrl 99.0 CONFIG REQUIRED)
EOF
if cmake -S "$work/version-check" -B "$work/version-check/build" -DCMAKE_PREFIX_PATH="$prefix" >"$work/version-check.log" 2>&1; then
  fail "find_package(calibrl 99.0) is refused" "$work/version-check.log"
else
  grep -q "compatible with requested version" "$work/version-check.log" &&
    grep -q "version: [0-9.]*\$" "$work/version-check.log" &&
    pass "find_package(calibrl 99.0) is refused by calibrlConfigVersion.cmake" ||
    fail "find_package(calibrl 99.0) is refused for the version" "$work/version-check.log"
fi

# --- pkg-config ------------------------------------------------------------------------------
cat >"$work/pc.cpp" <<'EOF'
#include <calibrl.hpp>
#include <cstdio>
int main() {
  calibrl::check_abi();
  const calibrl::Config cfg = calibrl::Config::preset("paper");
  const auto r = calibrl::group_advantages(cfg, {0, 1, 1, 1}, {0, 0, 0, 0}, 1);
  std::printf("%g %g %g %g\n", r.weights[0], r.weights[1], r.weights[2], r.weights[3]);
  return 0;
}
EOF
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
if flags="$(pkg-config --cflags --libs calibrl 2>"$work/pc.log")" &&
   "$CXX" -std=c++17 "$work/pc.cpp" $flags -Wl,-rpath,"$prefix/lib" -o "$work/pc" >>"$work/pc.log" 2>&1 &&
   "$work/pc" >"$work/pc.out" 2>&1 && [[ "$(cat "$work/pc.out")" == "0.75 0.25 0.25 0.25" ]] &&
   [[ "$(needed_of "$work/pc")" == "libcalibrl.so.0" ]]; then
  pass "pkg-config: '$flags' compiles, links (NEEDED libcalibrl.so.0) and runs ([0,1,1,1] -> $(cat "$work/pc.out"))"
else
  cat "$work/pc.out" >>"$work/pc.log" 2>/dev/null
  fail "pkg-config --cflags --libs calibrl builds and runs a program" "$work/pc.log"
fi

# --- the README's C++ program ------------------------------------------------------------------
# Built against the installed package and run; its loss (float32 buffers) must match the README's
# C program (float64; tests/readme_snippets.rs checks that one against the float64 reference).
readme_block() { awk -v f="$1" '$0 == "```" f {on = 1; next} on && $0 == "```" {exit} on' "$root/README.md"; }
readme_block cpp >"$work/readme.cpp"
readme_block c >"$work/readme.c"
if "$CXX" -std=c++17 "${warn[@]}" "${inc[@]}" "$work/readme.cpp" -L"$prefix/lib" -lcalibrl -Wl,-rpath,"$prefix/lib" \
     -o "$work/readme_cpp" >"$work/readme_cpp.log" 2>&1 &&
   "$CC" -std=c99 "${warn[@]}" "${inc[@]}" "$work/readme.c" -L"$prefix/lib" -lcalibrl -Wl,-rpath,"$prefix/lib" \
     -o "$work/readme_c" >>"$work/readme_cpp.log" 2>&1 &&
   "$work/readme_cpp" >"$work/readme_cpp.out" 2>>"$work/readme_cpp.log" &&
   "$work/readme_c" >"$work/readme_c.out" 2>>"$work/readme_cpp.log" &&
   awk -v a="$(awk '/^loss /{print $2; exit}' "$work/readme_cpp.out")" \
       -v b="$(awk '/^loss /{print $2; exit}' "$work/readme_c.out")" 'BEGIN {
     if (a == "" || b == "" || a != a + 0) exit 1
     d = a - b; if (d < 0) d = -d; m = b < 0 ? -b : b
     exit (d <= 1e-5 * m && m > 0) ? 0 : 1 }'; then
  pass "README C++ program builds and runs; $(head -n1 "$work/readme_cpp.out" | cut -c1-40) matches the README C program"
else
  cat "$work/readme_cpp.out" "$work/readme_c.out" >>"$work/readme_cpp.log" 2>/dev/null
  fail "README C++ program builds, runs and matches the README C program's loss" "$work/readme_cpp.log"
fi

# --- libtorch extension ----------------------------------------------------------------------
torch_py="${CALIBRL_TORCH_PYTHON:-$CALIBRL_VENV/bin/python}"
if TORCH_EXTENSIONS_DIR="$work/torch_extensions" MAX_JOBS="$jobs" \
   "$torch_py" "$root/bindings/cpp/examples/torch_extension/example.py" --prefix "$prefix" >"$work/torch.log" 2>&1; then
  pass "torch extension ($torch_py): $(grep '^python loss' "$work/torch.log")"
else
  fail "torch extension example builds with $torch_py and matches the Python loss" "$work/torch.log"
fi

finish
