#!/usr/bin/env bash
# Builds (here, where cargo is) everything scripts/gpu-check.sh runs on a GPU machine without
# cargo, into .devbuild/ (git-ignored; carry it to the GPU machine):
#   .devbuild/bin/<test>      release test executables: every tests/gpu_*.rs and nvrtc_compile
#                             (or the integration tests named in $CALIBRL_DEVBUILD_TESTS)
#   .devbuild/lib/libcalibrl.so
#   .devbuild/COMMIT          the commit built (and whether the tree was dirty), for the GPU log
# Debug info is stripped to keep the folder small.
set -euo pipefail
cd "$(dirname "$0")/.."
default_tests="nvrtc_compile $(cd tests && ls gpu_*.rs 2>/dev/null | sed 's/\.rs$//' | tr '\n' ' ')"
tests="${CALIBRL_DEVBUILD_TESTS:-$default_tests}"
args=()
for t in $tests; do args+=(--test "$t"); done
cargo build --release --lib
json="$(cargo test --release --no-run "${args[@]}" --message-format=json)"
rm -rf .devbuild && mkdir -p .devbuild/bin .devbuild/lib
dirty=""
[[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] && dirty=" (dirty: uncommitted changes to tracked files)"
echo "$(git rev-parse HEAD 2>/dev/null || echo unknown)$dirty" >.devbuild/COMMIT
python3 - "$json" <<'PY'
import json, shutil, subprocess, sys, os
for line in sys.argv[1].splitlines():
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    exe = msg.get("executable")
    if msg.get("reason") == "compiler-artifact" and exe and msg["target"]["kind"] == ["test"]:
        dst = os.path.join(".devbuild/bin", msg["target"]["name"])
        shutil.copy2(exe, dst)
        subprocess.run(["strip", "--strip-debug", dst], check=False)
        print(f"{dst} ({os.path.getsize(dst) >> 20} MiB)")
PY
cp target/release/libcalibrl.so .devbuild/lib/
strip --strip-debug .devbuild/lib/libcalibrl.so || true
du -sh .devbuild
