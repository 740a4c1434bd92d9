//! Operations: each validates its descriptor once (see [`crate::desc`]) and then dispatches on
//! the tensors' device to the CPU or CUDA backend. This is the layer the C ABI and Rust callers
//! use; it is the only one that sees both backends.

pub mod expert;
pub mod linear;
pub mod logits;
pub mod loss;

use crate::error::Result;
use crate::tensor::Device;

/// Runs the backend of `device`.
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
