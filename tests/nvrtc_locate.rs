//! NVRTC is found without environment variables: the `nvidia-cuda-nvrtc` wheel beside the
//! library (site-packages/nvidia/cu13/lib for 13, site-packages/nvidia/cuda_nvrtc/lib for the
//! cu12 wheel), then the CUDA toolkit, then the system; when none is found, the error names
//! every place searched.

use calibrl::cuda::culib::open_first;
use calibrl::cuda::nvrtc_lib::{select, NVRTC};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The directories searched for NVRTC `major` from a library in
/// `/venv/lib/site-packages/calibrl`, with only `var` set to `value`.
fn search_dirs(major: u32, var: &'static str, value: &'static str) -> Vec<Option<PathBuf>> {
    let env = |k: &str| (k == var).then(|| value.into());
    NVRTC.search_dirs(
        major,
        Some(Path::new("/venv/lib/site-packages/calibrl")),
        &env,
    )
}

#[test]
fn search_order_is_wheel_then_toolkit_then_system() {
    // (major, the toolkit variable set, its value, the directories in order; the system's
    // default search, None, comes last). The cu12 wheel's directory is nvidia/cuda_nvrtc.
    let cases: [(u32, &str, &str, [&str; 8]); 2] = [
        (
            13,
            "CUDA_HOME",
            "/opt/cu13",
            [
                "/venv/lib/site-packages/nvidia/cu13/lib",
                "/venv/lib/nvidia/cu13/lib",
                "/opt/cu13/lib64",
                "/opt/cu13/lib",
                "/usr/local/cuda-13/lib64",
                "/usr/local/cuda-13/lib",
                "/usr/local/cuda/lib64",
                "/usr/local/cuda/lib",
            ],
        ),
        (
            12,
            "CUDA_PATH",
            "/opt/cuda-12.9",
            [
                "/venv/lib/site-packages/nvidia/cuda_nvrtc/lib",
                "/venv/lib/nvidia/cuda_nvrtc/lib",
                "/opt/cuda-12.9/lib64",
                "/opt/cuda-12.9/lib",
                "/usr/local/cuda-12/lib64",
                "/usr/local/cuda-12/lib",
                "/usr/local/cuda/lib64",
                "/usr/local/cuda/lib",
            ],
        ),
    ];
    for (major, var, value, want) in cases {
        let want: Vec<Option<PathBuf>> = want
            .iter()
            .map(|d| Some(PathBuf::from(d)))
            .chain([None])
            .collect();
        assert_eq!(search_dirs(major, var, value), want, "NVRTC {major}");
        assert_eq!(NVRTC.soname(major), format!("libnvrtc.so.{major}"));
    }
}

#[test]
fn missing_nvrtc_names_every_place_searched() {
    let mut searched = Vec::new();
    for major in [13, 12] {
        let dirs = [
            Some(PathBuf::from(format!(
                "/nonexistent/site-packages/nvidia/cu{major}/lib"
            ))),
            Some(PathBuf::from("/nonexistent/cuda/lib64")),
        ];
        let tried = open_first(&NVRTC.soname(major), &dirs).unwrap_err();
        for d in dirs.iter().flatten() {
            let path = d.join(NVRTC.soname(major)).display().to_string();
            assert!(tried.contains(&path), "{path} not in {tried:?}");
        }
        searched.extend(tried);
    }
    assert_eq!(searched.len(), 4);
    let err = select(None, &[], None, &searched).unwrap_err();
    for s in &searched {
        assert!(err.contains(s.as_str()), "{s} not in: {err}");
    }
    assert!(
        err.contains("calibrl[cuda13]") && err.contains("calibrl[cuda12]"),
        "{err}"
    );
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

/// The wheels' library directories under `$CALIBRL_CUDA_TOOLS` (13) and
/// `$CALIBRL_CUDA12_TOOLS` (12), where scripts/dev-env.sh installs them.
fn wheel_lib(tools_env: &str, wheel_dir: &str, soname: &str) -> Option<PathBuf> {
    let tools = std::env::var(tools_env).ok().filter(|t| !t.is_empty())?;
    let lib = Path::new(&tools).join(wheel_dir);
    lib.join(soname).exists().then_some(lib)
}

/// Lays out `site/calibrl/<this test program>` beside `site/nvidia/cu13/lib` and
/// `site/nvidia/cuda_nvrtc/lib` (the wheels' files) and runs the program there with no
/// LD_LIBRARY_PATH, CUDA_HOME or CUDA_PATH: NVRTC 13 by default (no driver here), NVRTC 12 with
/// `CALIBRL_NVRTC_MAJOR=12`.
#[test]
fn finds_the_wheels_beside_the_library() {
    let wheels = [
        (13, "nvidia/cu13/lib", "CALIBRL_CUDA_TOOLS"),
        (12, "nvidia/cuda_nvrtc/lib", "CALIBRL_CUDA12_TOOLS"),
    ];
    let libs: Vec<Option<PathBuf>> = wheels
        .iter()
        .map(|&(major, dir, env)| wheel_lib(env, dir, &NVRTC.soname(major)))
        .collect();
    if libs.iter().any(Option::is_none) {
        let required = std::env::var("CALIBRL_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "CALIBRL_REQUIRE_NVRTC=1 but no wheels at $CALIBRL_CUDA_TOOLS and $CALIBRL_CUDA12_TOOLS"
        );
        println!("skipped: no nvidia-cuda-nvrtc wheels (scripts/dev-env.sh sets CALIBRL_CUDA_TOOLS and CALIBRL_CUDA12_TOOLS)");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let site = exe.parent().unwrap().join("nvrtc-locate/site-packages");
    let _ = std::fs::remove_dir_all(&site);
    std::fs::create_dir_all(site.join("calibrl")).unwrap();
    for (&(_, dir, _), lib) in wheels.iter().zip(&libs) {
        let link = site.join(dir);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(lib.as_ref().unwrap().canonicalize().unwrap(), &link).unwrap();
    }
    let copy = site.join("calibrl/program");
    std::fs::copy(&exe, &copy).unwrap();
    for (&(major, dir, _), force) in wheels.iter().zip([None, Some("12")]) {
        let mut cmd = Command::new(&copy);
        cmd.args(["child_reports_nvrtc", "--exact", "--ignored", "--nocapture"])
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("CUDA_HOME")
            .env_remove("CUDA_PATH")
            .env_remove("CALIBRL_NVRTC_MAJOR");
        if let Some(m) = force {
            cmd.env("CALIBRL_NVRTC_MAJOR", m);
        }
        let out = cmd.output().unwrap();
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
        let want = site.join(dir).join(NVRTC.soname(major));
        assert_eq!(Path::new(path), want, "{stdout}");
        assert!(
            stdout.contains(&format!("nvrtc-version: {major}.")),
            "{stdout}"
        );
    }
}
