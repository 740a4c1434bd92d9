//! What runs before any chunk of the fused linear path: inputs read and scanned (finite,
//! logits provably inside float32), and the proof that every gradient element stays finite,
//! so that nothing is written when a call fails.

use super::gemm::{load_f32, min_items, out_of_memory, SyncPtr};
use crate::cpu::parallel::for_row_chunks_with_scratch;
use crate::desc::linear::{LinearGrads, LinearInput};
use crate::desc::logits::inv_temperature;
use crate::error::{CalibrlStatus, Error, Result};
use crate::tensor::{try_vec, DType, Tensor};
use half::f16;

/// What the pass reads once, before any chunk: labels, bias, per-row bounds.
pub(super) struct Prepared {
    pub(super) labels: Vec<i64>,
    /// Label position inside this weight (shard), if any.
    pub(super) local: Vec<Option<usize>>,
    pub(super) bias: Option<Vec<f32>>,
    /// max_j |hidden[k, j]|
    pub(super) hidden_max: Vec<f64>,
    /// max |weight|
    pub(super) weight_max: f64,
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

pub(super) fn prepare(input: &LinearInput, full_vocab: bool) -> Result<Prepared> {
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
    scan_rows(
        &input.hidden,
        input.n,
        input.h,
        input.hidden_stride,
        per_row,
    )?;
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

/// Per-token inputs of the gradient: g, h and (for the backward) the saved lse and entropy.
pub(super) struct TokenGrads {
    pub(super) g: Vec<f64>,
    pub(super) h: Vec<f64>,
}

/// Fails unless every gradient element provably stays finite (see the module comment).
/// `entropy_bound[k]` bounds |H_k|.
pub(super) fn check_gradient_range(
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
