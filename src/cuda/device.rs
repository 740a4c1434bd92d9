//! The driver, the devices and their loaded modules: libcuda is loaded once, each device's
//! primary context is retained once and pushed for the duration of a call, and each kernel
//! family is compiled and loaded at first use per device.

use super::compile::{self, KernelSource};
use super::culib;
use super::nvrtc_lib::{decode_driver_version, Output};
use crate::error::{Error, Result};
use cudarc::driver::{result as drv, sys};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The oldest driver the bindings run on: cudarc is built for CUDA 12.0 (`cuda-12000` in
/// Cargo.toml), so every entry point it binds exists in any 12.x or 13.x driver.
const MIN_DRIVER: i32 = 12000;

/// Whether a CUDA driver of CUDA 12.0 or later can be loaded (checked once).
pub fn driver_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // The version is read first: cudarc's probe panics on a driver that lacks an entry point
    // of the CUDA version it was built for.
    // SAFETY: only probes whether the shared library can be opened.
    *PRESENT.get_or_init(|| {
        culib::driver_version().is_some_and(|v| v >= MIN_DRIVER)
            && unsafe { sys::is_culib_present() }
    })
}

/// Maps a driver error to `CALIBRL_STATUS_CUDA_ERROR`, naming the call that failed.
pub(crate) fn driver_error(call: &str, e: drv::DriverError) -> Error {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Error::cuda(format!("{call} failed: {name} ({text})"))
}

fn init_driver() -> Result<()> {
    match culib::driver_version() {
        None => {
            return Err(Error::cuda_unavailable(
                "CUDA tensors were passed but the CUDA driver library (libcuda.so.1) could not be \
                 loaded",
            ))
        }
        Some(v) if v < MIN_DRIVER => {
            let (major, minor) = decode_driver_version(v);
            return Err(Error::cuda_unavailable(format!(
                "CUDA tensors were passed but the driver supports CUDA {major}.{minor}; calibrl \
                 needs a driver of CUDA 12.0 or later (≥ 525): update the NVIDIA driver"
            )));
        }
        Some(_) if !driver_available() => {
            return Err(Error::cuda_unavailable(
                "CUDA tensors were passed but cudarc cannot load the CUDA driver library",
            ))
        }
        Some(_) => {}
    }
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| drv::init().map_err(|e| driver_error("cuInit", e).message))
        .clone()
        .map_err(Error::cuda_unavailable)?;
    compile::require_nvrtc()
}

/// A loaded kernel (a `CUfunction` of a module in a primary context that is never released).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Function(sys::CUfunction);
// SAFETY: CUfunction handles may be used from any thread of the process.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

impl Function {
    pub(crate) fn raw(self) -> sys::CUfunction {
        self.0
    }
}

struct Module {
    functions: HashMap<&'static str, Function>,
}

/// One CUDA device: its retained primary context, architecture and loaded modules.
pub(crate) struct Device {
    ctx: sys::CUcontext,
    /// The architecture the modules are compiled for (e.g. 90).
    pub arch: i32,
    /// PTX for `compute_{arch}`, or a cubin for `sm_{arch}` (see `nvrtc_lib`).
    pub output: Output,
    /// Streaming multiprocessors (sizes the grids of kernels that loop over their work).
    pub sms: usize,
    /// Dynamic shared memory one block may opt into (bytes; `MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`).
    pub smem_optin: usize,
    modules: Mutex<HashMap<&'static str, Arc<Module>>>,
}
// SAFETY: a primary context handle may be pushed by any thread; the module map is locked.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

/// Makes a context current for a scope and restores the previous one on drop.
pub(crate) struct ContextGuard(());

impl ContextGuard {
    fn push(ctx: sys::CUcontext) -> Result<ContextGuard> {
        // SAFETY: `ctx` is a retained primary context.
        unsafe { sys::cuCtxPushCurrent_v2(ctx) }
            .result()
            .map_err(|e| driver_error("cuCtxPushCurrent", e))?;
        Ok(ContextGuard(()))
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let mut popped = std::ptr::null_mut();
        // SAFETY: pops exactly the context pushed by `push`.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

impl Device {
    fn open(ordinal: i32) -> Result<Device> {
        let count = drv::device::get_count().map_err(|e| driver_error("cuDeviceGetCount", e))?;
        if ordinal < 0 || ordinal >= count {
            return Err(Error::device(
                "device_id",
                format!("CUDA device {ordinal} does not exist ({count} device(s) visible)"),
            ));
        }
        let dev = drv::device::get(ordinal).map_err(|e| driver_error("cuDeviceGet", e))?;
        let attr = |a| {
            // SAFETY: `dev` is a valid device handle.
            unsafe { drv::device::get_attribute(dev, a) }
                .map_err(|e| driver_error("cuDeviceGetAttribute", e))
        };
        use sys::CUdevice_attribute as A;
        let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let output = compile::output()?;
        let arch = compile::arch_for_device(major, minor)?;
        let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize;
        let smem_optin =
            attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as usize;
        // SAFETY: `dev` is valid. The primary context is retained for the life of the process.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }
            .map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))?;
        Ok(Device {
            ctx,
            arch,
            output,
            sms,
            smem_optin,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Pushes this device's primary context for the current scope.
    pub(crate) fn activate(&self) -> Result<ContextGuard> {
        ContextGuard::push(self.ctx)
    }

    /// A kernel of `src`, compiling and loading the module at first use.
    pub(crate) fn function(&self, src: &'static KernelSource, kernel: &str) -> Result<Function> {
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(src.name) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(self.load(src)?);
                    modules.insert(src.name, m.clone());
                    m
                }
            }
        };
        module
            .functions
            .get(kernel)
            .copied()
            .ok_or_else(|| Error::cuda(format!("module `{}` has no kernel `{kernel}`", src.name)))
    }

    fn load(&self, src: &'static KernelSource) -> Result<Module> {
        let image = compile::compile_module(src, self.arch, self.output)?;
        let _ctx = self.activate()?;
        // SAFETY: `image` is a NUL-terminated PTX text or an ELF cubin; the context is current.
        let module = unsafe { drv::module::load_data(image.as_ptr() as *const std::ffi::c_void) }
            .map_err(|e| {
            driver_error(
                &format!(
                    "cuModuleLoadData({}.cu, {})",
                    src.name,
                    compile::target_name(self.arch, self.output)
                ),
                e,
            )
        })?;
        let mut functions = HashMap::new();
        for &name in src.kernels {
            let cname = std::ffi::CString::new(name).expect("kernel names have no NUL");
            // SAFETY: `module` was just loaded and is never unloaded.
            let f = unsafe { drv::module::get_function(module, cname) }
                .map_err(|e| driver_error(&format!("cuModuleGetFunction({name})"), e))?;
            functions.insert(name, Function(f));
        }
        Ok(Module { functions })
    }
}

/// The device of the given ordinal, opened (driver initialised, primary context retained) at
/// first use. Fails with `CALIBRL_STATUS_CUDA_UNAVAILABLE` without libcuda or NVRTC.
pub(crate) fn device(ordinal: i32) -> Result<&'static Device> {
    init_driver()?;
    static DEVICES: OnceLock<Mutex<HashMap<i32, &'static Device>>> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(d) = devices.get(&ordinal) {
        return Ok(d);
    }
    // Devices are few and live for the whole process: leaking keeps `&'static` handles simple.
    let d: &'static Device = Box::leak(Box::new(Device::open(ordinal)?));
    devices.insert(ordinal, d);
    Ok(d)
}
