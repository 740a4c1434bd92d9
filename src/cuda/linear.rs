//! The fused linear path on CUDA: per chunk of tokens, cuBLAS writes the chunk's logits
//! `z = hidden·weightᵀ (+ bias)` into the caller's workspace in the input dtype (f32
//! accumulation; tensor cores for bf16 / f16), the fused logits kernels (`super::logits`) turn
//! the chunk into ℓ, H and lse or, in place, into ∂L/∂z, and cuBLAS forms
//! `d_hidden = ∂L/∂z · weight` and `d_weight (+)= (∂L/∂z)ᵀ · hidden` from it (`d_bias` as
//! `(∂L/∂z)ᵀ · 1`). The workspace layout is [`crate::desc::linear::cuda_workspace`].
//!
//! Same conventions as the CPU backend (`crate::cpu::linear`), with these CUDA rules:
//! - The logits block is in the input dtype, as a materialised bf16 / f16 logits tensor would
//!   be (the CPU backend keeps it in f32): bf16 / f16 results differ from the CPU's by that
//!   rounding. ∂L/∂z is rounded to the same dtype before the gradient GEMMs.
//! - `d_hidden` is float32, or the inputs' dtype when that is bf16 / f16 (what cuBLAS writes).
//! - Checks that need the data (finite inputs, the overflow bounds, labels past the vocabulary
//!   in the full-vocabulary calls, finite `d_weight` when accumulating) would need a host
//!   synchronisation: as in the logits path, NaN / ±inf propagate into the affected outputs
//!   instead of an error status.
//! - Everything runs on the caller's stream: no allocation, no synchronisation, deterministic
//!   (fixed chunking, the logits kernels' fixed reduction order, cuBLAS's reproducibility), so a
//!   call can be captured in a CUDA graph after one un-captured call (compiles the kernels,
//!   loads cuBLAS and creates its handle).

use super::cublas::{Gemm, Op, Operand, Session};
use super::device::{device, driver_error};
use crate::desc::linear::{
    cuda_workspace, CudaWorkspace, LinearBackward, LinearForward, LinearForwardBackward,
    LinearGrads, LinearInput, LinearShardStats, CUBLAS_WORKSPACE_BYTES,
};
use crate::desc::logits::{Backward, Forward, LogitsInput, ShardStats};
use crate::desc::Stream;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use cudarc::driver::sys;

/// Rows `k0..k0 + rows` of a contiguous `[N, …]` tensor.
fn rows_of<'a>(t: &Tensor<'a>, k0: usize, rows: usize) -> Tensor<'a> {
    let width: usize = t.shape[1..].iter().product();
    let mut view = t.clone();
    // SAFETY: k0 + rows ≤ N: the view stays inside the tensor.
    view.ptr = unsafe { t.ptr.add(k0 * width * t.dtype.size()) };
    view.shape[0] = rows;
    view
}

fn operand(t: &Tensor, ld: usize) -> Operand {
    Operand {
        ptr: t.ptr,
        dtype: t.dtype,
        ld,
    }
}

fn require_element_aligned(t: &Tensor) -> Result<()> {
    if (t.ptr as usize) % t.dtype.size() != 0 {
        return Err(Error::layout(
            t.name,
            format!("data pointer {:p} is not aligned to its elements", t.ptr),
        ));
    }
    Ok(())
}

/// The gradient outputs' CUDA rules (checked before anything is queued).
fn check_grads(input: &LinearInput, grads: &LinearGrads) -> Result<()> {
    let dtype = input.hidden.dtype;
    let dh = grads.d_hidden.dtype;
    if !(dh == DType::F32 || (dh == dtype && dtype != DType::F32)) {
        return Err(Error::dtype(
            "d_hidden",
            format!(
                "is {} but on CUDA it must be float32 or the hidden states' dtype ({}), \
                 what cuBLAS writes",
                dh.name(),
                dtype.name()
            ),
        ));
    }
    for t in [
        Some(&grads.d_hidden),
        Some(&grads.d_weight),
        grads.d_bias.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        require_element_aligned(t)?;
    }
    Ok(())
}

/// One call's state: the device's context made current, the cuBLAS handle bound to the
/// caller's stream and workspace, and the workspace layout.
struct Pass<'i, 'a> {
    input: &'i LinearInput<'a>,
    layout: CudaWorkspace,
    ordinal: i32,
    stream: Stream,
    blas: Session,
    // Dropped last: pops the context.
    _ctx: super::device::ContextGuard,
}

