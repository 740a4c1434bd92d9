#!/usr/bin/env bash
# Builds (here, where cargo is) everything scripts/gpu-check.sh runs on a GPU machine without
# cargo, into .devbuild/ (git-ignored; carry it to the GPU machine):
#   .devbuild/bin/<test>      release test executables (gpu_logits, nvrtc_compile, and any other
#                             integration test named in $CALIBRL_DEVBUILD_TESTS)
#   .devbuild/lib/libcalibrl.so
# Debug info is stripped to keep the folder small.
set -euo pipefail
cd "$(dirname "$0")/.."
tests="${CALIBRL_DEVBUILD_TESTS:-gpu_logits nvrtc_compile}"
args=()
for t in $tests; do args+=(--test "$t"); done
cargo build --release --lib
json="$(cargo test --release --no-run "${args[@]}" --message-format=json)"
rm -rf .devbuild && mkdir -p .devbuild/bin .devbuild/lib
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
