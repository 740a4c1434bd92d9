//! The shared library carries the SONAME `libcalibrl.so.<major>` (build.rs), so a program linked
//! against `libcalibrl.so` records the ABI-compatible name (scripts/install.sh installs the
//! versioned file with both symlinks).

mod common;

#[test]
fn cdylib_has_the_versioned_soname() {
    let lib = common::cdylib_path();
    let soname = common::readelf_dynamic(&lib, "Library soname");
    let want = format!("libcalibrl.so.{}", env!("CARGO_PKG_VERSION_MAJOR"));
    assert_eq!(soname, vec![want.clone()], "readelf -d {}", lib.display());
    assert_eq!(want, "libcalibrl.so.0");
}
