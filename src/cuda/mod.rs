//! The CUDA backend: the same operations as the CPU backend, on the caller's device buffers and
//! the caller's stream.
//!
//! - Availability: libcuda (a driver of CUDA 12.0 or later) and NVRTC 13 or 12, whichever the
//!   driver can run ([`nvrtc_lib`]), are loaded dynamically. Without them a call with CUDA
//!   tensors returns `CALIBRL_STATUS_CUDA_UNAVAILABLE`; CPU tensors keep working.
//! - Context: the device's *primary* context (the one PyTorch, JAX and the runtime API use) is
//!   retained once per device and pushed for the duration of a call, then popped, so the
//!   caller's current context is left as it was.
//! - Kernels: `cuda/*.cu`, compiled with NVRTC at first use for the device's architecture and
//!   cached per (device, module) for the life of the process (see [`compile`]). Each family's
//!   module declares its own [`compile::KernelSource`]; [`SOURCES`] lists them.
//! - Launches: asynchronous on the caller's `CUstream`; no host synchronisation, no device
//!   allocation, no float atomics (deterministic). Safe to capture in a CUDA graph once the
//!   module is loaded (make one un-captured call first, e.g. a warm-up step, so that the
//!   first-use compilation does not happen during capture).

pub mod compile;
mod cov;
pub mod cublas;
pub mod culib;
mod device;
pub mod expert;
mod launch;
pub mod linear;
pub mod logits;
pub mod loss;
pub mod nvrtc_lib;
mod workspace;

use compile::{Compiled, KernelSource};
pub use device::driver_available;

/// Every kernel source of the library (the CI compile check covers exactly these and fails when
/// a `cuda/*.cu` file is missing from the list).
pub const SOURCES: &[&KernelSource] = &[&logits::LOGITS, &loss::LOSS];

/// Compiles every kernel source for `compute_{arch}` and reports each kernel's PTX size (see
/// [`compile::compile_sources`]).
pub fn compile_all(arch: i32) -> crate::error::Result<Compiled> {
    compile::compile_sources(SOURCES, arch)
}