impl<'i, 'a> Pass<'i, 'a> {
    fn new(input: &'i LinearInput<'a>, ordinal: i32, stream: Stream) -> Result<Self> {
        for t in [
            Some(&input.hidden),
            Some(&input.weight),
            input.bias.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            require_element_aligned(t)?;
        }
        let layout = cuda_workspace(input.chunk, input.v, input.hidden.dtype)?;
        let dev = device(ordinal)?;
        let ctx = dev.activate()?;
        let base = input.workspace.ptr as usize + layout.cublas;
        let cublas_ws = base.next_multiple_of(256) as *mut u8;
        let blas = Session::open(dev, ordinal, stream, cublas_ws, CUBLAS_WORKSPACE_BYTES)?;
        Ok(Pass {
            input,
            layout,
            ordinal,
            stream,
            blas,
            _ctx: ctx,
        })
    }

    fn at(&self, offset: usize) -> *mut u8 {
        // SAFETY: offsets of the layout lie inside the validated workspace.
        unsafe { self.input.workspace.ptr.add(offset) }
    }

    /// The vector of ones `[chunk]` in the input dtype (bias broadcast, `d_bias`).
    fn fill_ones(&self) -> Result<()> {
        let p = self.at(self.layout.ones) as sys::CUdeviceptr;
        let (n, s) = (self.input.chunk, self.stream as sys::CUstream);
        // SAFETY: `chunk` elements at the layout's `ones` offset of the caller's workspace.
        let r = unsafe {
            match self.input.hidden.dtype {
                DType::BF16 => sys::cuMemsetD16Async(p, 0x3f80, n, s),
                DType::F16 => sys::cuMemsetD16Async(p, 0x3c00, n, s),
                _ => sys::cuMemsetD32Async(p, 1f32.to_bits(), n, s),
            }
        };
        r.result()
            .map_err(|e| driver_error("cuMemsetAsync (fused linear ones)", e))
    }

    fn ones(&self, ld: usize) -> Operand {
        Operand {
            ptr: self.at(self.layout.ones),
            dtype: self.input.hidden.dtype,
            ld,
        }
    }

    /// f32 `[chunk]` scratch at `offset`, as rows `k0..` of an `[N]` tensor would be.
    fn scratch(&self, offset: usize, name: &'static str, rows: usize) -> Tensor<'a> {
        let mut t = self.input.labels.clone();
        t.name = name;
        t.ptr = self.at(offset);
        t.dtype = DType::F32;
        t.device = self.input.workspace.device;
        t.shape = vec![rows];
        t.strides = vec![1];
        t
    }

    /// GEMM 1: rows `k0..k0 + rows` of the logits into the workspace, as the logits tensor of
    /// those rows.
    fn logits(&self, k0: usize, rows: usize) -> Result<LogitsInput<'a>> {
        let input = self.input;
        let (v, h, ld) = (input.v, input.h, self.layout.ld);
        let dtype = input.hidden.dtype;
        let z = Operand {
            ptr: self.at(0),
            dtype,
            ld,
        };
        if let Some(bias) = &input.bias {
            // z[:, row] = bias (a rank-1 product with the ones), then += hidden·weightᵀ.
            self.blas.gemm(
                "bias",
                &Gemm {
                    ops: (Op::N, Op::N),
                    mnk: (v, rows, 1),
                    a: operand(bias, v),
                    b: self.ones(1),
                    c: z,
                    beta: 0.0,
                },
            )?;
        }
        let hidden = rows_of(&input.hidden, k0, rows);
        // Column-major: zᵀ[V, rows] = (weight as [H, V])ᵀ · (hidden rows as [H, rows]).
        self.blas.gemm(
            "logits = hidden·weightᵀ",
            &Gemm {
                ops: (Op::T, Op::N),
                mnk: (v, rows, h),
                a: operand(&input.weight, input.weight_stride),
                b: operand(&hidden, input.hidden_stride),
                c: z,
                beta: if input.bias.is_some() { 1.0 } else { 0.0 },
            },
        )?;
        let mut t = input.workspace.clone();
        t.name = "workspace";
        t.dtype = dtype;
        t.shape = vec![rows, v];
        t.strides = vec![ld as isize, 1];
        LogitsInput::new(
            t,
            rows_of(&input.labels, k0, rows),
            input.temperature,
            input.vocab_start,
        )
    }

