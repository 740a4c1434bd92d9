//! Per-row softmax statistics: one online pass per row (max, Σe^(u−m), Σe^(u−m)·(u−m),
//! target), each shard's labels made local, and shards' statistics combined.

use super::rows::{for_rows_with_scratch, lane_max, rows, Elem, SyncPtr};
use crate::cpu::fastmath::exp_f32;
use crate::desc::logits::{inv_temperature, LogitsInput, STATS_WIDTH};
use crate::error::{Error, Result};
use crate::tensor::{try_vec, DType};
use half::{bf16, f16};

/// Per-row softmax statistics relative to the row max `m` (u = z/T).
#[derive(Clone, Copy, Debug, Default)]
pub struct RowStats {
    pub max: f64,
    pub sum_exp: f64,
    /// Σ e^(u−m)·(u−m)
    pub sum_exp_centered: f64,
    /// u at the label (0 when the label is not in this shard)
    pub target: f64,
    /// A NaN or +inf logit was seen.
    pub bad: bool,
}

impl RowStats {
    pub fn lse(&self) -> f64 {
        self.max + self.sum_exp.ln()
    }
    pub fn entropy(&self) -> f64 {
        self.sum_exp.ln() - self.sum_exp_centered / self.sum_exp
    }
}

/// Statistics of one row: max pass, then a branch-free pass for the sums.
pub(super) fn row_stats<T: Elem>(
    row: &[T],
    inv_t: f32,
    target: Option<usize>,
    u: &mut [f32],
) -> RowStats {
    let u = &mut u[..row.len()];
    {
        T::load_row(row, u);
        let bad = T::any_bad(row);
        u.iter_mut().for_each(|x| *x *= inv_t);
        let m = lane_max(u);
        let (mut s, mut sc) = (0f64, 0f64);
        if m.is_finite() {
            // f32 lane sums over blocks of 1024, accumulated in f64. The centred logit is
            // clamped at −150, where e^c is already 0 in f32, so −inf entries add 0 (not NaN).
            for block in u.chunks(1024) {
                let (mut bs, mut bsc) = ([0f32; 8], [0f32; 8]);
                let chunks = block.chunks_exact(8);
                let tail = chunks.remainder();
                for c8 in chunks {
                    for j in 0..8 {
                        let c = (c8[j] - m).max(-150.0);
                        let e = exp_f32(c);
                        bs[j] += e;
                        bsc[j] += e * c;
                    }
                }
                for &x in tail {
                    let c = (x - m).max(-150.0);
                    let e = exp_f32(c);
                    bs[0] += e;
                    bsc[0] += e * c;
                }
                s += bs.iter().map(|&v| v as f64).sum::<f64>();
                sc += bsc.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        RowStats {
            max: m as f64,
            sum_exp: s,
            sum_exp_centered: sc,
            target: target.map(|y| u[y] as f64).unwrap_or(0.0),
            // m = +inf: a finite logit overflowed f32 once divided by the temperature.
            bad: bad || !m.is_finite(),
        }
    }
}

/// `row_stats` of a float32 row (the fused linear path's logits block, `crate::cpu::linear`).
pub(crate) fn row_stats_f32(
    row: &[f32],
    inv_t: f32,
    target: Option<usize>,
    u: &mut [f32],
) -> RowStats {
    row_stats(row, inv_t, target, u)
}

/// The label's position inside this shard, if any. Errors for labels past the full vocabulary.
pub(super) fn local_label(
    input: &LogitsInput,
    label: i64,
    row: usize,
    full_vocab: bool,
) -> Result<Option<usize>> {
    if label < 0 {
        return Ok(None);
    }
    let local = label - input.vocab_start;
    if full_vocab && (local < 0 || local as usize >= input.v) {
        return Err(Error::invalid(
            "labels",
            format!(
                "row {row}: label {label} is outside the vocabulary [0, {})",
                input.v
            ),
        ));
    }
    Ok((local >= 0 && (local as usize) < input.v).then_some(local as usize))
}

/// Each row's label position inside this shard (working memory requested fallibly).
pub(super) fn local_labels(
    input: &LogitsInput,
    labels: &[i64],
    full_vocab: bool,
) -> Result<Vec<Option<usize>>> {
    let mut locals = try_vec(labels.len(), None, "labels")?;
    for (k, &y) in labels.iter().enumerate() {
        locals[k] = local_label(input, y, k, full_vocab)?;
    }
    Ok(locals)
}

pub(super) fn all_row_stats(
    input: &LogitsInput,
    labels: &[i64],
    full_vocab: bool,
) -> Result<Vec<RowStats>> {
    let locals = local_labels(input, labels, full_vocab)?;
    let mut stats = try_vec(input.n, RowStats::default(), "logits")?;
    let inv_t = inv_temperature(input.temperature);
    let out = SyncPtr(stats.as_mut_ptr());
    let ptr = SyncPtr(input.logits.ptr);
    for_rows_with_scratch(input.n, input.v, |b, e, u| {
        for k in b..e {
            let st = unsafe {
                match input.logits.dtype {
                    DType::BF16 => {
                        row_stats(rows::<bf16>(input, ptr.get(), k), inv_t, locals[k], u)
                    }
                    DType::F16 => row_stats(rows::<f16>(input, ptr.get(), k), inv_t, locals[k], u),
                    _ => row_stats(rows::<f32>(input, ptr.get(), k), inv_t, locals[k], u),
                }
            };
            unsafe { *out.get().add(k) = st };
        }
    })?;
    if let Some(k) = stats.iter().position(|s| s.bad) {
        return Err(Error::new(
            crate::error::CalibrlStatus::NonFinite,
            format!(
                "`logits`: row {k} holds NaN or +inf, is entirely -inf, or overflows float32 \
                 once divided by the temperature"
            ),
        ));
    }
    Ok(stats)
}

/// Rows of statistics as the `[N, 4]` phase-1 tensor holds them (also the fused linear
/// path's, `crate::cpu::linear`).
pub(crate) fn stats_rows(stats: &[RowStats]) -> Result<Vec<f64>> {
    let mut out = try_vec(stats.len() * STATS_WIDTH, 0.0, "stats")?;
    for (k, s) in stats.iter().enumerate() {
        out[k * STATS_WIDTH..(k + 1) * STATS_WIDTH].copy_from_slice(&[
            s.max,
            s.sum_exp,
            s.sum_exp_centered,
            s.target,
        ]);
    }
    Ok(out)
}

/// Combines shard statistics `[R][4]` of one row into global ones.
pub fn combine(shards: &[[f64; 4]]) -> RowStats {
    let m = shards
        .iter()
        .map(|s| s[0])
        .fold(f64::NEG_INFINITY, f64::max);
    let (mut s, mut sc, mut t) = (0.0, 0.0, 0.0);
    for r in shards {
        if r[1] > 0.0 {
            let scale = (r[0] - m).exp();
            s += r[1] * scale;
            sc += (r[2] + r[1] * (r[0] - m)) * scale;
        }
        t += r[3];
    }
    RowStats {
        max: m,
        sum_exp: s,
        sum_exp_centered: sc,
        target: t,
        bad: false,
    }
}
