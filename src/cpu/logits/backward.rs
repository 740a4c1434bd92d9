//! The backward: ∂/∂z of the loss from the upstream gradients of log-prob and entropy, in
//! the logits' dtype (in place allowed).

use super::rows::{for_rows_with_scratch, lane_max, rows, rows_per_thread, Elem, SyncPtr};
use super::stats::local_labels;
use crate::cpu::fastmath::exp_f32;
use crate::cpu::parallel::for_row_chunks;
use crate::desc::logits::{inv_temperature, Backward};
use crate::error::{Error, Result};
use crate::tensor::{try_vec, DType};
use half::{bf16, f16};

#[derive(Clone, Copy)]
struct RowGrad {
    lse: f32,
    g: f32,
    h: f32,
    entropy: f32,
    label: Option<usize>,
}

pub fn backward(args: &Backward) -> Result<()> {
    let input = &args.input;
    let n = input.n;
    let labels = input.labels.read_i64()?;
    let locals = local_labels(input, &labels, false)?;
    let lse = args.lse.read_finite_f64()?;
    let g = args.grad_logprobs.read_finite_f64()?;
    let h = match &args.grad_entropy {
        Some(t) => t.read_finite_f64()?,
        None => try_vec(n, 0.0, "grad_entropy")?,
    };
    let ent = match &args.entropy {
        Some(t) => t.read_finite_f64()?,
        None => try_vec(n, 0.0, "entropy")?,
    };
    // Before anything is written (the output may alias the input): reject NaN/+inf logits,
    // and find each row's largest scaled logit to bound its gradient.
    let inv_t = inv_temperature(input.temperature);
    let mut row_max = try_vec(n, 0f32, "logits")?;
    let bad = std::sync::atomic::AtomicUsize::new(usize::MAX);
    let src = SyncPtr(input.logits.ptr);
    let maxes = SyncPtr(row_max.as_mut_ptr());
    // One read of the row, no conversion into a scratch row.
    fn scan<T: Elem>(row: &[T], inv_t: f32) -> (bool, f32) {
        (T::any_bad(row), lane_max(row) * inv_t)
    }
    for_row_chunks(n, rows_per_thread(input.v), |b, e| {
        for k in b..e {
            let (is_bad, m) = unsafe {
                match input.logits.dtype {
                    DType::BF16 => scan(rows::<bf16>(input, src.get(), k), inv_t),
                    DType::F16 => scan(rows::<f16>(input, src.get(), k), inv_t),
                    _ => scan(rows::<f32>(input, src.get(), k), inv_t),
                }
            };
            if is_bad {
                bad.fetch_min(k, std::sync::atomic::Ordering::Relaxed);
            }
            unsafe { *maxes.get().add(k) = m };
        }
    });
    let bad = bad.into_inner();
    if bad != usize::MAX {
        return Err(Error::new(
            crate::error::CalibrlStatus::NonFinite,
            format!("`logits`: row {bad} holds NaN or +inf"),
        ));
    }
    for k in (0..n).filter(|&k| labels[k] >= 0) {
        gradient_fits(
            k,
            row_max[k],
            lse[k],
            g[k],
            h[k],
            ent[k],
            inv_t,
            input.logits.dtype,
        )?;
    }
    let dst_stride = if args.in_place() || n <= 1 {
        input.row_stride
    } else {
        args.grad_logits.strides[0] as usize
    };
    let dst = SyncPtr(args.grad_logits.ptr);
    for_rows_with_scratch(n, input.v, |b, e, u| {
        for k in b..e {
            let row = RowGrad {
                lse: lse[k] as f32,
                g: g[k] as f32,
                h: h[k] as f32,
                entropy: ent[k] as f32,
                label: locals[k],
            };
            let ignored = labels[k] < 0;
            unsafe {
                macro_rules! run {
                    ($t:ty) => {{
                        let s = (src.get() as *const $t).add(k * input.row_stride);
                        let d = (dst.get() as *mut $t).add(k * dst_stride);
                        if ignored {
                            let z = &mut u[..input.v];
                            z.fill(0.0);
                            <$t as Elem>::store_row(z, std::slice::from_raw_parts_mut(d, input.v));
                        } else {
                            backward_row::<$t>(s, d, input.v, inv_t, row, u);
                        }
                    }};
                }
                match input.logits.dtype {
                    DType::BF16 => run!(bf16),
                    DType::F16 => run!(f16),
                    _ => run!(f32),
                }
            }
        }
    })
}

