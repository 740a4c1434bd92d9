"""Builds libcalibrl.so with cargo and ships it inside the `calibrl` package.

`pip install ./bindings/python` runs `cargo build --release` at the repository root (two levels
up) and copies target/release/libcalibrl.so next to calibrl/__init__.py, so nobody copies a
shared library by hand. Environment:
  CARGO             the cargo executable (default: `cargo` on PATH)
  CARGO_TARGET_DIR  cargo's target directory (default: <repo>/target)
  CALIBRL_PREBUILT  path of an already built libcalibrl.so to package instead of building
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LIB = "libcalibrl.so"


def build_library() -> Path:
    prebuilt = os.environ.get("CALIBRL_PREBUILT")
    if prebuilt:
        return Path(prebuilt)
    if not (REPO / "Cargo.toml").exists():
        raise SystemExit(
            f"calibrl: no Cargo.toml at {REPO}; build from a checkout of the repository "
            f"(pip install ./bindings/python) or set CALIBRL_PREBUILT"
        )
    cargo = os.environ.get("CARGO", "cargo")
    cmd = [cargo, "build", "--release", "--lib", "--manifest-path", str(REPO / "Cargo.toml")]
    print("calibrl: running", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "release" / LIB


class BuildPyWithLibrary(build_py):
    def run(self):
        lib = build_library()
        if not lib.exists():
            raise SystemExit(f"calibrl: {lib} was not produced by the build")
        # In the source tree (used by editable installs) and in the build directory (wheels).
        shutil.copy2(lib, HERE / "calibrl" / LIB)
        super().run()
        dest = Path(self.build_lib) / "calibrl"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest / LIB)


class BinaryDistribution(Distribution):
    """The wheel holds a native library: tag it for the platform, not `py3-none-any`."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithLibrary}, distclass=BinaryDistribution)
