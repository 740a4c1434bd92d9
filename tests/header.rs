//! The committed `include/calibrl.h` must equal what cbindgen generates from the sources.
//! Regenerate with `CALIBRL_BLESS=1 cargo test --test header`.

use std::path::PathBuf;

#[test]
fn committed_header_is_fresh() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&root)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("header is UTF-8");
    // The version macro comes from cbindgen.toml: it must name the library's constant.
    let define = format!(
        "#define CALIBRL_ABI_VERSION {}\n",
        calibrl::ffi::common::CALIBRL_ABI_VERSION
    );
    assert!(
        generated.contains(&define),
        "cbindgen.toml's CALIBRL_ABI_VERSION differs from src/ffi/common.rs"
    );
    let path = root.join("include/calibrl.h");
    if std::env::var_os("CALIBRL_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/calibrl.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/calibrl.h is stale: run `CALIBRL_BLESS=1 cargo test --test header` and commit it"
    );
}