/// Fails unless row `k`'s gradient ∂L/∂z stays finite in f32 and in the output dtype. With
/// p ≤ P = e^(u_max − lse) and p·|log p| ≤ P·|u_max − lse| + 1/e, every element is at most
/// (1/T)·[|g|·(P + 1) + |h|·(P·(|u_max − lse| + |H|) + 1/e)].
#[allow(clippy::too_many_arguments)]
fn gradient_fits(
    k: usize,
    u_max: f32,
    lse: f64,
    g: f64,
    h: f64,
    entropy: f64,
    inv_t: f32,
    dtype: DType,
) -> Result<()> {
    let overflow = |what: String| {
        Err(Error::new(
            crate::error::CalibrlStatus::NonFinite,
            format!("`grad_logits`: row {k}: {what}"),
        ))
    };
    // The row's parameters enter the f32 computation: each must be a finite f32 there.
    for (name, v) in [
        ("lse", lse),
        ("grad_logprobs", g),
        ("grad_entropy", h),
        ("entropy", entropy),
    ] {
        if !(v as f32).is_finite() {
            return Err(Error::invalid(
                name,
                format!("element {k} is {v}, outside the float32 range of the computation"),
            ));
        }
    }
    if !u_max.is_finite() {
        return overflow(format!(
            "logits / temperature (max {u_max}) is not a finite float32"
        ));
    }
    let l = u_max as f64 - lse as f32 as f64;
    let p = l.max(-150.0).exp();
    let inner = g.abs() * (p + 1.0) + h.abs() * (p * (l.abs() + entropy.abs()) + 0.37);
    let out_max = match dtype {
        DType::F16 => f16::MAX.to_f64(),
        DType::BF16 => bf16::MAX.to_f64(),
        _ => f32::MAX as f64,
    };
    // 1e-3: room for the f32 rounding of the computation itself.
    let margin = 1.0 + 1e-3;
    if !(inner * margin <= f32::MAX as f64 && inner * inv_t as f64 * margin <= out_max) {
        return overflow(format!(
            "the gradient may reach {:e}, beyond the {} range (check `lse`, `grad_logprobs`, \
             `grad_entropy`, `entropy` and `temperature`)",
            inner * inv_t as f64,
            dtype.name()
        ));
    }
    Ok(())
}

/// One row of ∂L/∂z = (1/T)·[g·(δ − p) − h·p·(log p + H)]. `src` and `dst` may be the same
/// memory (in place): the row is copied to a scratch buffer before anything is written.
unsafe fn backward_row<T: Elem>(
    src: *const T,
    dst: *mut T,
    len: usize,
    inv_t: f32,
    row: RowGrad,
    u: &mut [f32],
) {
    let u = &mut u[..len];
    {
        T::load_row(std::slice::from_raw_parts(src, len), u);
        let (g, h, lse, ent) = (row.g, row.h, row.lse, row.entropy);
        for x in u.iter_mut() {
            let logp = (*x * inv_t - lse).max(-150.0);
            let p = exp_f32(logp);
            *x = (-g * p - h * p * (logp + ent)) * inv_t;
        }
        if let Some(y) = row.label {
            u[y] += g * inv_t;
        }
        T::store_row(u, std::slice::from_raw_parts_mut(dst, len));
    }
}
