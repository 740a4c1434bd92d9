#!/usr/bin/env bash
# Fuzz smoke run: builds every cargo-fuzz target of fuzz/ (AddressSanitizer, debug assertions,
# so overflow and unsafe preconditions are checked too) and runs each one for
# CALIBRL_FUZZ_SECONDS (default 20) from the committed seeds in fuzz/seeds/<target>.
# Any invariant violation, sanitizer report, crash or leak fails the run.
#
# cargo-fuzz needs nightly-only flags (-Zsanitizer); the stable toolchain of a fresh machine
# takes them with RUSTC_BOOTSTRAP=1. The cargo-fuzz binary is installed once, pinned, outside
# the checkout (like the Python venv). Usage: scripts/fuzz-smoke.sh [target...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"
CARGO_FUZZ_VERSION=0.13.1
fuzz_root="${CALIBRL_CARGO_FUZZ_ROOT:-$HOME/.cache/calibrl/cargo-fuzz}"
seconds="${CALIBRL_FUZZ_SECONDS:-20}"
export RUSTC_BOOTSTRAP=1
export PATH="$fuzz_root/bin:$PATH"
if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION into $fuzz_root"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$fuzz_root"
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build -O -a
status=0
for t in "${targets[@]}"; do
  echo "=== fuzz $t for ${seconds}s"
  mkdir -p "corpus/$t"
  rm -rf "artifacts/$t"
  log="$(mktemp)"
  if cargo fuzz run -O -a "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 -timeout=20 \
      -print_final_stats=1 >"$log" 2>&1; then
    grep -E "^stat::number_of_executed_units|^Done" "$log" || true
  else
    echo "=== fuzz $t: FAILED"; tail -60 "$log"; ls "artifacts/$t" 2>/dev/null || true
    status=1
  fi
  rm -f "$log"
done
[ $status -eq 0 ] && echo "=== fuzz smoke: ${#targets[@]} targets clean"
exit $status
