//! cuBLAS, loaded at run time like NVRTC: the GEMMs of the fused linear path.
//!
//! `libcublas.so.<major>` is looked for with [`culib::find`] (already loaded, e.g. by PyTorch;
//! the `nvidia-cublas` wheel beside the library, `nvidia/cu13/lib` for CUDA 13 and
//! `nvidia/cublas/lib` for the cu12 wheel; the toolkit; the system), the driver's own CUDA
//! major first, then 12 on a CUDA 13 driver. Five entry points are resolved with `dlsym`
//! (present from cuBLAS 11.4.2 to 13.x): cudarc 0.17's `cublas` bindings would bind every symbol
//! of one CUDA version and open only that major's SONAME, the same reason NVRTC is called
//! through [`super::nvrtc_lib`].
//!
//! One handle per device, created once in the device's primary context and never destroyed (a
//! captured graph may refer to it). A call takes the handle's lock, sets the caller's stream
//! and then the caller's workspace (`cublasSetStream` resets the workspace to cuBLAS's own pool,
//! so the order matters), and issues its GEMMs: nothing is allocated and nothing synchronises,
//! so the calls can be captured in a CUDA graph. cuBLAS gives bitwise-equal results run to run
//! on the same GPU model and cuBLAS version (cuBLAS documentation, "Results reproducibility";
//! atomics mode stays off, its default).

use super::culib::{self, Library, LibrarySpec};
use super::device::Device;
use crate::desc::Stream;
use crate::error::{Error, Result};
use crate::tensor::DType;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// cuBLAS's file names and wheel directories.
pub const CUBLAS: LibrarySpec = LibrarySpec {
    stem: "cublas",
    wheel_dirs: &[(13, "nvidia/cu13/lib"), (12, "nvidia/cublas/lib")],
};

/// The cuBLAS majors a driver of CUDA `driver_major` can run, preferred first: its own, then 12
/// (a CUDA 13 driver runs CUDA 12 libraries; nothing runs a newer major).
pub fn majors_for(driver_major: u32) -> Vec<u32> {
    [13, 12]
        .into_iter()
        .filter(|&m| m <= driver_major)
        .collect()
}

/// Opens the first cuBLAS of `majors` found by `find` (one call per major); on failure the
/// error names every place searched and the fix.
pub fn locate(
    majors: &[u32],
    find: &dyn Fn(u32) -> std::result::Result<(Library, String), Vec<String>>,
) -> std::result::Result<(Library, String), String> {
    let mut searched = Vec::new();
    for &major in majors {
        match find(major) {
            Ok(found) => return Ok(found),
            Err(tried) => searched.extend(tried),
        }
    }
    Err(format!(
        "the fused linear path on CUDA needs cuBLAS ({}), not found; searched: {}. Install the \
         nvidia-cublas wheel of your CUDA major (`pip install nvidia-cublas` for CUDA 13, \
         `nvidia-cublas-cu12` for CUDA 12; PyTorch's CUDA wheels bring it) or a CUDA toolkit",
        majors
            .iter()
            .map(|&m| CUBLAS.soname(m))
            .collect::<Vec<_>>()
            .join(" or "),
        if searched.is_empty() {
            "nothing (no CUDA major the driver can run)".to_string()
        } else {
            searched.join("; ")
        }
    ))
}

/// [`locate`] with the library's real search ([`culib::find`]) for this driver.
fn locate_for_driver() -> std::result::Result<(Library, String), String> {
    let driver = culib::driver_version().ok_or("the CUDA driver could not be loaded")?;
    let (major, _) = super::nvrtc_lib::decode_driver_version(driver);
    locate(&majors_for(major), &|m| culib::find(&CUBLAS, m))
}

/// The search directories for a major (tests: the places named in the error).
pub fn search_dirs(major: u32, own_dir: Option<&Path>) -> Vec<Option<std::path::PathBuf>> {
    CUBLAS.search_dirs(major, own_dir, &|k| std::env::var_os(k))
}

type Handle = *mut c_void;
type Status = c_int;

// cuBLAS's enumerations (cublas_api.h, library_types.h).
const OP_N: c_int = 0;
const OP_T: c_int = 1;
const COMPUTE_32F: c_int = 68;
const GEMM_DEFAULT: c_int = -1;

fn data_type(d: DType) -> c_int {
    match d {
        DType::F32 => 0,   // CUDA_R_32F
        DType::F16 => 2,   // CUDA_R_16F
        DType::BF16 => 14, // CUDA_R_16BF
        _ => -1,           // refused by cuBLAS (the callers check dtypes first)
    }
}

/// The entry points used.
struct Api {
    create: unsafe extern "C" fn(*mut Handle) -> Status,
    set_stream: unsafe extern "C" fn(Handle, *mut c_void) -> Status,
    set_workspace: unsafe extern "C" fn(Handle, *mut c_void, usize) -> Status,
    #[allow(clippy::type_complexity)]
    gemm_ex: unsafe extern "C" fn(
        Handle,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        *const c_void,
        *const c_void,
        c_int,
        c_int,
        *const c_void,
        c_int,
        c_int,
        *const c_void,
        *mut c_void,
        c_int,
        c_int,
        c_int,
        c_int,
    ) -> Status,
    status_string: Option<unsafe extern "C" fn(Status) -> *const c_char>,
    place: String,
}