    /// GEMMs 2 and 3 (and `d_bias`) from the chunk's ∂L/∂z in the workspace.
    fn gradient_gemms(&self, grads: &LinearGrads, k0: usize, rows: usize) -> Result<()> {
        let input = self.input;
        let (v, h, ld) = (input.v, input.h, self.layout.ld);
        let dz = Operand {
            ptr: self.at(0),
            dtype: input.hidden.dtype,
            ld,
        };
        let beta = if grads.accumulate || k0 > 0 { 1.0 } else { 0.0 };
        let hidden = rows_of(&input.hidden, k0, rows);
        // d_hiddenᵀ[H, rows] = (weight as [H, V]) · dzᵀ[V, rows]
        self.blas.gemm(
            "d_hidden = dz·weight",
            &Gemm {
                ops: (Op::N, Op::N),
                mnk: (h, rows, v),
                a: operand(&input.weight, input.weight_stride),
                b: dz,
                c: operand(&rows_of(&grads.d_hidden, k0, rows), h),
                beta: 0.0,
            },
        )?;
        // d_weightᵀ[H, V] (+)= (hidden rows as [H, rows]) · (dzᵀ[V, rows])ᵀ
        self.blas.gemm(
            "d_weight += dzᵀ·hidden",
            &Gemm {
                ops: (Op::N, Op::T),
                mnk: (h, v, rows),
                a: operand(&hidden, input.hidden_stride),
                b: dz,
                c: operand(&grads.d_weight, h),
                beta,
            },
        )?;
        if let Some(db) = &grads.d_bias {
            // d_bias[V] (+)= dzᵀ[V, rows] · 1[rows]
            self.blas.gemm(
                "d_bias += dzᵀ·1",
                &Gemm {
                    ops: (Op::N, Op::N),
                    mnk: (v, 1, rows),
                    a: dz,
                    b: self.ones(rows),
                    c: operand(db, v),
                    beta,
                },
            )?;
        }
        Ok(())
    }

    /// Chunks `(k0, rows)` in order.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (n, c) = (self.input.n, self.input.chunk);
        (0..n).step_by(c).map(move |k0| (k0, c.min(n - k0)))
    }

    /// Fills the ones and zeroes `d_weight` / `d_bias` for an overwrite with no tokens (no
    /// chunk runs then).
    fn prepare_grads(&self, grads: &LinearGrads) -> Result<()> {
        if self.input.bias.is_some() {
            self.fill_ones()?;
        }
        if self.input.n == 0 && !grads.accumulate {
            for t in [Some(&grads.d_weight), grads.d_bias.as_ref()]
                .into_iter()
                .flatten()
            {
                // SAFETY: the whole (contiguous, validated) tensor.
                unsafe {
                    sys::cuMemsetD8Async(
                        t.ptr as sys::CUdeviceptr,
                        0,
                        t.numel() * 4,
                        self.stream as sys::CUstream,
                    )
                }
                .result()
                .map_err(|e| driver_error("cuMemsetD8Async (fused linear zero)", e))?;
            }
        }
        Ok(())
    }
}

/// A pass without gradients: GEMM 1, then `kernel` on each chunk's logits.
fn statistics_pass<'a>(
    input: &LinearInput<'a>,
    ordinal: i32,
    stream: Stream,
    kernel: impl Fn(LogitsInput<'a>, usize, usize) -> Result<()>,
) -> Result<()> {
    let pass = Pass::new(input, ordinal, stream)?;
    if input.bias.is_some() {
        pass.fill_ones()?;
    }
    for (k0, rows) in pass.chunks() {
        kernel(pass.logits(k0, rows)?, k0, rows)?;
    }
    Ok(())
}

pub fn forward(args: &LinearForward, ordinal: i32, stream: Stream) -> Result<()> {
    statistics_pass(&args.input, ordinal, stream, |input, k0, rows| {
        let f = Forward {
            input,
            logprobs: rows_of(&args.logprobs, k0, rows),
            entropy: args.entropy.as_ref().map(|t| rows_of(t, k0, rows)),
            lse: rows_of(&args.lse, k0, rows),
        };
        super::logits::forward(&f, ordinal, stream)
    })
}

