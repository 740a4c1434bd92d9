//! The device harness shared by the GPU test files: one CUDA context and stream per process,
//! tests serialised (they may allocate gigabytes), and a clean skip without a driver or device.

use cudarc::driver::{CudaContext, CudaStream};
use std::sync::{Arc, Mutex, OnceLock};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

/// The shared device, or None when there is no driver or device.
pub fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        // SAFETY: only probes whether libcuda can be opened (cudarc panics on a missing library).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return None;
        }
        let ctx = CudaContext::new(0).ok()?;
        // SAFETY: the tests order their work on one stream and synchronise explicitly.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().ok()?;
        Some(Gpu { ctx, stream })
    })
    .as_ref()
}

/// GPU tests run one at a time.
pub fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// `let (g, _guard) = require_gpu!();` — the device and the test lock, or return from the test
/// after printing "skipped: no CUDA device".
#[macro_export]
macro_rules! require_gpu {
    () => {{
        let guard = $crate::gpu_common::gpu_lock();
        match $crate::gpu_common::gpu() {
            Some(g) => {
                g.ctx.bind_to_thread().unwrap();
                (g, guard)
            }
            None => {
                println!("skipped: no CUDA device");
                return;
            }
        }
    }};
}
