#!/usr/bin/env bash
# The Python package as users get it: builds the sdist and, from it, the release wheel
# (scripts/release-wheel.sh: python -m build with setuptools-rust, linked by cargo-zigbuild
# against glibc 2.28), checks the wheel (py3-none-manylinux_2_28_x86_64 by auditwheel, no symbol
# newer than GLIBC_2.28, stripped library) and the sdist (it carries the Rust crate), installs
# each into a fresh venv (the sdist builds with plain cargo there: the developer build), runs the
# binding tests against the installed copy (never the checkout), and runs `mypy --strict` on a
# small consumer program (tests/typing/consumer.py) against the installed wheel (py.typed).
#
# The fresh venvs see the test venv's packages (torch, numpy, pytest; scripts/venv.sh) through
# a .pth file, after their own site-packages, so the calibrl imported is the one under test.
# Ends with "N passed, M failed" and exits non-zero when anything failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CALIBRL_VENV="${CALIBRL_VENV:-$root/.venv}"
# The release tools (build, auditwheel, cargo-zigbuild, ziglang); release-wheel.sh installs them.
export CALIBRL_RELEASE_VENV="${CALIBRL_RELEASE_VENV:-$CALIBRL_VENV-release}"
bash "$root/scripts/venv.sh" || exit 1
PY="$CALIBRL_VENV/bin/python"
export PATH="$CALIBRL_VENV/bin:$PATH"  # the tests' ninja and cmake
work="$(mktemp -d "${TMPDIR:-/tmp}/calibrl-wheel-tests.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# One cargo target directory for both builds (the release wheel's under x86_64-unknown-linux-gnu/,
# the sdist's plain cargo build under release/), so a later run recompiles only the crate.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/packaging"
export PIP_DISABLE_PIP_VERSION_CHECK=1
tests=(test_loss.py test_logits.py test_library.py test_errors.py test_dlpack.py test_plan.py test_compile.py)

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "PASS: $1"; }
fail() { failed=$((failed + 1)); echo "FAIL: $1"; [[ -n "${2:-}" && -f "$2" ]] && tail -n 30 "$2" | sed 's/^/    /'; }
finish() { echo "$passed passed, $failed failed"; [[ $failed -eq 0 ]]; exit $?; }

# --- build: sdist, then the release wheel from the sdist -----------------------------------------
glibc=2.28
if bash "$root/scripts/release-wheel.sh" "$work/dist" >"$work/build.log" 2>&1; then
  pass "scripts/release-wheel.sh: $(cd "$work/dist" && ls | tr '\n' ' ')"
else
  fail "scripts/release-wheel.sh (sdist, then the manylinux_${glibc/./_} wheel from it)" "$work/build.log"; finish
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
if wheel="$(ls "$work"/dist/*.whl)" &&
   [[ "$(basename "$wheel")" =~ ^calibrl-[0-9.]+-py3-none-manylinux_${glibc/./_}_x86_64\.whl$ ]]; then
  pass "auditwheel repair --plat manylinux_${glibc/./_}_x86_64: $(basename "$wheel")"
else
  fail "release-wheel.sh gives a py3-none-manylinux_${glibc/./_}_x86_64 wheel" "$work/build.log"; finish
fi
# auditwheel's own reading of the repaired wheel: the lowest tag its symbols allow.
"$CALIBRL_RELEASE_VENV/bin/auditwheel" show "$wheel" >"$work/show.log" 2>&1
shown="$(tr -s ' \n' ' ' <"$work/show.log" | grep -o 'consistent with the following platform tag: "manylinux_2_[0-9]*_x86_64"' |
  grep -o '2_[0-9]*' | tr _ .)"
if [[ -n "$shown" && "$(printf '%s\n' "$shown" "$glibc" | sort -V | tail -n 1)" == "$glibc" ]]; then
  pass "auditwheel show: consistent with manylinux_${shown/./_}_x86_64"
else
  fail "auditwheel show: consistent with manylinux_${glibc/./_}_x86_64 or lower" "$work/show.log"
fi
mkdir -p "$work/unpacked" && (cd "$work/unpacked" && "$PY" -m zipfile -e "$wheel" .)
so="$work/unpacked/calibrl/libcalibrl.so"
newest="$(objdump -T "$so" | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -n 1)"
if [[ -n "$newest" && "$(printf '%s\n' "${newest#GLIBC_}" "$glibc" | sort -V | tail -n 1)" == "$glibc" ]]; then
  pass "objdump -T calibrl/libcalibrl.so: newest symbol version $newest (at most GLIBC_$glibc)"
else
  fail "objdump -T calibrl/libcalibrl.so: no symbol version above GLIBC_$glibc (newest: ${newest:-none})"
fi
if [[ -f "$so" ]] && ! readelf -S "$so" | grep -q '\.debug_info'; then
  pass "the wheel's calibrl/libcalibrl.so is stripped of debug info ($(($(stat -c %s "$so") / 1024)) KiB)"
else
  fail "the wheel holds a stripped calibrl/libcalibrl.so"
fi
[[ -f "$work/unpacked/calibrl/py.typed" ]] && pass "the wheel has calibrl/py.typed" || fail "the wheel has calibrl/py.typed"
meta="$(cat "$work"/unpacked/calibrl-*.dist-info/METADATA)"
for extra in cuda cuda13 cuda12; do
  nvrtc_pkg=nvidia-cuda-nvrtc; [[ $extra == cuda12 ]] && nvrtc_pkg=nvidia-cuda-nvrtc-cu12
  if grep -q "^Provides-Extra: $extra\$" <<<"$meta" && grep -q "^Requires-Dist: $nvrtc_pkg[=<>!~ ].*extra == \"$extra\"" <<<"$meta"; then
    pass "the wheel declares calibrl[$extra] ($nvrtc_pkg)"
  else
    fail "the wheel declares calibrl[$extra] with $nvrtc_pkg"
  fi
done

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
