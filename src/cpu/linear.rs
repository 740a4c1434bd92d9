//! CPU fused linear path (see `crate::desc::linear`). Per chunk of tokens: GEMM 1 writes the
//! float32 logits `[chunk, V]` into the workspace (threads split V), the fused logits arithmetic
//! runs per row (threads split the rows) and, for gradients, turns the block into ∂L/∂z in
//! place; GEMM 2 forms `d_hidden` (threads split H) and GEMM 3 `d_weight` (threads split V).
//! The GEMMs are the `gemm` crate's f32 kernels; bf16 / f16 operands are converted to f32 in
//! blocks of `VOCAB_BLOCK` weight rows per thread, so no f32 copy of the weight is ever made.
//!
//! Every check runs before anything is written. `d_weight` is accumulated chunk by chunk, so
//! its range is proven before the pass: hidden, weight and bias are finite, the logits are
//! bounded by Cauchy–Schwarz, and each element of ∂L/∂z by (1/T)·(|g| + |h|·(1/e + |H|))
//! (p is clamped to ≤ 1).

use super::fastmath::exp_f32;
use super::logits::{row_stats_f32, stats_rows, RowStats};
use super::parallel::{for_row_chunks, for_row_chunks_with_scratch};
use crate::desc::linear::{
    LinearBackward, LinearForward, LinearForwardBackward, LinearGrads, LinearInput,
    LinearShardStats,
};
use crate::desc::logits::inv_temperature;
use crate::error::{CalibrlStatus, Error, Result};
use crate::tensor::{try_vec, write_all, DType, Tensor};
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
struct SyncPtr<T>(*mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

fn out_of_memory(what: &str) -> Error {
    Error::invalid(
        what,
        "working memory for the GEMM blocks could not be allocated",
    )
}

/// Converts `len` elements of a bf16 / f16 / f32 tensor starting at element `offset` to f32.
unsafe fn load_f32(t: &Tensor, offset: usize, dst: &mut [f32]) {
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
struct Mat {
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
fn min_items(work_per_item: usize) -> usize {
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

/// What the pass reads once, before any chunk: labels, bias, per-row bounds.
struct Prepared {
    labels: Vec<i64>,
    /// Label position inside this weight (shard), if any.
    local: Vec<Option<usize>>,
    bias: Option<Vec<f32>>,
    /// max_j |hidden[k, j]|
    hidden_max: Vec<f64>,
    /// max |weight|
    weight_max: f64,
}

/// Norms and largest magnitudes of the rows of a `[rows, h]` tensor, failing on NaN / ±inf:
/// per row into `per_row` (norms, maxima) when given, and their maxima returned either way
/// (the weight needs only those: no `[V]` vectors).
fn scan_rows(
    t: &Tensor,
    rows: usize,
    h: usize,
    stride: usize,
    per_row: Option<(&mut [f64], &mut [f64])>,
) -> Result<(f64, f64)> {
    let bad = std::sync::atomic::AtomicUsize::new(usize::MAX);
    let maxima = std::sync::Mutex::new((0f64, 0f64));
    let out = per_row.map(|(n, m)| (SyncPtr(n.as_mut_ptr()), SyncPtr(m.as_mut_ptr())));
    for_row_chunks_with_scratch(rows, min_items(h), h, |b, e, row| {
        let (mut norm_max, mut abs_max) = (0f64, 0f64);
        for k in b..e {
            unsafe { load_f32(t, k * stride, &mut row[..h]) };
            let (mut s, mut m) = (0f64, 0f32);
            for &x in &row[..h] {
                s += (x as f64) * (x as f64);
                m = m.max(x.abs());
            }
            if !s.is_finite() || row[..h].iter().any(|x| !x.is_finite()) {
                bad.fetch_min(k, std::sync::atomic::Ordering::Relaxed);
            }
            let norm = s.sqrt();
            (norm_max, abs_max) = (norm_max.max(norm), abs_max.max(m as f64));
            if let Some((pn, pm)) = out {
                unsafe {
                    *pn.get().add(k) = norm;
                    *pm.get().add(k) = m as f64;
                }
            }
        }
        let mut g = maxima.lock().unwrap_or_else(|p| p.into_inner());
        *g = (g.0.max(norm_max), g.1.max(abs_max));
    })
    .map_err(|_| out_of_memory(t.name))?;
    let bad = bad.into_inner();
    if bad != usize::MAX {
        return Err(Error::new(
            CalibrlStatus::NonFinite,
            format!("`{}`: row {bad} holds NaN or infinity", t.name),
        ));
    }
    Ok(maxima.into_inner().unwrap_or_else(|p| p.into_inner()))
}

fn prepare(input: &LinearInput, full_vocab: bool) -> Result<Prepared> {
    let labels = input.labels.read_i64()?;
    let mut local = Vec::with_capacity(input.n);
    for (k, &y) in labels.iter().enumerate() {
        let pos = y - input.vocab_start;
        if full_vocab && y >= 0 && (pos < 0 || pos as usize >= input.v) {
            return Err(Error::invalid(
                "labels",
                format!(
                    "row {k}: label {y} is outside the vocabulary [0, {})",
                    input.v
                ),
            ));
        }
        local.push((y >= 0 && pos >= 0 && (pos as usize) < input.v).then_some(pos as usize));
    }
    let bias = match &input.bias {
        Some(b) => Some(
            b.read_finite_f64()?
                .into_iter()
                .map(|x| x as f32)
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    let mut hidden_norm = try_vec(input.n, 0f64, "hidden")?;
    let mut hidden_max = try_vec(input.n, 0f64, "hidden")?;
    let per_row = Some((&mut hidden_norm[..], &mut hidden_max[..]));
    scan_rows(&input.hidden, input.n, input.h, input.hidden_stride, per_row)?;
    let (wn, weight_max) = scan_rows(&input.weight, input.v, input.h, input.weight_stride, None)?;
    let bmax = bias
        .as_ref()
        .map_or(0.0, |b| b.iter().fold(0f64, |a, &x| a.max(x.abs() as f64)));
    // |z| ≤ ‖h_k‖·max‖w_v‖ + max|b| (Cauchy–Schwarz); twice that must stay inside f32 once
    // divided by T, for the f32 GEMM's rounding and the scaling.
    let inv_t = inv_temperature(input.temperature) as f64;
    // Written so that NaN fails too.
    let fits = |k: usize| (hidden_norm[k] * wn + bmax) * inv_t * 2.0 <= f32::MAX as f64;
    if let Some(k) = (0..input.n).find(|&k| !fits(k)) {
        return Err(Error::new(
            CalibrlStatus::NonFinite,
            format!(
                "`hidden`: the logits of row {k} may overflow float32 (‖hidden[{k}]‖ = {:e}, \
                 largest ‖weight row‖ = {wn:e}, temperature {})",
                hidden_norm[k], input.temperature
            ),
        ));
    }
    Ok(Prepared {
        labels,
        local,
        bias,
        hidden_max,
        weight_max,
    })
}

/// The chunk's hidden rows as f32: the tensor itself when it is f32, else converted.
unsafe fn hidden_rows(input: &LinearInput, k0: usize, rows: usize, buf: &mut [f32]) -> Mat {
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
fn logits_block(
    input: &LinearInput,
    prep: &Prepared,
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
                    if let Some(bias) = &prep.bias {
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

/// One row's ∂L/∂z in place over its logits: (1/T)·[g·(δ − p) − h·p·(log p + H)], with
/// p = e^min(u − lse, 0) so that saved statistics that do not match the logits can never push
/// an element past the bound proven before the pass.
fn grad_row(
    z: &mut [f32],
    inv_t: f32,
    lse: f32,
    g: f32,
    h: f32,
    entropy: f32,
    label: Option<usize>,
) {
    for x in z.iter_mut() {
        let logp = (*x * inv_t - lse).clamp(-150.0, 0.0);
        let p = exp_f32(logp);
        *x = (-g * p - h * p * (logp + entropy)) * inv_t;
    }
    if let Some(y) = label {
        z[y] += g * inv_t;
    }
}

/// Per-token inputs of the gradient: g, h and (for the backward) the saved lse and entropy.
struct TokenGrads {
    g: Vec<f64>,
    h: Vec<f64>,
}

/// GEMMs 2 and 3 over a block of ∂L/∂z: `d_hidden[k0..k0+rows] = dz · weight`,
/// `d_weight (+)= dzᵀ · hidden_rows`, `d_bias (+)= Σ_rows dz`.
#[allow(clippy::too_many_arguments)]
fn gradient_gemms(
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

/// Fails unless every gradient element provably stays finite (see the module comment).
/// `entropy_bound[k]` bounds |H_k|.
fn check_gradient_range(
    input: &LinearInput,
    prep: &Prepared,
    tg: &TokenGrads,
    entropy_bound: &dyn Fn(usize) -> f64,
    grads: &LinearGrads,
) -> Result<()> {
    let inv_t = inv_temperature(input.temperature) as f64;
    let margin = 1.01;
    let (mut dw, mut db, mut dh) = (0f64, 0f64, 0f64);
    for k in (0..input.n).filter(|&k| prep.labels[k] >= 0) {
        for (name, x) in [("grad_logprobs", tg.g[k]), ("grad_entropy", tg.h[k])] {
            if !(x as f32).is_finite() {
                return Err(Error::invalid(
                    name,
                    format!("element {k} is {x}, outside the float32 range of the computation"),
                ));
            }
        }
        // Per element of ∂L/∂z, and per row sum (at most V + 1 elements of that size).
        let e = inv_t * (tg.g[k].abs() + tg.h[k].abs() * (0.37 + entropy_bound(k)));
        dw += e * prep.hidden_max[k];
        db += e;
        dh = dh.max(e * (input.v as f64 + 1.0) * prep.weight_max);
    }
    if grads.accumulate {
        // What is accumulated into must be finite (NaN would survive the sum, and `max` skips it).
        dw += max_abs_finite(&grads.d_weight)?;
        if let Some(t) = &grads.d_bias {
            db += max_abs_finite(t)?;
        }
    }
    let dh_max = match grads.d_hidden.dtype {
        DType::F16 => f16::MAX.to_f64(),
        _ => f32::MAX as f64,
    };
    for (name, bound, limit) in [
        ("d_weight", dw, f32::MAX as f64),
        ("d_bias", db, f32::MAX as f64),
        ("d_hidden", dh, dh_max),
    ] {
        let fits = bound * margin <= limit; // false for NaN
        if !fits {
            return Err(Error::new(
                CalibrlStatus::NonFinite,
                format!(
                    "`{name}`: the gradient may reach {bound:e}, beyond the range of its dtype \
                     (check `grad_logprobs`, `grad_entropy`, `entropy`, `temperature`{})",
                    if name == "d_hidden" {
                        "; a float32 d_hidden has a wider range"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// Largest |x| of a contiguous float32 gradient output (validated so by `LinearGrads`), read in
/// place: a float64 copy of `d_weight` would be 8·V·H bytes of working memory.
fn max_abs_finite(t: &Tensor) -> Result<f64> {
    if t.numel() == 0 {
        return Ok(0.0);
    }
    let values = unsafe { std::slice::from_raw_parts(t.ptr as *const f32, t.numel()) };
    let mut max = 0f32;
    for (i, &x) in values.iter().enumerate() {
        if !x.is_finite() {
            return Err(Error::non_finite(t.name, i, x as f64));
        }
        max = max.max(x.abs());
    }
    Ok(max as f64)
}

/// What the per-row step of a chunk does.
enum RowWork<'s> {
    /// Statistics only (forward, shard statistics).
    Stats,
    /// ∂L/∂z from saved lse and entropy (backward).
    Grad {
        lse: &'s [f64],
        entropy: &'s [f64],
        tg: &'s TokenGrads,
    },
    /// Statistics, then ∂L/∂z from them (forward + backward).
    StatsAndGrad { tg: &'s TokenGrads },
}

/// The chunked pass shared by every entry point: per chunk GEMM 1, the row step, and (when
/// `grads` is given) GEMMs 2 and 3. Returns the per-row statistics (default where not computed)
/// and the f32 `d_hidden` `[N, H]` (empty without `grads`).
fn run_pass(
    input: &LinearInput,
    prep: &Prepared,
    work: RowWork,
    grads: Option<&LinearGrads>,
) -> Result<(Vec<RowStats>, Vec<f32>)> {
    let (n, v, h) = (input.n, input.v, input.h);
    let inv_t = inv_temperature(input.temperature);
    let mut stats = try_vec(n, RowStats::default(), "hidden")?;
    let mut d_hidden = try_vec(if grads.is_some() { n * h } else { 0 }, 0f32, "d_hidden")?;
    let mut hbuf = try_vec(
        if input.hidden.dtype == DType::F32 {
            0
        } else {
            input.chunk * h
        },
        0f32,
        "hidden",
    )?;
    let z = SyncPtr(input.workspace.ptr as *mut f32);
    let (st_ptr, dh_ptr) = (SyncPtr(stats.as_mut_ptr()), SyncPtr(d_hidden.as_mut_ptr()));
    let mut k0 = 0;
    while k0 < n {
        let rows = input.chunk.min(n - k0);
        let hid = unsafe { hidden_rows(input, k0, rows, &mut hbuf) };
        logits_block(input, prep, hid, rows, z)?;
        for_row_chunks_with_scratch(rows, min_items(v * 16), v, |b, e, u| {
            for i in b..e {
                let k = k0 + i;
                let row = unsafe { std::slice::from_raw_parts_mut(z.get().add(i * v), v) };
                if prep.labels[k] < 0 {
                    row.fill(0.0);
                    continue;
                }
                let (lse, ent, tg) = match &work {
                    RowWork::Stats => {
                        let st = row_stats_f32(row, inv_t, prep.local[k], u);
                        unsafe { *st_ptr.get().add(k) = st };
                        continue;
                    }
                    RowWork::Grad { lse, entropy, tg } => (lse[k], entropy[k], *tg),
                    RowWork::StatsAndGrad { tg } => {
                        let st = row_stats_f32(row, inv_t, prep.local[k], u);
                        unsafe { *st_ptr.get().add(k) = st };
                        (st.lse(), st.entropy(), *tg)
                    }
                };
                grad_row(
                    row,
                    inv_t,
                    lse as f32,
                    tg.g[k] as f32,
                    tg.h[k] as f32,
                    ent as f32,
                    prep.local[k],
                );
            }
        })
        .map_err(|_| out_of_memory("workspace"))?;
        if let Some(grads) = grads {
            let accumulate = grads.accumulate || k0 > 0;
            gradient_gemms(input, grads, hid, k0, rows, z, dh_ptr, accumulate)?;
        }
        k0 += rows;
    }
    if let Some(grads) = grads {
        if n == 0 && !grads.accumulate {
            // No chunk ran: "overwrite" still means zero (float32, contiguous: validated).
            let outputs = [Some(&grads.d_weight), grads.d_bias.as_ref()];
            for t in outputs.into_iter().flatten().filter(|t| t.numel() > 0) {
                unsafe { std::slice::from_raw_parts_mut(t.ptr as *mut f32, t.numel()) }.fill(0.0);
            }
        }
    }
    if let Some(k) = stats.iter().position(|s| s.bad) {
        // Excluded by the bounds checked in `prepare`: a library bug if it ever happens.
        return Err(Error::new(
            CalibrlStatus::NonFinite,
            format!("`hidden`: row {k} gave non-finite logits"),
        ));
    }
    Ok((stats, d_hidden))
}

/// ℓ, H and lse from the statistics (0 at ignored rows).
fn finish_rows(prep: &Prepared, stats: &[RowStats]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = stats.len();
    let (mut lp, mut ent, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for k in (0..n).filter(|&k| prep.labels[k] >= 0) {
        lse[k] = stats[k].lse();
        lp[k] = stats[k].target - lse[k];
        ent[k] = stats[k].entropy();
    }
    (lp, ent, lse)
}

pub fn forward(args: &LinearForward) -> Result<()> {
    let prep = prepare(&args.input, true)?;
    let (stats, _) = run_pass(&args.input, &prep, RowWork::Stats, None)?;
    let (lp, ent, lse) = finish_rows(&prep, &stats);
    write_all(&[
        (Some(&args.logprobs), &lp),
        (args.entropy.as_ref(), &ent),
        (Some(&args.lse), &lse),
    ])
}

pub fn shard_stats(args: &LinearShardStats) -> Result<()> {
    let prep = prepare(&args.input, false)?;
    let (stats, _) = run_pass(&args.input, &prep, RowWork::Stats, None)?;
    write_all(&[(Some(&args.stats), &stats_rows(&stats)?)])
}

fn read_or_zero(t: &Option<Tensor>, n: usize, name: &str) -> Result<Vec<f64>> {
    match t {
        Some(t) => t.read_finite_f64(),
        None => try_vec(n, 0.0, name),
    }
}

/// Writes `d_hidden` from the f32 buffer (after `d_weight`, which the pass wrote in place).
fn write_d_hidden(grads: &LinearGrads, dh: &[f32]) -> Result<()> {
    let mut vals = try_vec(dh.len(), 0f64, "d_hidden")?;
    for (o, &x) in vals.iter_mut().zip(dh) {
        *o = x as f64;
    }
    grads.d_hidden.write_f64(&vals)
}

pub fn backward(args: &LinearBackward) -> Result<()> {
    let input = &args.input;
    let prep = prepare(input, false)?;
    let n = input.n;
    let lse = args.lse.read_finite_f64()?;
    let entropy = read_or_zero(&args.entropy, n, "entropy")?;
    let tg = TokenGrads {
        g: args.grad_logprobs.read_finite_f64()?,
        h: read_or_zero(&args.grad_entropy, n, "grad_entropy")?,
    };
    for k in (0..n).filter(|&k| prep.labels[k] >= 0) {
        for (name, x) in [("lse", lse[k]), ("entropy", entropy[k])] {
            if !(x as f32).is_finite() {
                return Err(Error::invalid(
                    name,
                    format!("element {k} is {x}, outside the float32 range of the computation"),
                ));
            }
        }
    }
    check_gradient_range(input, &prep, &tg, &|k| entropy[k].abs(), &args.grads)?;
    let work = RowWork::Grad {
        lse: &lse,
        entropy: &entropy,
        tg: &tg,
    };
    let (_, dh) = run_pass(input, &prep, work, Some(&args.grads))?;
    write_d_hidden(&args.grads, &dh)
}

pub fn forward_backward(args: &LinearForwardBackward) -> Result<()> {
    let input = &args.input;
    let prep = prepare(input, true)?;
    let n = input.n;
    let tg = TokenGrads {
        g: args.grad_logprobs.read_finite_f64()?,
        h: read_or_zero(&args.grad_entropy, n, "grad_entropy")?,
    };
    // 0 ≤ H ≤ ln V (up to rounding).
    let h_max = (input.v as f64).ln() + 1.0;
    check_gradient_range(input, &prep, &tg, &|_| h_max, &args.grads)?;
    let (stats, dh) = run_pass(
        input,
        &prep,
        RowWork::StatsAndGrad { tg: &tg },
        Some(&args.grads),
    )?;
    let (lp, ent, lse) = finish_rows(&prep, &stats);
    write_d_hidden(&args.grads, &dh)?;
    write_all(&[
        (Some(&args.logprobs), &lp),
        (args.entropy.as_ref(), &ent),
        (args.lse.as_ref(), &lse),
    ])
}
