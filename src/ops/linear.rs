//! Dispatch of the fused linear path (hidden states and LM head to log-prob, entropy and their
//! gradients without an `[N, V]` logits tensor). The descriptors and conventions are in
//! [`crate::desc::linear`]. CPU only for now: CUDA tensors get a clear error.

use super::on_device;
pub use crate::desc::linear::{
    chunk_size, workspace_bytes, LinearBackward, LinearForward, LinearForwardBackward, LinearGrads,
    LinearInput, LinearShardStats,
};
use crate::desc::Stream;
use crate::error::{Error, Result};
use crate::tensor::{common_device, Tensor};

fn no_cuda(ordinal: i32) -> Result<()> {
    Err(Error::device(
        "hidden",
        format!(
            "is on cuda:{ordinal}: the fused linear path has no CUDA backend yet (CPU tensors only)"
        ),
    ))
}

/// Workspace bytes for chunks of `chunk_size` tokens of `hidden [N, H]` against `weight`.
pub fn workspace_size(hidden: &Tensor, weight: &Tensor, chunk_size: i64) -> Result<usize> {
    let chunk = self::chunk_size(chunk_size)?;
    hidden.require_ndim(2)?;
    weight.require_ndim(2)?;
    let device = common_device(&[Some(hidden), Some(weight)])?;
    on_device(
        device,
        || workspace_bytes(chunk, weight.shape[0]),
        |d| no_cuda(d).map(|_| 0),
    )
}

pub fn forward(args: &LinearForward, _stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(device, || crate::cpu::linear::forward(args), no_cuda)
}

pub fn shard_stats(args: &LinearShardStats, _stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(device, || crate::cpu::linear::shard_stats(args), no_cuda)
}

pub fn backward(args: &LinearBackward, _stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(device, || crate::cpu::linear::backward(args), no_cuda)
}

pub fn forward_backward(args: &LinearForwardBackward, _stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(
        device,
        || crate::cpu::linear::forward_backward(args),
        no_cuda,
    )
}
