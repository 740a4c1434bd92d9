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
//! - Nothing is allocated and nothing synchronises: every call is one kernel launch on `stream`
//!   (`forward_backward` on the three-pass path: two).
//! - `forward_backward` (token-local losses, full vocabulary) takes the single-pass kernel where
//!   [`plan`] says it applies: sm_90+ and a row that fits the shared memory of a thread-block
//!   cluster of at most 8 CTAs. Otherwise it runs `forward` then `backward` (three passes over
//!   the logits).

use super::compile::KernelSource;
use super::device::device;
use super::launch::{launch, launch_cluster, Arg, ClusterLaunch, Geometry};
use crate::desc::logits::{
    Backward, Forward, ForwardBackward, LogitsInput, ShardFinish, ShardStats,
};
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
        "calibrl_logits_single_pass_bf16",
        "calibrl_logits_single_pass_f16",
        "calibrl_logits_single_pass_f32",
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

/// Row stride of `grad_logits` in elements (the logits' own in place).
fn grad_row_stride(args: &Backward) -> Result<usize> {
    let input = &args.input;
    if args.in_place() || input.n <= 1 {
        return Ok(input.row_stride);
    }
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
    Ok(s as usize)
}

/// Bytes of the single-pass kernel's shared memory before the row chunk (`CALIBRL_SP_HEADER` in
/// `cuda/logits.cu`: the partials and the CTA reduction's scratch).
const SINGLE_PASS_HEADER: usize = 416;
/// The largest portable thread-block cluster.
const MAX_CLUSTER: usize = 8;

/// How `forward_backward` runs on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsPath {
    /// One kernel: each row read once into the shared memory of a cluster of `cluster` CTAs,
    /// each holding `chunk` elements in `smem_bytes` of dynamic shared memory.
    SinglePass {
        cluster: usize,
        chunk: usize,
        smem_bytes: usize,
    },
    /// `forward` then `backward`.
    ThreePass,
}

/// The path for rows of `v` elements of `dtype` on a device compiled for `arch` (e.g. 90) that
/// lets a block opt into `smem_optin` bytes of dynamic shared memory: the single pass with the
/// smallest cluster (1, 2, 4 or 8 CTAs) whose chunk fits, on sm_90+; else three passes.
pub fn plan(arch: i32, smem_optin: usize, v: usize, dtype: DType) -> LogitsPath {
    if arch < 90 {
        return LogitsPath::ThreePass;
    }
    let (size, per_vector) = (dtype.size(), 16 / dtype.size());
    let mut cluster = 1;
    while cluster <= MAX_CLUSTER {
        let chunk = v.div_ceil(cluster).next_multiple_of(per_vector);
        // + one vector: the chunk sits at its row address mod 16 in shared memory.
        let smem_bytes = SINGLE_PASS_HEADER + (chunk + per_vector) * size;
        if smem_bytes <= smem_optin {
            return LogitsPath::SinglePass {
                cluster,
                chunk,
                smem_bytes,
            };
        }
        cluster *= 2;
    }
    LogitsPath::ThreePass
}

/// The path `forward_backward` takes for `[_, v]` logits of `dtype` on device `ordinal`.
pub fn forward_backward_path(ordinal: i32, v: usize, dtype: DType) -> Result<LogitsPath> {
    let dev = device(ordinal)?;
    Ok(plan(dev.arch, dev.smem_optin, v, dtype))
}

/// Threads per CTA of the single pass: four 16-byte vectors of the chunk per thread, 32 … 1024
/// (the kernel's `__launch_bounds__(1024, 1)`).
fn single_pass_threads(chunk: usize, dtype: DType) -> u32 {
    let per_vector = 16 / dtype.size();
    chunk
        .div_ceil(per_vector * 4)
        .next_power_of_two()
        .clamp(32, 1024) as u32
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
    fn single_pass_only_on_sm90_with_the_smallest_cluster_that_fits() {
        const H100: usize = 227 << 10;
        assert_eq!(plan(80, H100, 1000, DType::BF16), LogitsPath::ThreePass);
        // bf16, 152064: 2 CTAs of 76032 elements (≈ 149 KB each).
        assert_eq!(
            plan(90, H100, 152_064, DType::BF16),
            LogitsPath::SinglePass {
                cluster: 2,
                chunk: 76_032,
                smem_bytes: 416 + (76_032 + 8) * 2
            }
        );
        assert!(matches!(
            plan(90, H100, 262_144, DType::BF16),
            LogitsPath::SinglePass { cluster: 4, .. }
        ));
        assert!(matches!(
            plan(90, H100, 152_064, DType::F32),
            LogitsPath::SinglePass { cluster: 4, .. }
        ));
        assert!(matches!(
            plan(90, H100, 32_000, DType::F16),
            LogitsPath::SinglePass { cluster: 1, .. }
        ));
        // 8 CTAs hold at most 8 · 227 KB.
        assert_eq!(plan(90, H100, 1 << 20, DType::BF16), LogitsPath::ThreePass);
        // Every chunk is a whole number of vectors and the chunks cover the row.
        for v in [1usize, 7, 4099, 100_003] {
            if let LogitsPath::SinglePass { cluster, chunk, .. } = plan(90, 40_000, v, DType::F32) {
                assert_eq!(chunk % 4, 0);
                assert!(cluster * chunk >= v);
                // The next smaller cluster would not fit.
                let half = (cluster / 2).max(1);
                let bigger = v.div_ceil(half).next_multiple_of(4);
                assert!(cluster == 1 || 416 + (bigger + 4) * 4 > 40_000);
            }
        }
    }

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
