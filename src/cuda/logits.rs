//! The fused logits path on CUDA (kernels in `cuda/logits.cu`).
//!
//! Same conventions as the CPU backend (`crate::cpu::logits`; the descriptors are in
//! `crate::desc::logits`), with these CUDA-specific rules:
//! - The `[N]` tensors (`logprobs`, `entropy`, `lse`, `grad_logprobs`, `grad_entropy`) may be
//!   float32, float64, bfloat16 or float16; the kernels compute in f32 whatever the dtype.
//! - Input checks that need the data (NaN / +inf logits, a row entirely −inf, labels past the
//!   vocabulary in the full-vocabulary forward, NaN saved statistics) cannot be reported without
//!   a host synchronisation: the affected rows' outputs are NaN instead of an error status.
//! - `logits` and `grad_logits` must be aligned to their element size (any framework tensor is).
//! - Nothing is allocated and nothing synchronises: every call is one kernel launch on `stream`.

use super::compile::KernelSource;
use super::device::device;
use super::launch::{launch, Arg, Geometry};
use crate::desc::logits::{Backward, Forward, LogitsInput, ShardFinish, ShardStats};
use crate::desc::Stream;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// The fused logits path (SPEC §6).
pub const LOGITS: KernelSource = KernelSource {
    name: "logits",
    source: include_str!("../../cuda/logits.cu"),
    kernels: &[
        "calibrl_logits_forward_bf16",
        "calibrl_logits_forward_f16",
        "calibrl_logits_forward_f32",
        "calibrl_logits_backward_bf16",
        "calibrl_logits_backward_f16",
        "calibrl_logits_backward_f32",
        "calibrl_logits_shard_stats_bf16",
        "calibrl_logits_shard_stats_f16",
        "calibrl_logits_shard_stats_f32",
        "calibrl_logits_shard_finish",
    ],
};

/// dtype codes of the `[N]` tensors (`CODE_*` in `cuda/logits.cu`).
fn scalar_code(t: &Tensor) -> Result<i32> {
    match t.dtype {
        DType::F32 => Ok(0),
        DType::F64 => Ok(1),
        DType::BF16 => Ok(2),
        DType::F16 => Ok(3),
        other => Err(Error::dtype(
            t.name,
            format!("dtype {} is not a float dtype", other.name()),
        )),
    }
}

fn optional_code(t: &Option<Tensor>) -> Result<i32> {
    t.as_ref().map(scalar_code).unwrap_or(Ok(0))
}

fn ptr(t: &Tensor) -> Arg {
    Arg::Ptr(t.ptr as *const u8)
}

fn optional_ptr(t: &Option<Tensor>) -> Arg {
    Arg::Ptr(
        t.as_ref()
            .map(|t| t.ptr as *const u8)
            .unwrap_or(std::ptr::null()),
    )
}

fn labels_are_i64(input: &LogitsInput) -> Arg {
    Arg::I32((input.labels.dtype == DType::I64) as i32)
}

fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

fn require_element_aligned(t: &Tensor) -> Result<()> {
    if (t.ptr as usize) % t.dtype.size() != 0 {
        return Err(Error::layout(
            t.name,
            format!(
                "data pointer {:p} is not aligned to its {}-byte elements",
                t.ptr,
                t.dtype.size()
            ),
        ));
    }
    Ok(())
}

/// One block per row (grid-strided past 2^31 − 1 rows); the block is just large enough to give
/// every thread four 16-byte vectors of the row, between one warp and 256 threads. Depends only
/// on (N, V, dtype), which keeps the results deterministic. At most 256 threads: the kernels'
/// `__launch_bounds__(256, 4)`.
fn row_geometry(n: usize, v: usize, dtype: DType) -> Geometry {
    let per_vector = 16 / dtype.size();
    let wanted = v.div_ceil(per_vector * 4).next_power_of_two();
    Geometry {
        blocks: n.min(i32::MAX as usize) as u32,
        threads: wanted.clamp(32, 256) as u32,
    }
}

fn i64_arg(name: &str, v: usize) -> Result<Arg> {
    i64::try_from(v)
        .map(Arg::I64)
        .map_err(|_| Error::shape(name, format!("extent {v} does not fit in int64")))
}

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
    let grad_row_stride = if args.in_place() || input.n <= 1 {
        input.row_stride
    } else {
        let s = args.grad_logits.strides[0];
        if s < input.v as isize {
            return Err(Error::layout(
                "grad_logits",
                format!(
                    "row stride {s} is smaller than the vocabulary size {}",
                    input.v
                ),
            ));
        }
        s as usize
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_gives_each_thread_up_to_four_vectors() {
        let g = row_geometry(1000, 152_064, DType::BF16);
        assert_eq!((g.blocks, g.threads), (1000, 256));
        assert_eq!(row_geometry(7, 5, DType::F32).threads, 32);
        assert_eq!(row_geometry(7, 1, DType::BF16).threads, 32);
        assert_eq!(row_geometry(3, 2048, DType::F32).threads, 128);
        assert_eq!(
            row_geometry(usize::MAX / 2, 8, DType::F32).blocks,
            i32::MAX as u32
        );
    }
}
