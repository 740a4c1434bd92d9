//! Gives the shared library a SONAME, `libcalibrl.so.<major>`, so programs linked against it
//! record the ABI-compatible name rather than the bare development symlink `libcalibrl.so`.
//! scripts/install.sh installs `libcalibrl.so.<version>` with the `.so.<major>` and `.so` links.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap();
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcalibrl.so.{major}");
    }
}
