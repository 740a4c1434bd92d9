//! CI compile check: every kernel source under `cuda/` compiles with NVRTC for compute_90 and
//! compute_80 (PTX) and for sm_90 and sm_80 (cubin, what the library loads where NVRTC is newer
//! than the driver) and defines the kernels the library launches. CI runs it with NVRTC 13 and
//! again with `CALIBRL_NVRTC_MAJOR=12` (NVRTC 12).
//!
//! Without NVRTC the test prints a notice and passes, unless `CALIBRL_REQUIRE_NVRTC=1` (set in
//! CI), where a missing NVRTC fails the run. `CALIBRL_PTX_DIR=<dir>` also writes each module's
//! PTX there (used by `scripts/kernel-resources.sh`).

use calibrl::cuda::compile::{compile_cubin, nvrtc_available, nvrtc_version};
use calibrl::cuda::nvrtc_lib::{FORCE_MAJOR_ENV, MAJORS};
use calibrl::cuda::{compile_all, SOURCES};
use std::collections::BTreeSet;

const ARCHS: [i32; 2] = [90, 80];

fn nvrtc_or_skip() -> bool {
    if nvrtc_available() {
        return true;
    }
    let required = std::env::var("CALIBRL_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let searched = calibrl::cuda::compile::nvrtc_library().unwrap_err();
    assert!(!required, "CALIBRL_REQUIRE_NVRTC=1 but {searched}");
    println!("skipped: NVRTC not found (set CALIBRL_REQUIRE_NVRTC=1 to make this an error)");
    false
}

#[test]
fn every_cuda_source_is_registered() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda");
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .expect("cuda/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .map(|n| n.trim_end_matches(".cu").to_string())
        .collect();
    let registered: BTreeSet<String> = SOURCES.iter().map(|s| s.name.to_string()).collect();
    assert_eq!(
        on_disk, registered,
        "cuda/*.cu files and calibrl::cuda::SOURCES differ"
    );
    for src in SOURCES {
        let file = std::fs::read_to_string(format!("{dir}/{}.cu", src.name)).unwrap();
        assert_eq!(
            file, src.source,
            "{}.cu differs from the embedded source (rebuild)",
            src.name
        );
    }
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc_version().unwrap();
    println!(
        "NVRTC {major}.{minor}: {}",
        calibrl::cuda::compile::nvrtc_library().unwrap()
    );
    assert!(
        MAJORS.contains(&(major as u32)),
        "NVRTC {major}.{minor}: the kernels are checked against CUDA {MAJORS:?}"
    );
    if let Ok(forced) = std::env::var(FORCE_MAJOR_ENV) {
        assert_eq!(
            forced.trim(),
            major.to_string(),
            "{FORCE_MAJOR_ENV} was not honoured"
        );
    }
    // CI pins the NVRTCs it compiles with (13.0 and 12.9).
    if let Ok(want) = std::env::var("CALIBRL_REQUIRE_NVRTC_VERSION") {
        assert_eq!(
            format!("{major}.{minor}"),
            want,
            "CALIBRL_REQUIRE_NVRTC_VERSION: a different NVRTC was loaded (check LD_LIBRARY_PATH)"
        );
    }
    let ptx_dir = std::env::var_os("CALIBRL_PTX_DIR");
    for arch in ARCHS {
        let t = std::time::Instant::now();
        let compiled = compile_all(arch).unwrap_or_else(|e| panic!("compute_{arch}: {e}"));
        println!(
            "compute_{arch}: every module to PTX in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let (reports, modules) = (&compiled.reports, &compiled.modules);
        for src in SOURCES {
            for kernel in src.kernels {
                let r = reports
                    .iter()
                    .find(|r| r.module == src.name && r.kernel == *kernel)
                    .unwrap_or_else(|| {
                        panic!(
                            "compute_{arch}: {}.cu has no PTX entry `{kernel}`",
                            src.name
                        )
                    });
                assert!(
                    r.ptx_bytes > 200,
                    "compute_{arch}: `{kernel}` PTX is suspiciously small"
                );
                println!(
                    "compute_{arch}  {:<10} {:<36} {:>8} bytes of PTX",
                    r.module, r.kernel, r.ptx_bytes
                );
            }
        }
        if let Some(dir) = &ptx_dir {
            std::fs::create_dir_all(dir).unwrap();
            for (name, ptx) in modules {
                let path = std::path::Path::new(dir).join(format!("{name}.compute_{arch}.ptx"));
                std::fs::write(&path, ptx).unwrap();
                println!("wrote {}", path.display());
            }
        }
    }
}

#[test]
fn every_kernel_compiles_to_a_cubin() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc_version().unwrap();
    for arch in ARCHS {
        for src in SOURCES {
            // compile_cubin also checks the ELF header and every kernel's symbol.
            let t = std::time::Instant::now();
            let cubin = compile_cubin(src, arch)
                .unwrap_or_else(|e| panic!("NVRTC {major}.{minor}, sm_{arch}: {e}"));
            println!(
                "NVRTC {major}.{minor} sm_{arch}  {:<10} {:>8} bytes of cubin in {:.1} s",
                src.name,
                cubin.len(),
                t.elapsed().as_secs_f64()
            );
        }
    }
}
