//! Operations: each validates its arguments once (device-independent checks: NULL, dtype,
//! shape, device agreement) and then dispatches on the tensors' device to the CPU or CUDA
//! backend. Backends receive validated argument structs and may assume what `validate` checked.

pub mod logits;
pub mod loss;

use crate::error::Result;
use crate::tensor::Device;
use std::ffi::c_void;

/// The caller's CUDA stream (`CUstream`); NULL is the legacy default stream. Ignored on CPU.
pub type Stream = *mut c_void;

/// Fails with `CALIBRL_STATUS_CUDA_UNAVAILABLE` when CUDA tensors are passed to a build or a
/// machine without a usable driver/NVRTC.
pub(crate) fn on_device<T>(
    device: Device,
    cpu: impl FnOnce() -> Result<T>,
    cuda: impl FnOnce(i32) -> Result<T>,
) -> Result<T> {
    match device {
        Device::Cpu => cpu(),
        Device::Cuda(ordinal) => cuda(ordinal),
    }
}
