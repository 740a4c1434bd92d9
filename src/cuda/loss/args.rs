//! Kernel arguments: the dtype codes, the (pointer, dtype code) pairs of the parameter blocks,
//! and the launch of a loss-family kernel with such a block.

use super::source::LOSS;
use crate::cuda::device::Device;
use crate::cuda::workspace::launch_struct;
use crate::desc::Stream;
use crate::error::Result;
use crate::tensor::{DType, Tensor};
use std::ffi::c_void;

/// Threads per block of every loss-family kernel (LOSS_THREADS in cuda/loss.cu).
pub(super) const THREADS: u32 = 256;

/// dtype codes (`DT_*` in cuda/loss.cu).
fn code(t: &Tensor) -> i64 {
    match t.dtype {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::BF16 => 2,
        DType::F16 => 3,
        DType::U8 | DType::Bool => 4,
        DType::I8 => 5,
        DType::I32 => 6,
        DType::I64 => 7,
    }
}

fn contiguous(t: &Tensor) -> Result<()> {
    t.require_contiguous()
}

/// (pointer, dtype code) of an optional tensor.
pub(super) fn opt(t: Option<&Tensor>) -> Result<(*const c_void, i64)> {
    match t {
        None => Ok((std::ptr::null(), 0)),
        Some(t) => {
            contiguous(t)?;
            Ok((t.ptr as *const c_void, code(t)))
        }
    }
}

pub(super) fn req(t: &Tensor) -> Result<(*const c_void, i64)> {
    opt(Some(t))
}

pub(super) fn launch<P>(
    dev: &Device,
    kernel: &'static str,
    blocks: usize,
    threads: u32,
    stream: Stream,
    params: &mut P,
) -> Result<()> {
    launch_struct(dev, &LOSS, kernel, blocks, threads, stream, params)
}