pub fn shard_stats(args: &LinearShardStats, ordinal: i32, stream: Stream) -> Result<()> {
    statistics_pass(&args.input, ordinal, stream, |input, k0, rows| {
        let s = ShardStats {
            input,
            stats: rows_of(&args.stats, k0, rows),
        };
        super::logits::shard_stats(&s, ordinal, stream)
    })
}

pub fn backward(args: &LinearBackward, ordinal: i32, stream: Stream) -> Result<()> {
    check_grads(&args.input, &args.grads)?;
    let pass = Pass::new(&args.input, ordinal, stream)?;
    pass.prepare_grads(&args.grads)?;
    for (k0, rows) in pass.chunks() {
        let input = pass.logits(k0, rows)?;
        let grad_logits = input.logits.clone();
        let b = Backward {
            input,
            lse: rows_of(&args.lse, k0, rows),
            entropy: args.entropy.as_ref().map(|t| rows_of(t, k0, rows)),
            grad_logprobs: rows_of(&args.grad_logprobs, k0, rows),
            grad_entropy: args.grad_entropy.as_ref().map(|t| rows_of(t, k0, rows)),
            grad_logits,
        };
        super::logits::backward(&b, pass.ordinal, pass.stream)?;
        pass.gradient_gemms(&args.grads, k0, rows)?;
    }
    Ok(())
}

/// Whether the backward can read a per-token output as written (f32 / f64 hold the kernels'
/// f32 values exactly; a bf16 output would round them).
fn exact(t: &Option<Tensor>) -> bool {
    t.as_ref()
        .is_some_and(|t| matches!(t.dtype, DType::F32 | DType::F64))
}

pub fn forward_backward<'a>(
    args: &LinearForwardBackward<'a>,
    ordinal: i32,
    stream: Stream,
) -> Result<()> {
    check_grads(&args.input, &args.grads)?;
    let pass = Pass::new(&args.input, ordinal, stream)?;
    pass.prepare_grads(&args.grads)?;
    let layout = pass.layout;
    for (k0, rows) in pass.chunks() {
        let view = |t: &Option<Tensor<'a>>| t.as_ref().map(|t| rows_of(t, k0, rows));
        // The backward reads lse and entropy at f32 precision: the caller's outputs when they
        // hold it, else the workspace's scratch.
        let lse = match exact(&args.lse) {
            true => view(&args.lse).unwrap(),
            false => pass.scratch(layout.lse, "lse", rows),
        };
        let entropy = match exact(&args.entropy) {
            true => view(&args.entropy).unwrap(),
            false => pass.scratch(layout.entropy, "entropy", rows),
        };
        let input = pass.logits(k0, rows)?;
        let rounded_outputs = (args.lse.is_some() && !exact(&args.lse))
            || (args.entropy.is_some() && !exact(&args.entropy));
        if rounded_outputs {
            // The caller's bf16 outputs: the same kernel, the same f32 values, rounded.
            let f = Forward {
                input: LogitsInput::new(
                    input.logits.clone(),
                    input.labels.clone(),
                    input.temperature,
                    0,
                )?,
                logprobs: rows_of(&args.logprobs, k0, rows),
                entropy: view(&args.entropy),
                lse: view(&args.lse).unwrap_or_else(|| lse.clone()),
            };
            super::logits::forward(&f, pass.ordinal, pass.stream)?;
        }
        let f = Forward {
            input: LogitsInput::new(
                input.logits.clone(),
                input.labels.clone(),
                input.temperature,
                0,
            )?,
            logprobs: rows_of(&args.logprobs, k0, rows),
            entropy: Some(entropy.clone()),
            lse: lse.clone(),
        };
        super::logits::forward(&f, pass.ordinal, pass.stream)?;
        let grad_logits = input.logits.clone();
        let b = Backward {
            input,
            lse,
            entropy: Some(entropy),
            grad_logprobs: rows_of(&args.grad_logprobs, k0, rows),
            grad_entropy: view(&args.grad_entropy),
            grad_logits,
        };
        super::logits::backward(&b, pass.ordinal, pass.stream)?;
        pass.gradient_gemms(&args.grads, k0, rows)?;
    }
    Ok(())
}