impl Api {
    fn load(lib: Library, place: String) -> std::result::Result<Api, String> {
        let sym = |name: &str| {
            lib.symbol(name)
                .ok_or_else(|| format!("{place} has no `{name}` (cuBLAS older than 11.4.2?)"))
        };
        // SAFETY (each `f` below): the signatures of cublas_api.h (cuBLAS 11.4.2 … 13.x) for
        // these names; a function pointer has the size of a data pointer.
        fn f<F>(p: *mut c_void) -> F {
            unsafe { std::mem::transmute_copy(&p) }
        }
        Ok(Api {
            create: f(sym("cublasCreate_v2")?),
            set_stream: f(sym("cublasSetStream_v2")?),
            set_workspace: f(sym("cublasSetWorkspace_v2")?),
            gemm_ex: f(sym("cublasGemmEx")?),
            status_string: lib.symbol("cublasGetStatusString").map(f),
            place,
        })
    }

    fn check(&self, call: &str, status: Status) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        let text = self
            .status_string
            // SAFETY: cuBLAS returns a static string for any status.
            .map(|f| unsafe { f(status) })
            .filter(|p| !p.is_null())
            // SAFETY: non-null, NUL-terminated, static.
            .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .unwrap_or_default();
        Err(Error::cuda(format!(
            "{call} failed: cuBLAS status {status} {text} ({})",
            self.place
        )))
    }
}

fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let (lib, place) = locate_for_driver()?;
        Api::load(lib, place)
    })
    .as_ref()
    .map_err(|e| Error::cuda_unavailable(e.clone()))
}

/// A device's cuBLAS handle.
struct BlasHandle(Handle);
// SAFETY: used only under its mutex.
unsafe impl Send for BlasHandle {}

fn handle(dev: &Device, ordinal: i32) -> Result<&'static Mutex<BlasHandle>> {
    static HANDLES: OnceLock<Mutex<HashMap<i32, &'static Mutex<BlasHandle>>>> = OnceLock::new();
    let api = api()?;
    let mut map = HANDLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(h) = map.get(&ordinal) {
        return Ok(h);
    }
    let _ctx = dev.activate()?;
    let mut h: Handle = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; the device's primary context is current.
    api.check("cublasCreate", unsafe { (api.create)(&mut h) })?;
    let h: &'static Mutex<BlasHandle> = Box::leak(Box::new(Mutex::new(BlasHandle(h))));
    map.insert(ordinal, h);
    Ok(h)
}

/// Transposition of a GEMM operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    N,
    T,
}

/// A column-major operand: `ptr`, element type, leading dimension (elements).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand {
    pub ptr: *const u8,
    pub dtype: DType,
    pub ld: usize,
}

/// `C[m, n] = op(A)[m, k] · op(B)[k, n] + beta · C`, column-major, f32 accumulation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub ops: (Op, Op),
    pub mnk: (usize, usize, usize),
    pub a: Operand,
    pub b: Operand,
    pub c: Operand,
    /// 0 (overwrite; C is not read) or 1 (accumulate).
    pub beta: f32,
}

/// The handle of one device, locked and set to the caller's stream and workspace.
pub(crate) struct Session {
    api: &'static Api,
    guard: MutexGuard<'static, BlasHandle>,
}

impl Session {
    /// Locks `dev`'s handle and binds it to `stream` and the `bytes` at `workspace` (256-byte
    /// aligned, as `cublasSetWorkspace` requires). The device's context must be current.
    pub(crate) fn open(
        dev: &Device,
        ordinal: i32,
        stream: Stream,
        workspace: *mut u8,
        bytes: usize,
    ) -> Result<Session> {
        let api = api()?;
        let guard = handle(dev, ordinal)?
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let h = guard.0;
        // SAFETY: a live handle; the stream is the caller's (NULL: the legacy default stream).
        api.check("cublasSetStream", unsafe { (api.set_stream)(h, stream) })?;
        // SAFETY: `bytes` of the caller's device workspace, reserved for cuBLAS in this call.
        api.check("cublasSetWorkspace", unsafe {
            (api.set_workspace)(h, workspace as *mut c_void, bytes)
        })?;
        Ok(Session { api, guard })
    }

    pub(crate) fn gemm(&self, name: &str, g: &Gemm) -> Result<()> {
        let int = |what: &str, v: usize| {
            c_int::try_from(v).map_err(|_| {
                Error::invalid(
                    "hidden",
                    format!("{name}: {what} = {v} exceeds cuBLAS's 32-bit extents"),
                )
            })
        };
        let op = |o: Op| if o == Op::N { OP_N } else { OP_T };
        let (m, n, k) = g.mnk;
        let (alpha, beta) = (1f32, g.beta);
        // SAFETY: the operands are device buffers of the call, each holding the elements the
        // leading dimensions and extents address (checked by the caller's layout).
        let status = unsafe {
            (self.api.gemm_ex)(
                self.guard.0,
                op(g.ops.0),
                op(g.ops.1),
                int("m", m)?,
                int("n", n)?,
                int("k", k)?,
                &alpha as *const f32 as *const c_void,
                g.a.ptr as *const c_void,
                data_type(g.a.dtype),
                int("lda", g.a.ld)?,
                g.b.ptr as *const c_void,
                data_type(g.b.dtype),
                int("ldb", g.b.ld)?,
                &beta as *const f32 as *const c_void,
                g.c.ptr as *mut c_void,
                data_type(g.c.dtype),
                int("ldc", g.c.ld)?,
                COMPUTE_32F,
                GEMM_DEFAULT,
            )
        };
        self.api.check(&format!("cublasGemmEx ({name})"), status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_runs_its_own_major_or_an_older_one() {
        assert_eq!(majors_for(13), vec![13, 12]);
        assert_eq!(majors_for(12), vec![12]);
        assert!(majors_for(11).is_empty());
    }
}
