//! The chunk driver of the fused linear path: per chunk of tokens GEMM 1, the per-row step
//! (statistics, ∂L/∂z in place over the logits) and, for gradients, GEMMs 2 and 3.

use super::bounds::{Prepared, TokenGrads};
use super::gemm::{gradient_gemms, hidden_rows, logits_block, min_items, out_of_memory, SyncPtr};
use crate::cpu::fastmath::exp_f32;
use crate::cpu::logits::{row_stats_f32, RowStats};
use crate::cpu::parallel::for_row_chunks_with_scratch;
use crate::desc::linear::{LinearGrads, LinearInput};
use crate::desc::logits::inv_temperature;
use crate::error::{CalibrlStatus, Error, Result};
use crate::tensor::{try_vec, DType};

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

/// What the per-row step of a chunk does.
pub(super) enum RowWork<'s> {
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
pub(super) fn run_pass(
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
        logits_block(input, prep.bias.as_deref(), hid, rows, z)?;
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
pub(super) fn finish_rows(prep: &Prepared, stats: &[RowStats]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = stats.len();
    let (mut lp, mut ent, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for k in (0..n).filter(|&k| prep.labels[k] >= 0) {
        lse[k] = stats[k].lse();
        lp[k] = stats[k].target - lse[k];
        ent[k] = stats[k].entropy();
    }
    (lp, ent, lse)
}
