//! NVRTC is found without environment variables: the `nvidia-cuda-nvrtc` wheel beside the
//! library (site-packages/nvidia/cu13/lib), then the CUDA toolkit, then the system; when none is
//! found, the error names every place searched.

use calibrl::cuda::nvrtc_lib::{open_first, search_dirs, NVRTC_SONAME};
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn search_order_is_wheel_then_toolkit_then_system() {
    let env = |k: &str| (k == "CUDA_HOME").then(|| "/opt/cu13".into());
    let dirs = search_dirs(Some(Path::new("/venv/lib/site-packages/calibrl")), &env);
    let want: Vec<Option<PathBuf>> = [
        "/venv/lib/site-packages/nvidia/cu13/lib",
        "/venv/lib/nvidia/cu13/lib",
        "/opt/cu13/lib64",
        "/opt/cu13/lib",
        "/usr/local/cuda-13/lib64",
        "/usr/local/cuda-13/lib",
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/lib",
    ]
    .iter()
    .map(|d| Some(PathBuf::from(d)))
    .chain([None])
    .collect();
    assert_eq!(dirs, want);
}

#[test]
fn missing_nvrtc_names_every_place_searched() {
    let dirs = [
        Some(PathBuf::from("/nonexistent/site-packages/nvidia/cu13/lib")),
        Some(PathBuf::from("/nonexistent/cuda/lib64")),
    ];
    let err = open_first(&dirs).unwrap_err();
    for d in dirs.iter().flatten() {
        assert!(
            err.contains(&d.join(NVRTC_SONAME).display().to_string()),
            "{err}"
        );
    }
    assert!(err.contains("calibrl[cuda]"), "{err}");
}

/// The child half of `finds_the_wheel_beside_the_library` (run only by it).
#[test]
#[ignore]
fn child_reports_nvrtc() {
    let found = calibrl::cuda::compile::nvrtc_library().expect("NVRTC found");
    let (major, minor) = calibrl::cuda::compile::nvrtc_version().unwrap();
    println!("nvrtc-path: {found}");
    println!("nvrtc-version: {major}.{minor}");
}

/// Lays out `site/calibrl/<this test program>` and `site/nvidia/cu13/lib` (the wheel's files)
/// and runs the program there with no LD_LIBRARY_PATH, CUDA_HOME or CUDA_PATH.
#[test]
fn finds_the_wheel_beside_the_library() {
    let tools = std::env::var("CALIBRL_CUDA_TOOLS").unwrap_or_default();
    let wheel_lib = Path::new(&tools).join("nvidia/cu13/lib");
    if tools.is_empty() || !wheel_lib.join(NVRTC_SONAME).exists() {
        let required = std::env::var("CALIBRL_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "CALIBRL_REQUIRE_NVRTC=1 but no wheel at $CALIBRL_CUDA_TOOLS"
        );
        println!(
            "skipped: no nvidia-cuda-nvrtc wheel (scripts/dev-env.sh sets CALIBRL_CUDA_TOOLS)"
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let site = exe.parent().unwrap().join("nvrtc-locate/site-packages");
    let _ = std::fs::remove_dir_all(&site);
    std::fs::create_dir_all(site.join("calibrl")).unwrap();
    std::fs::create_dir_all(site.join("nvidia/cu13")).unwrap();
    std::os::unix::fs::symlink(
        wheel_lib.canonicalize().unwrap(),
        site.join("nvidia/cu13/lib"),
    )
    .unwrap();
    let copy = site.join("calibrl/program");
    std::fs::copy(&exe, &copy).unwrap();
    let out = Command::new(&copy)
        .args(["child_reports_nvrtc", "--exact", "--ignored", "--nocapture"])
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("CUDA_HOME")
        .env_remove("CUDA_PATH")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = stdout
        .lines()
        .find_map(|l| l.strip_prefix("nvrtc-path: "))
        .expect("the child printed the NVRTC it loaded");
    let want = site.join("nvidia/cu13/lib").join(NVRTC_SONAME);
    assert_eq!(Path::new(path), want, "{stdout}");
    assert!(stdout.contains("nvrtc-version: 13."), "{stdout}");
}
