//! The GEMMs of the fused linear path on f32 views: GEMM 1 (logits of a chunk into the
//! workspace, threads split V), GEMMs 2 and 3 (`d_hidden`, threads split H; `d_weight`,
//! threads split V), each a series of single-threaded `gemm` crate calls on blocks of the
//! vocabulary; bf16 / f16 operands are converted to f32 a block at a time.

use crate::cpu::parallel::{for_row_chunks, for_row_chunks_with_scratch};
use crate::desc::linear::{LinearGrads, LinearInput};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Weight rows converted to f32 at a time per thread (bf16 / f16 weights).
const VOCAB_BLOCK: usize = 256;
/// Vocabulary rows per GEMM call for f32 weights, so that no single GEMM spans a thread's whole
/// share of V (meant to bound the `gemm` crate's packing buffers; the working memory measured
/// by benchmarks/bench_fused_linear.py did not change measurably with it, see docs/perf.md).
const F32_VOCAB_BLOCK: usize = 2048;

/// Vocabulary rows per GEMM call.
fn vocab_step(input: &LinearInput) -> usize {
    if input.weight.dtype == DType::F32 {
        F32_VOCAB_BLOCK
    } else {
        VOCAB_BLOCK
    }
}
/// At least this many multiply-adds per thread before a GEMM is split.
const MIN_WORK_PER_THREAD: usize = 1 << 18;

