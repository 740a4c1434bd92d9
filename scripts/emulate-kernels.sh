#!/usr/bin/env bash
# Runs the host-side emulation of cuda/logits.cu (tests/emulate/logits_emulate.cpp): a CPU-only
# check of the kernels' indexing and numerics. Needs g++ >= 12 (C++20, _Float16).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${TMPDIR:-/tmp}/calibrl-logits-emulate"
g++ -std=c++20 -O1 -ffp-contract=off -Wall -Wno-unused-function -Wno-unknown-pragmas -pthread tests/emulate/logits_emulate.cpp -o "$out"
"$out"
