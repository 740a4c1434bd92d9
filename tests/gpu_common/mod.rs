//! The device harness shared by the GPU test files: one CUDA context and stream per process,
//! tests serialised (they may allocate gigabytes), and a clean skip without a driver or device.
//! Without a GPU, `scripts/emulate-kernels.sh` runs these tests on an emulated driver that
//! executes the kernels on the host (docs/cuda.md, "Host emulation").

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

/// SplitMix64, seeded from `CALIBRL_GPU_TEST_SEED` (or the clock) so a failing run can be repeated.
/// Each test file adds the distributions it needs in its own `impl Rng`.
pub struct Rng(pub u64);

#[allow(dead_code)] // each test binary uses a different subset
impl Rng {
    pub fn new(salt: u64) -> Rng {
        let seed = std::env::var("CALIBRL_GPU_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("rng seed {seed} (salt {salt}); rerun with CALIBRL_GPU_TEST_SEED={seed}");
        Rng(seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
