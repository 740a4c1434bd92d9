//! Dispatch of the fused logits path (SPEC §6): validates the descriptor, then runs the CPU or
//! CUDA backend on the tensors' device. The descriptors and their conventions are in
//! [`crate::desc::logits`].

use super::on_device;
use crate::desc::logits::{Backward, Forward, ForwardBackward, ShardFinish, ShardStats};
use crate::desc::Stream;
use crate::error::Result;
use crate::tensor::{try_vec, Tensor};

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
        || cpu_forward_backward(args),
        |d| crate::cuda::logits::forward_backward(args, d, stream),
    )
}

/// The CPU forward into private rows of the outputs' dtypes, the backward reading them, then
/// the outputs: the values of `forward` then `backward`, and a backward that fails (say, on a
/// non-finite `grad_logprobs`) leaves every output untouched.
fn cpu_forward_backward(args: &ForwardBackward) -> Result<()> {
    let n = args.input.n;
    // float64 storage holds an `[n]` row of either output dtype (float32 or float64).
    let mut rows = [
        try_vec(n, 0f64, "logprobs")?,
        try_vec(n, 0f64, "entropy")?,
        try_vec(n, 0f64, "lse")?,
    ];
    let [lp, ent, lse] = rows.each_mut().map(|r| r.as_mut_ptr() as *mut u8);
    fn private<'a>(t: &Tensor<'a>, ptr: *mut u8) -> Tensor<'a> {
        let mut t = t.clone();
        t.ptr = ptr; // the outputs are contiguous `[n]`
        t
    }
    let mut fwd = args.forward();
    fwd.logprobs = private(&fwd.logprobs, lp);
    fwd.entropy = fwd.entropy.as_ref().map(|t| private(t, ent));
    fwd.lse = private(&fwd.lse, lse);
    let mut bwd = args.backward();
    bwd.entropy = fwd.entropy.clone();
    bwd.lse = fwd.lse.clone();
    crate::cpu::logits::forward(&fwd)?;
    crate::cpu::logits::backward(&bwd)?;
    for (private, out) in [
        (Some(&fwd.logprobs), Some(&args.logprobs)),
        (fwd.entropy.as_ref(), args.entropy.as_ref()),
        (Some(&fwd.lse), Some(&args.lse)),
    ] {
        if let (Some(private), Some(out)) = (private, out) {
            // Exact: the values already have the output's dtype.
            out.write_f64(&private.read_f64()?)?;
        }
    }
    Ok(())
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
