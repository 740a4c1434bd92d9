//! Opening CUDA's shared libraries without environment variables: the driver's version, and a
//! versioned library (NVRTC today; cuBLAS could use the same search) found where pip, the CUDA
//! toolkit or the system put it.
//!
//! A library of CUDA major version M (`lib<stem>.so.M`) is looked for, in this order:
//!
//! 1. one already loaded in the process (by PyTorch, or preloaded by the Python package);
//! 2. its pip wheel's directory found relative to this library (`calibrl/libcalibrl.so` sits in
//!    `site-packages`, beside `nvidia/cu13/lib` for CUDA 13 wheels or `nvidia/<name>/lib` for
//!    CUDA 12 wheels);
//! 3. the CUDA toolkit: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda-M`, `/usr/local/cuda` (their
//!    `lib64` and `lib`);
//! 4. the system's search (`LD_LIBRARY_PATH`, ldconfig, `/usr/lib`...) by name.
//!
//! Opened handles are kept for the life of the process.

use std::ffi::{c_int, c_void, CStr, CString, OsString};
use std::path::{Path, PathBuf};

const RTLD_NOW: c_int = 2;
const RTLD_NOLOAD: c_int = 4;

/// An opened shared library, never closed (its functions stay valid for the process' life).
#[derive(Clone, Copy, Debug)]
pub struct Library(*mut c_void);
// SAFETY: a dlopen handle may be used from any thread; it is never closed.
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

impl Library {
    /// `dlopen(name, flags)`.
    fn open(name: &CStr, flags: c_int) -> Option<Library> {
        // Declared here, not at module level, so cbindgen leaves them out of calibrl.h.
        extern "C" {
            fn dlopen(filename: *const std::ffi::c_char, flags: c_int) -> *mut c_void;
        }
        // SAFETY: a NUL-terminated name; opening a CUDA library runs only its initializers.
        let h = unsafe { dlopen(name.as_ptr(), flags) };
        (!h.is_null()).then_some(Library(h))
    }

    /// The address of an exported symbol.
    pub fn symbol(&self, name: &str) -> Option<*mut c_void> {
        let c = CString::new(name).ok()?;
        extern "C" {
            fn dlsym(handle: *mut c_void, symbol: *const std::ffi::c_char) -> *mut c_void;
        }
        // SAFETY: a live handle and a NUL-terminated name.
        let p = unsafe { dlsym(self.0, c.as_ptr()) };
        (!p.is_null()).then_some(p)
    }

    /// The file the library was loaded from (through one of its symbols).
    pub fn file_of(&self, symbol: &str) -> Option<PathBuf> {
        file_containing(self.symbol(symbol)?)
    }
}

/// The file holding the code at `addr` (glibc's `dladdr`).
fn file_containing(addr: *const c_void) -> Option<PathBuf> {
    // glibc's Dl_info and dladdr, declared here so cbindgen leaves them out of calibrl.h.
    #[repr(C)]
    struct DlInfo {
        dli_fname: *const std::ffi::c_char,
        dli_fbase: *mut c_void,
        dli_sname: *const std::ffi::c_char,
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
    // SAFETY: `info` is a valid out-pointer; any address is accepted.
    let ok = unsafe { dladdr(addr, &mut info) };
    (ok != 0 && !info.dli_fname.is_null())
        // SAFETY: dladdr returns a NUL-terminated path owned by the loader.
        .then(|| {
            PathBuf::from(
                unsafe { CStr::from_ptr(info.dli_fname) }
                    .to_string_lossy()
                    .into_owned(),
            )
        })
        .filter(|p| p.is_absolute())
}

/// The directory of the file this code was loaded from (`libcalibrl.so`, or an executable that
/// links the rlib).
pub fn own_dir() -> Option<PathBuf> {
    // The main program's entry has no usable name: use the executable's path then.
    let file =
        file_containing(own_dir as *const c_void).or_else(|| std::env::current_exe().ok())?;
    let file = file.canonicalize().unwrap_or(file);
    file.parent().map(Path::to_path_buf)
}

/// The CUDA version the installed driver supports, encoded like `cuDriverGetVersion`
/// (1000 × major + 10 × minor: 12040 for 12.4), or `None` without a loadable `libcuda.so.1`.
/// Needs no `cuInit` and no device, and binds no other driver symbol, so it is safe on any
/// driver (cudarc's bindings need every entry point of their CUDA version present).
pub fn driver_version() -> Option<i32> {
    static VERSION: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        let lib = Library::open(c"libcuda.so.1", RTLD_NOW)?;
        let f = lib.symbol("cuDriverGetVersion")?;
        // SAFETY: `cuDriverGetVersion(int*) -> CUresult` since CUDA 2.2.
        let f: unsafe extern "C" fn(*mut c_int) -> c_int = unsafe { std::mem::transmute(f) };
        let mut v = 0;
        // SAFETY: a valid out-pointer.
        (unsafe { f(&mut v) } == 0).then_some(v)
    })
}

