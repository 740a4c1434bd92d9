//! Finding `libnvrtc.so.13` without environment variables.
//!
//! cudarc opens NVRTC by its SONAME (`dlopen("libnvrtc.so.13")`), which only searches
//! `LD_LIBRARY_PATH`, the ldconfig cache and the system directories. Every PyTorch CUDA install
//! already has NVRTC in the `nvidia-cuda-nvrtc` wheel (`site-packages/nvidia/cu13/lib`), so
//! before cudarc's first use we open the first library found, in this order:
//!
//! 1. one already loaded in the process (by PyTorch, or preloaded by the Python package);
//! 2. the wheel's directory found relative to this library: `calibrl/libcalibrl.so` sits in
//!    `site-packages`, beside `nvidia/cu13/lib`;
//! 3. the CUDA toolkit: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda-13`, `/usr/local/cuda`
//!    (their `lib64` and `lib`);
//! 4. the system's search (`LD_LIBRARY_PATH`, ldconfig, `/usr/lib`...) by name.
//!
//! The opened handle is kept for the life of the process, so cudarc's later `dlopen` by SONAME
//! returns that same library (the dynamic loader matches the SONAME of loaded objects).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The SONAME cudarc opens (CUDA 13).
pub const NVRTC_SONAME: &str = "libnvrtc.so.13";

const RTLD_NOW: c_int = 2;
const RTLD_NOLOAD: c_int = 4;

/// `dlopen(name, flags)`: whether it returned a handle (kept open for the process' life).
fn dl_open(name: &CStr, flags: c_int) -> bool {
    // Declared here, not at module level, so cbindgen leaves them out of calibrl.h.
    extern "C" {
        fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    }
    // SAFETY: a NUL-terminated name; opening NVRTC runs only its initializers.
    !unsafe { dlopen(name.as_ptr(), flags) }.is_null()
}

/// Where NVRTC was found, or the message naming everything that was searched (once per process).
pub fn locate() -> Result<&'static str, &'static str> {
    static FOUND: OnceLock<Result<String, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(path) = already_loaded() {
                return Ok(path);
            }
            let dirs = search_dirs(own_dir().as_deref(), &|k| std::env::var_os(k));
            open_first(&dirs).map(|p| p.display().to_string())
        })
        .as_ref()
        .map(|s| s.as_str())
        .map_err(|s| s.as_str())
}

fn already_loaded() -> Option<String> {
    // RTLD_NOLOAD only succeeds when the library is already loaded.
    let name = CString::new(NVRTC_SONAME).unwrap();
    dl_open(&name, RTLD_NOW | RTLD_NOLOAD).then(|| format!("{NVRTC_SONAME} (already loaded)"))
}

/// The directory of the file this code was loaded from (`libcalibrl.so`, or an executable that
/// links the rlib).
fn own_dir() -> Option<PathBuf> {
    // glibc's Dl_info and dladdr, declared here so cbindgen leaves them out of calibrl.h.
    #[repr(C)]
    struct DlInfo {
        dli_fname: *const c_char,
        dli_fbase: *mut c_void,
        dli_sname: *const c_char,
        dli_saddr: *mut c_void,
    }
    extern "C" {
        fn dladdr(addr: *const c_void, info: *mut DlInfo) -> c_int;
    }
    let mut info = DlInfo {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: any address inside this object works; `info` is a valid out-pointer.
    let ok = unsafe { dladdr(own_dir as *const c_void, &mut info) };
    let from_dladdr = (ok != 0 && !info.dli_fname.is_null())
        // SAFETY: dladdr returns a NUL-terminated path owned by the loader.
        .then(|| {
            PathBuf::from(
                unsafe { CStr::from_ptr(info.dli_fname) }
                    .to_string_lossy()
                    .into_owned(),
            )
        })
        .filter(|p| p.is_absolute());
    // The main program's entry has no usable name: use the executable's path then.
    let file = from_dladdr.or_else(|| std::env::current_exe().ok())?;
    let file = file.canonicalize().unwrap_or(file);
    file.parent().map(Path::to_path_buf)
}

/// The directories to try, in order (each is searched for `libnvrtc.so.13`); `None` stands for
/// the system's search by name.
pub fn search_dirs(
    own_dir: Option<&Path>,
    env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
) -> Vec<Option<PathBuf>> {
    let mut dirs = Vec::new();
    if let Some(own) = own_dir {
        // site-packages/calibrl/libcalibrl.so -> site-packages/nvidia/cu13/lib
        for base in own.ancestors().skip(1).take(2) {
            dirs.push(Some(base.join("nvidia/cu13/lib")));
        }
    }
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|k| env(k).filter(|v| !v.is_empty()).map(PathBuf::from))
        .collect();
    roots.extend(["/usr/local/cuda-13", "/usr/local/cuda"].map(PathBuf::from));
    for root in roots {
        dirs.push(Some(root.join("lib64")));
        dirs.push(Some(root.join("lib")));
    }
    dirs.push(None);
    dirs.dedup();
    dirs
}

/// Opens the first `libnvrtc.so.13` of `dirs` and keeps it loaded; the error names every place.
pub fn open_first(dirs: &[Option<PathBuf>]) -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    for dir in dirs {
        let path = match dir {
            Some(d) => d.join(NVRTC_SONAME),
            None => PathBuf::from(NVRTC_SONAME),
        };
        if dir.is_some() && !path.exists() {
            tried.push(path.display().to_string());
            continue;
        }
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        if dl_open(&c, RTLD_NOW) {
            return Ok(path);
        }
        tried.push(match dir {
            Some(_) => format!("{} (could not be opened)", path.display()),
            None => {
                format!("{NVRTC_SONAME} by name (LD_LIBRARY_PATH, ldconfig, system directories)")
            }
        });
    }
    Err(format!(
        "NVRTC ({NVRTC_SONAME}) was not found: `pip install calibrl[cuda]` (the nvidia-cuda-nvrtc \
         13 wheel) or install the CUDA 13 toolkit. Searched: {}",
        tried.join(", ")
    ))
}
