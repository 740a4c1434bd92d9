"""Builds libcalibrl (the Rust crate's cdylib) with setuptools-rust and ships it in `calibrl/`.

The crate is the repository root (two levels up) in a checkout; an sdist carries a copy of it
under `rust/`, so `pip install calibrl-X.tar.gz` builds from source. The package loads the
library with ctypes (no CPython API), so the wheel is tagged `py3-none-<platform>`.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.sdist import sdist
from setuptools_rust import Binding, RustExtension, Strip
from setuptools_rust.build import build_rust

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# What the crate needs to build (Cargo.toml's package, build.rs, sources, kernels).
CRATE_FILES = ["Cargo.toml", "Cargo.lock", "build.rs", "cbindgen.toml", "src", "cuda", "include"]


def crate_manifest() -> str:
    """Cargo.toml of the crate, relative to this directory (setuptools wants relative paths)."""
    for manifest in (HERE / "rust" / "Cargo.toml", REPO / "Cargo.toml"):
        if manifest.exists():
            return os.path.relpath(manifest, HERE)
    raise SystemExit(f"calibrl: no Cargo.toml in {HERE / 'rust'} (sdist) or {REPO} (checkout)")


class SdistWithCrate(sdist):
    """Copies the Rust crate into the sdist as `rust/` (the checkout keeps it at the root)."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        src = HERE / "rust" if (HERE / "rust" / "Cargo.toml").exists() else REPO
        for name in CRATE_FILES:
            path = src / name
            dest = Path(base_dir) / "rust" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, dest)
            elif path.exists():
                shutil.copy2(path, dest)


class BuildLibrary(build_rust):
    """Installs the cdylib as `calibrl/libcalibrl.so` (no CPython suffix: nothing CPython-specific)."""

    def get_dylib_ext_path(self, ext, target_fname):
        path = super().get_dylib_ext_path(ext, target_fname)
        return os.path.join(os.path.dirname(path), "libcalibrl.so")


class PurePythonAbiWheel(bdist_wheel):
    """A ctypes package: any Python 3, no CPython ABI, but one platform (the native library)."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    rust_extensions=[
        RustExtension(
            "calibrl.libcalibrl",
            path=crate_manifest(),
            binding=Binding.NoBinding,
            strip=Strip.Debug,
            py_limited_api=False,
        )
    ],
    cmdclass={"sdist": SdistWithCrate, "build_rust": BuildLibrary, "bdist_wheel": PurePythonAbiWheel},
    zip_safe=False,
)
