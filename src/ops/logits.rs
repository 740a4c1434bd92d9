//! Dispatch of the fused logits path (SPEC §6): validates the descriptor, then runs the CPU or
//! CUDA backend on the tensors' device. The descriptors and their conventions are in
//! [`crate::desc::logits`].

use super::on_device;
pub use crate::desc::logits::{
    inv_temperature, Backward, Forward, ForwardBackward, LogitsInput, ShardFinish, ShardStats,
    LOGITS_DTYPES, OUT_DTYPES, STATS_WIDTH,
};
use crate::desc::Stream;
use crate::error::Result;

pub fn forward(args: &Forward, stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(
        device,
        || crate::cpu::logits::forward(args),
        |d| crate::cuda::logits::forward(args, d, stream),
    )
}

pub fn backward(args: &Backward, stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(
        device,
        || crate::cpu::logits::backward(args),
        |d| crate::cuda::logits::backward(args, d, stream),
    )
}

/// Forward and backward of a token-local loss in one call (see [`ForwardBackward`]). The CPU
/// backend runs its forward then its backward; CUDA picks the single-pass kernel where it applies.
pub fn forward_backward(args: &ForwardBackward, stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(
        device,
        || {
            crate::cpu::logits::forward(&args.forward())?;
            crate::cpu::logits::backward(&args.backward())
        },
        |d| crate::cuda::logits::forward_backward(args, d, stream),
    )
}

pub fn shard_stats(args: &ShardStats, stream: Stream) -> Result<()> {
    let device = args.validate()?;
    on_device(
        device,
        || crate::cpu::logits::shard_stats(args),
        |d| crate::cuda::logits::shard_stats(args, d, stream),
    )
}

pub fn shard_finish(args: &ShardFinish, stream: Stream) -> Result<()> {
    let device = args.device()?;
    on_device(
        device,
        || crate::cpu::logits::shard_finish(args),
        |d| crate::cuda::logits::shard_finish(args, d, stream),
    )
}
