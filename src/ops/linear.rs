//! Dispatch of the fused linear path (hidden states and LM head to log-prob, entropy and their
//! gradients without an `[N, V]` logits tensor). The descriptors and conventions are in
//! [`crate::desc::linear`]; the CUDA backend is [`crate::cuda::linear`].

use super::on_device;
use crate::desc::linear::{
    chunk_size, workspace_bytes_on, LinearBackward, LinearForward, LinearForwardBackward,
    LinearShardStats,
};
use crate::desc::Stream;
use crate::error::Result;
use crate::tensor::{common_device, Tensor};

/// Workspace bytes for chunks of `chunk_size` tokens of `hidden [N, H]` against `weight`.
pub fn workspace_size(hidden: &Tensor, weight: &Tensor, chunk_size: i64) -> Result<usize> {
    let chunk = self::chunk_size(chunk_size)?;
    hidden.require_ndim(2)?;
    weight.require_ndim(2)?;
    let device = common_device(&[Some(hidden), Some(weight)])?;
    workspace_bytes_on(device, chunk, weight.shape[0], hidden.dtype)
}

pub fn forward(args: &LinearForward, stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(
        device,
        || crate::cpu::linear::forward(args),
        |d| crate::cuda::linear::forward(args, d, stream),
    )
}

pub fn shard_stats(args: &LinearShardStats, stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(
        device,
        || crate::cpu::linear::shard_stats(args),
        |d| crate::cuda::linear::shard_stats(args, d, stream),
    )
}

pub fn backward(args: &LinearBackward, stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(
        device,
        || crate::cpu::linear::backward(args),
        |d| crate::cuda::linear::backward(args, d, stream),
    )
}

pub fn forward_backward(args: &LinearForwardBackward, stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(
        device,
        || crate::cpu::linear::forward_backward(args),
        |d| crate::cuda::linear::forward_backward(args, d, stream),
    )
}
