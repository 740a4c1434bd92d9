//! The full-vocabulary launches: the forward, the backward, and both in one call for
//! token-local losses (the single pass where [`plan`] allows it, else the forward then the
//! backward).

use super::args::{
    grad_row_stride, i64_arg, labels_are_i64, optional_code, optional_ptr, ptr,
    require_element_aligned, scalar_code, suffix,
};
use super::geometry::{plan, row_geometry, single_pass_threads, LogitsPath};
use super::source::LOGITS;
use crate::cuda::device::device;
use crate::cuda::launch::{launch, launch_cluster, Arg, ClusterLaunch, Geometry};
use crate::desc::logits::{Backward, Forward, ForwardBackward};
use crate::desc::Stream;
use crate::error::{Error, Result};

/// Full-vocabulary forward: one launch of `calibrl_logits_forward_<dtype>`.
pub fn forward(args: &Forward, ordinal: i32, stream: Stream) -> Result<()> {
    let input = &args.input;
    require_element_aligned(&input.logits)?;
    let codes = (
        scalar_code(&args.logprobs)?,
        optional_code(&args.entropy)?,
        scalar_code(&args.lse)?,
    );
    if input.n == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let name = format!("calibrl_logits_forward_{}", suffix(input.logits.dtype));
    let f = dev.function(&LOGITS, &name)?;
    // (logits, n_rows, row_stride, vocab, labels, labels_are_i64, inv_t,
    //  logprobs, logprobs_code, entropy, entropy_code, lse, lse_code)
    let params = [
        ptr(&input.logits),
        i64_arg("logits", input.n)?,
        i64_arg("logits", input.row_stride)?,
        i64_arg("logits", input.v)?,
        ptr(&input.labels),
        labels_are_i64(input),
        Arg::F32((1.0 / input.temperature) as f32),
        ptr(&args.logprobs),
        Arg::I32(codes.0),
        optional_ptr(&args.entropy),
        Arg::I32(codes.1),
        ptr(&args.lse),
        Arg::I32(codes.2),
    ];
    launch(
        dev,
        f,
        &name,
        row_geometry(input.n, input.v, input.logits.dtype),
        stream,
        &params,
    )
}

/// Backward over full-vocabulary or shard logits, in place or into a separate buffer.
pub fn backward(args: &Backward, ordinal: i32, stream: Stream) -> Result<()> {
    let input = &args.input;
    require_element_aligned(&input.logits)?;
    require_element_aligned(&args.grad_logits)?;
    if args.grad_logits.dtype != input.logits.dtype {
        return Err(Error::dtype(
            "grad_logits",
            format!(
                "is {} but `logits` is {}: the CUDA backend writes d-logits in the logits' dtype",
                args.grad_logits.dtype.name(),
                input.logits.dtype.name()
            ),
        ));
    }
    let grad_row_stride = grad_row_stride(args)?;
    let codes = [
        scalar_code(&args.lse)?,
        optional_code(&args.entropy)?,
        scalar_code(&args.grad_logprobs)?,
        optional_code(&args.grad_entropy)?,
    ];
    if input.n == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let name = format!("calibrl_logits_backward_{}", suffix(input.logits.dtype));
    let f = dev.function(&LOGITS, &name)?;
    // (logits, grad, n_rows, row_stride, grad_row_stride, vocab, labels, labels_are_i64,
    //  vocab_start, inv_t, lse, lse_code, entropy, entropy_code, grad_logprobs,
    //  grad_logprobs_code, grad_entropy, grad_entropy_code)
    let params = [
        ptr(&input.logits),
        ptr(&args.grad_logits),
        i64_arg("logits", input.n)?,
        i64_arg("logits", input.row_stride)?,
        i64_arg("grad_logits", grad_row_stride)?,
        i64_arg("logits", input.v)?,
        ptr(&input.labels),
        labels_are_i64(input),
        Arg::I64(input.vocab_start),
        Arg::F32((1.0 / input.temperature) as f32),
        ptr(&args.lse),
        Arg::I32(codes[0]),
        optional_ptr(&args.entropy),
        Arg::I32(codes[1]),
        ptr(&args.grad_logprobs),
        Arg::I32(codes[2]),
        optional_ptr(&args.grad_entropy),
        Arg::I32(codes[3]),
    ];
    launch(
        dev,
        f,
        &name,
        row_geometry(input.n, input.v, input.logits.dtype),
        stream,
        &params,
    )
}

/// Forward and backward of a token-local loss (see [`ForwardBackward`]); the path by [`plan`].
pub fn forward_backward(args: &ForwardBackward, ordinal: i32, stream: Stream) -> Result<()> {
    let input = &args.input;
    let backward_args = args.backward();
    require_element_aligned(&input.logits)?;
    require_element_aligned(&args.grad_logits)?;
    let grad_row_stride = grad_row_stride(&backward_args)?;
    let codes = [
        scalar_code(&args.grad_logprobs)?,
        optional_code(&args.grad_entropy)?,
        scalar_code(&args.logprobs)?,
        optional_code(&args.entropy)?,
        scalar_code(&args.lse)?,
    ];
    if input.n == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let dtype = input.logits.dtype;
    let (cluster, chunk, smem_bytes) = match plan(dev.arch, dev.smem_optin, input.v, dtype) {
        LogitsPath::ThreePass => {
            forward(&args.forward(), ordinal, stream)?;
            return backward(&backward_args, ordinal, stream);
        }
        LogitsPath::SinglePass {
            cluster,
            chunk,
            smem_bytes,
        } => (cluster, chunk, smem_bytes),
    };
    let threads = single_pass_threads(chunk, dtype);
    // Clusters that can be resident at once (rows are cluster-strided), at most one per row.
    let per_sm = (dev.smem_optin / smem_bytes)
        .min(2048 / threads as usize)
        .max(1);
    let clusters = (dev.sms * per_sm / cluster)
        .max(1)
        .min(input.n)
        .min(i32::MAX as usize / cluster);
    let name = format!("calibrl_logits_single_pass_{}", suffix(dtype));
    let f = dev.function(&LOGITS, &name)?;
    // (logits, grad, n_rows, row_stride, grad_row_stride, vocab, chunk, labels, labels_are_i64,
    //  inv_t, grad_logprobs, grad_logprobs_code, grad_entropy, grad_entropy_code, logprobs,
    //  logprobs_code, entropy, entropy_code, lse, lse_code)
    let params = [
        ptr(&input.logits),
        ptr(&args.grad_logits),
        i64_arg("logits", input.n)?,
        i64_arg("logits", input.row_stride)?,
        i64_arg("grad_logits", grad_row_stride)?,
        i64_arg("logits", input.v)?,
        i64_arg("logits", chunk)?,
        ptr(&input.labels),
        labels_are_i64(input),
        Arg::F32((1.0 / input.temperature) as f32),
        ptr(&args.grad_logprobs),
        Arg::I32(codes[0]),
        optional_ptr(&args.grad_entropy),
        Arg::I32(codes[1]),
        ptr(&args.logprobs),
        Arg::I32(codes[2]),
        optional_ptr(&args.entropy),
        Arg::I32(codes[3]),
        ptr(&args.lse),
        Arg::I32(codes[4]),
    ];
    let how = ClusterLaunch {
        geometry: Geometry {
            blocks: (clusters * cluster) as u32,
            threads,
        },
        cluster: cluster as u32,
        smem_bytes: smem_bytes as u32,
    };
    launch_cluster(dev, f, &name, how, stream, &params)
}
