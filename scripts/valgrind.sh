#!/usr/bin/env bash
# Memory check of the C ABI under valgrind (zero errors required): the C test program
# (tests/c/smoke.c, built by the c_program test) and the Rust ABI tests (tests/abi.rs, which
# load libcalibrl.so as a C consumer would) plus the fuzz-regression tests (tests/robustness.rs).
# Installs valgrind on a fresh machine when it is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if ! command -v valgrind >/dev/null; then
  echo "installing valgrind"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq valgrind >/dev/null
fi
vg=(valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite
    --show-leak-kinds=definite --quiet --suppressions=scripts/valgrind.supp)

# Build the library, the C program (the c_program test compiles and runs it) and the test
# binaries, without running the other suites again.
cargo build --release --lib
cargo test --release --test c_program
exes=$(cargo test --release --test abi --test robustness --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')

echo "=== valgrind: C test program"
# The program links through the installed layout (SONAME libcalibrl.so.0) the test made.
LD_LIBRARY_PATH=target/release/c-smoke/lib "${vg[@]}" target/release/c-smoke/smoke >/dev/null
for exe in $exes; do
  echo "=== valgrind: $(basename "$exe")"
  "${vg[@]}" "$exe" --test-threads=2 -q
done
echo "=== valgrind: 0 errors"
