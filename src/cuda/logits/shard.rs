//! The vocabulary-parallel forward's launches: each rank's shard statistics, then the rows'
//! results from the gathered statistics.

use super::args::{
    i64_arg, labels_are_i64, optional_code, optional_ptr, ptr, require_element_aligned,
    scalar_code, suffix,
};
use super::geometry::row_geometry;
use super::source::LOGITS;
use crate::cuda::device::device;
use crate::cuda::launch::{launch, Arg, Geometry};
use crate::desc::logits::{ShardFinish, ShardStats};
use crate::desc::Stream;
use crate::error::Result;
use crate::tensor::DType;

/// Phase 1 of the vocabulary-parallel forward.
pub fn shard_stats(args: &ShardStats, ordinal: i32, stream: Stream) -> Result<()> {
    let input = &args.input;
    require_element_aligned(&input.logits)?;
    require_element_aligned(&args.stats)?;
    if input.n == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let name = format!("calibrl_logits_shard_stats_{}", suffix(input.logits.dtype));
    let f = dev.function(&LOGITS, &name)?;
    // (logits, n_rows, row_stride, vocab, labels, labels_are_i64, vocab_start, inv_t, stats)
    let params = [
        ptr(&input.logits),
        i64_arg("logits", input.n)?,
        i64_arg("logits", input.row_stride)?,
        i64_arg("logits", input.v)?,
        ptr(&input.labels),
        labels_are_i64(input),
        Arg::I64(input.vocab_start),
        Arg::F32((1.0 / input.temperature) as f32),
        ptr(&args.stats),
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

/// Phase 2: one thread per row over the `[R, N, 4]` gathered statistics.
pub fn shard_finish(args: &ShardFinish, ordinal: i32, stream: Stream) -> Result<()> {
    require_element_aligned(&args.stats)?;
    let codes = (
        scalar_code(&args.logprobs)?,
        optional_code(&args.entropy)?,
        scalar_code(&args.lse)?,
    );
    if args.n == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let name = "calibrl_logits_shard_finish";
    let f = dev.function(&LOGITS, name)?;
    const THREADS: usize = 128;
    let geometry = Geometry {
        blocks: args.n.div_ceil(THREADS).min(i32::MAX as usize) as u32,
        threads: THREADS as u32,
    };
    // (stats, n_shards, n_rows, labels, labels_are_i64, logprobs, logprobs_code, entropy,
    //  entropy_code, lse, lse_code)
    let params = [
        ptr(&args.stats),
        i64_arg("stats", args.shards)?,
        i64_arg("stats", args.n)?,
        ptr(&args.labels),
        Arg::I32((args.labels.dtype == DType::I64) as i32),
        ptr(&args.logprobs),
        Arg::I32(codes.0),
        optional_ptr(&args.entropy),
        Arg::I32(codes.1),
        ptr(&args.lse),
        Arg::I32(codes.2),
    ];
    launch(dev, f, name, geometry, stream, &params)
}