#[derive(Clone, Copy)]
pub(super) struct SyncPtr<T>(pub(super) *mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

pub(super) fn out_of_memory(what: &str) -> Error {
    Error::invalid(
        what,
        "working memory for the GEMM blocks could not be allocated",
    )
}

/// Converts `len` elements of a bf16 / f16 / f32 tensor starting at element `offset` to f32.
pub(super) unsafe fn load_f32(t: &Tensor, offset: usize, dst: &mut [f32]) {
    let len = dst.len();
    match t.dtype {
        DType::BF16 => std::slice::from_raw_parts((t.ptr as *const bf16).add(offset), len)
            .convert_to_f32_slice(dst),
        DType::F16 => std::slice::from_raw_parts((t.ptr as *const f16).add(offset), len)
            .convert_to_f32_slice(dst),
        _ => dst.copy_from_slice(std::slice::from_raw_parts(
            (t.ptr as *const f32).add(offset),
            len,
        )),
    }
}

/// A row-major f32 matrix view: element (i, j) at `ptr[i * stride + j]`.
#[derive(Clone, Copy)]
pub(super) struct Mat {
    ptr: *const f32,
    stride: usize,
}
// Read-only views shared by the threads of one GEMM.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}
impl Mat {
    /// (pointer, row stride, column stride) for `sgemm`; a method, so that closures capture
    /// the whole (Sync) view rather than its raw-pointer field.
    fn rows(self) -> (*const f32, usize, usize) {
        (self.ptr, self.stride, 1)
    }
}

/// Rows `v0..v1`, columns `h0..h1` of the weight as f32: the weight itself when it is f32,
/// else converted into `scratch`.
unsafe fn weight_block(
    w: &Tensor,
    stride: usize,
    (v0, v1): (usize, usize),
    (h0, h1): (usize, usize),
    scratch: &mut [f32],
) -> Mat {
    if w.dtype == DType::F32 {
        return Mat {
            ptr: (w.ptr as *const f32).add(v0 * stride + h0),
            stride,
        };
    }
    let width = h1 - h0;
    for (i, v) in (v0..v1).enumerate() {
        load_f32(w, v * stride + h0, &mut scratch[i * width..(i + 1) * width]);
    }
    Mat {
        ptr: scratch.as_ptr(),
        stride: width,
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with explicit (row, column) strides, single-threaded.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize, usize),
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.0.add(i * dst.1 + j * dst.2) = 0.0;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Items per thread so that each thread gets at least `MIN_WORK_PER_THREAD` multiply-adds.
pub(super) fn min_items(work_per_item: usize) -> usize {
    MIN_WORK_PER_THREAD / work_per_item.max(1) + 1
}

/// Scratch for converted weight blocks: only bf16 / f16 weights need it.
fn block_scratch(input: &LinearInput) -> usize {
    if input.weight.dtype == DType::F32 {
        0
    } else {
        VOCAB_BLOCK * input.h
    }
}

/// The chunk's hidden rows as f32: the tensor itself when it is f32, else converted.
pub(super) unsafe fn hidden_rows(
    input: &LinearInput,
    k0: usize,
    rows: usize,
    buf: &mut [f32],
) -> Mat {
    if input.hidden.dtype == DType::F32 {
        return Mat {
            ptr: (input.hidden.ptr as *const f32).add(k0 * input.hidden_stride),
            stride: input.hidden_stride,
        };
    }
    let h = input.h;
    for i in 0..rows {
        load_f32(
            &input.hidden,
            (k0 + i) * input.hidden_stride,
            &mut buf[i * h..(i + 1) * h],
        );
    }
    Mat {
        ptr: buf.as_ptr(),
        stride: h,
    }
}

/// GEMM 1: `z[rows, V] = hidden_rows · weightᵀ (+ bias)` into the workspace.
pub(super) fn logits_block(
    input: &LinearInput,
    bias: Option<&[f32]>,
    hid: Mat,
    rows: usize,
    z: SyncPtr<f32>,
) -> Result<()> {
    let (v, h) = (input.v, input.h);
    for_row_chunks_with_scratch(
        v,
        min_items(rows * h),
        block_scratch(input),
        |b, e, scratch| {
            let step = vocab_step(input);
            let mut v0 = b;
            while v0 < e {
                let v1 = (v0 + step).min(e);
                unsafe {
                    let w = weight_block(
                        &input.weight,
                        input.weight_stride,
                        (v0, v1),
                        (0, h),
                        scratch,
                    );
                    // rhs[k, j] = w[j, k]
                    sgemm(
                        (rows, v1 - v0, h),
                        (z.get().add(v0), v, 1),
                        false,
                        hid.rows(),
                        (w.ptr, 1, w.stride),
                    );
                    if let Some(bias) = bias {
                        for i in 0..rows {
                            let row =
                                std::slice::from_raw_parts_mut(z.get().add(i * v + v0), v1 - v0);
                            for (x, &bb) in row.iter_mut().zip(&bias[v0..v1]) {
                                *x += bb;
                            }
                        }
                    }
                }
                v0 = v1;
            }
        },
    )
    .map_err(|_| out_of_memory("weight"))
}

/// GEMMs 2 and 3 over a block of ∂L/∂z: `d_hidden[k0..k0+rows] = dz · weight`,
/// `d_weight (+)= dzᵀ · hidden_rows`, `d_bias (+)= Σ_rows dz`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gradient_gemms(
    input: &LinearInput,
    grads: &LinearGrads,
    hid: Mat,
    k0: usize,
    rows: usize,
    dz: SyncPtr<f32>,
    d_hidden: SyncPtr<f32>,
    accumulate: bool,
) -> Result<()> {
    let (v, h) = (input.v, input.h);
    for_row_chunks_with_scratch(
        h,
        min_items(rows * v),
        block_scratch(input),
        |h0, h1, scratch| {
            let step = vocab_step(input);
            let mut v0 = 0;
            while v0 < v {
                let v1 = (v0 + step).min(v);
                unsafe {
                    let w = weight_block(
                        &input.weight,
                        input.weight_stride,
                        (v0, v1),
                        (h0, h1),
                        scratch,
                    );
                    sgemm(
                        (rows, h1 - h0, v1 - v0),
                        (d_hidden.get().add(k0 * h + h0), h, 1),
                        v0 > 0,
                        (dz.get().add(v0), v, 1),
                        (w.ptr, w.stride, 1),
                    );
                }
                v0 = v1;
            }
        },
    )
    .map_err(|_| out_of_memory("weight"))?;
    let dw = SyncPtr(grads.d_weight.ptr as *mut f32);
    let db = grads.d_bias.as_ref().map(|t| SyncPtr(t.ptr as *mut f32));
    for_row_chunks(v, min_items(rows * h), |b, e| unsafe {
        let mut v0 = b;
        while v0 < e {
            let v1 = (v0 + F32_VOCAB_BLOCK).min(e);
            // lhs[i, k] = dz[k, v0 + i]
            sgemm(
                (v1 - v0, h, rows),
                (dw.get().add(v0 * h), h, 1),
                accumulate,
                (dz.get().add(v0), 1, v),
                hid.rows(),
            );
            v0 = v1;
        }
        let (v0, v1) = (b, e);
        if let Some(db) = db {
            for j in v0..v1 {
                let s: f32 = (0..rows).map(|i| *dz.get().add(i * v + j)).sum();
                let d = db.get().add(j);
                *d = if accumulate { *d + s } else { s };
            }
        }
    });
    Ok(())
}
