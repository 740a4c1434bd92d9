#!/usr/bin/env bash
# Runs the host-side emulations of the CUDA kernels, CPU-only checks of their indexing and
# numerics: tests/emulate/logits_emulate.cpp (cuda/logits.cu) and tests/emulate/loss_emulate.cpp
# (the Clip-Cov / KL-Cov kernels of cuda/loss.cu with the loss kernel, and the counts and loss
# kernels under the `authors` preset; a few minutes on two cores). Needs g++ >= 12 (C++20, _Float16).
set -euo pipefail
cd "$(dirname "$0")/.."
for name in logits loss; do
  out="${TMPDIR:-/tmp}/calibrl-$name-emulate"
  g++ -std=c++20 -O1 -ffp-contract=off -Wall -Wno-unused-function -Wno-unknown-pragmas -pthread \
    "tests/emulate/${name}_emulate.cpp" -o "$out"
  "$out"
done