/// How a CUDA library is named and where its pip wheels put it.
#[derive(Clone, Copy, Debug)]
pub struct LibrarySpec {
    /// `nvrtc` for `libnvrtc.so.<major>`.
    pub stem: &'static str,
    /// (CUDA major, the wheel's library directory relative to `site-packages`).
    pub wheel_dirs: &'static [(u32, &'static str)],
}

impl LibrarySpec {
    /// `lib<stem>.so.<major>`.
    pub fn soname(&self, major: u32) -> String {
        format!("lib{}.so.{major}", self.stem)
    }

    /// The directories to try for CUDA major `major`, in order (each is searched for
    /// [`Self::soname`]); `None` stands for the system's search by name.
    pub fn search_dirs(
        &self,
        major: u32,
        own_dir: Option<&Path>,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Vec<Option<PathBuf>> {
        let mut dirs = Vec::new();
        if let Some(own) = own_dir {
            // site-packages/calibrl/libcalibrl.so -> site-packages/<wheel dir>
            for &(_, wheel) in self.wheel_dirs.iter().filter(|(m, _)| *m == major) {
                for base in own.ancestors().skip(1).take(2) {
                    dirs.push(Some(base.join(wheel)));
                }
            }
        }
        let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
            .iter()
            .filter_map(|k| env(k).filter(|v| !v.is_empty()).map(PathBuf::from))
            .collect();
        roots.push(PathBuf::from(format!("/usr/local/cuda-{major}")));
        roots.push(PathBuf::from("/usr/local/cuda"));
        for root in roots {
            dirs.push(Some(root.join("lib64")));
            dirs.push(Some(root.join("lib")));
        }
        dirs.push(None);
        dirs.dedup();
        dirs
    }
}

/// The library of SONAME `soname` if it is already loaded in the process.
pub fn already_loaded(soname: &str) -> Option<Library> {
    // RTLD_NOLOAD only succeeds when the library is already loaded.
    Library::open(&CString::new(soname).ok()?, RTLD_NOW | RTLD_NOLOAD)
}

/// Opens the first `soname` of `dirs` (kept loaded). On failure, every place tried, in words.
pub fn open_first(
    soname: &str,
    dirs: &[Option<PathBuf>],
) -> Result<(Library, String), Vec<String>> {
    let mut tried = Vec::new();
    for dir in dirs {
        let path = match dir {
            Some(d) => d.join(soname),
            None => PathBuf::from(soname),
        };
        if dir.is_some() && !path.exists() {
            tried.push(path.display().to_string());
            continue;
        }
        let opened = CString::new(path.as_os_str().as_encoded_bytes())
            .ok()
            .and_then(|c| Library::open(&c, RTLD_NOW));
        match (opened, dir) {
            (Some(lib), _) => return Ok((lib, path.display().to_string())),
            (None, Some(_)) => tried.push(format!("{} (could not be opened)", path.display())),
            (None, None) => tried.push(format!(
                "{soname} by name (LD_LIBRARY_PATH, ldconfig, system directories)"
            )),
        }
    }
    Err(tried)
}

/// Finds `spec`'s library of CUDA major `major`: already loaded, else the first of its search
/// directories (see the module docs). Returns the library and where it was found, or every place
/// searched.
pub fn find(spec: &LibrarySpec, major: u32) -> Result<(Library, String), Vec<String>> {
    let soname = spec.soname(major);
    if let Some(lib) = already_loaded(&soname) {
        return Ok((lib, format!("{soname} (already loaded)")));
    }
    let dirs = spec.search_dirs(major, own_dir().as_deref(), &|k| std::env::var_os(k));
    open_first(&soname, &dirs)
}
