//! CPU fused logits path. Per row: one online-softmax pass for the forward (max, Σe^(u−m),
//! Σe^(u−m)·(u−m), target), one pass for the backward. Entropy uses the (u − m) form so that
//! large logits (±1e4) do not cancel catastrophically.

use super::parallel::for_row_chunks;
use crate::error::{Error, Result};
use crate::ops::logits::{Backward, Forward, LogitsInput, ShardFinish, ShardStats, STATS_WIDTH};
use crate::tensor::DType;
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

trait Elem: Copy + Send + Sync {
    fn get(self) -> f32;
    fn put(v: f32) -> Self;
}
impl Elem for f32 {
    fn get(self) -> f32 {
        self
    }
    fn put(v: f32) -> Self {
        v
    }
}
impl Elem for bf16 {
    fn get(self) -> f32 {
        self.to_f32()
    }
    fn put(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
impl Elem for f16 {
    fn get(self) -> f32 {
        self.to_f32()
    }
    fn put(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Two-pass per row (the row is in cache for the second): max, then the sums.
fn row_stats<T: Elem>(row: &[T], inv_t: f32, target: Option<usize>) -> RowStats {
    let mut m = f32::NEG_INFINITY;
    let mut bad = false;
    for &z in row {
        let u = z.get() * inv_t;
        if u.is_nan() || u == f32::INFINITY {
            bad = true;
        }
        m = m.max(u);
    }
    let (mut s, mut sc) = (0f64, 0f64);
    if m.is_finite() {
        // Accumulate in f32 blocks of 256 then in f64: fast and accurate enough for V = 256k.
        for chunk in row.chunks(256) {
            let (mut bs, mut bsc) = (0f32, 0f32);
            for &z in chunk {
                let c = z.get() * inv_t - m;
                let e = c.exp();
                bs += e;
                if e > 0.0 {
                    bsc += e * c;
                }
            }
            s += bs as f64;
            sc += bsc as f64;
        }
    } else if m == f32::NEG_INFINITY {
        bad = true; // every logit is -inf: no distribution
    }
    RowStats {
        max: m as f64,
        sum_exp: s,
        sum_exp_centered: sc,
        target: target.map(|y| (row[y].get() * inv_t) as f64).unwrap_or(0.0),
        bad,
    }
}

/// The label's position inside this shard, if any. Errors for labels past the full vocabulary.
fn local_label(
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

unsafe fn rows<'a, T>(input: &LogitsInput, ptr: *mut u8, k: usize) -> &'a mut [T] {
    std::slice::from_raw_parts_mut((ptr as *mut T).add(k * input.row_stride), input.v)
}

fn all_row_stats(input: &LogitsInput, labels: &[i64], full_vocab: bool) -> Result<Vec<RowStats>> {
    let locals: Vec<Option<usize>> = labels
        .iter()
        .enumerate()
        .map(|(k, &y)| local_label(input, y, k, full_vocab))
        .collect::<Result<_>>()?;
    let mut stats = vec![RowStats::default(); input.n];
    let inv_t = (1.0 / input.temperature) as f32;
    let out = SyncPtr(stats.as_mut_ptr());
    let ptr = SyncPtr(input.logits.ptr);
    for_row_chunks(input.n, 16, |b, e| {
        for k in b..e {
            let st = unsafe {
                match input.logits.dtype {
                    DType::BF16 => row_stats(rows::<bf16>(input, ptr.get(), k), inv_t, locals[k]),
                    DType::F16 => row_stats(rows::<f16>(input, ptr.get(), k), inv_t, locals[k]),
                    _ => row_stats(rows::<f32>(input, ptr.get(), k), inv_t, locals[k]),
                }
            };
            unsafe { *out.get().add(k) = st };
        }
    });
    if let Some(k) = stats.iter().position(|s| s.bad) {
        return Err(Error::new(
            crate::error::CalibrlStatus::NonFinite,
            format!("`logits`: row {k} holds NaN or +inf, or is entirely -inf"),
        ));
    }
    Ok(stats)
}

#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

pub fn forward(args: &Forward) -> Result<()> {
    let input = &args.input;
    let labels = input.labels.read_i64()?;
    let stats = all_row_stats(input, &labels, true)?;
    let mut lp = vec![0.0; input.n];
    let mut ent = vec![0.0; input.n];
    let mut lse = vec![0.0; input.n];
    for k in 0..input.n {
        if labels[k] >= 0 {
            lse[k] = stats[k].lse();
            lp[k] = stats[k].target - lse[k];
            ent[k] = stats[k].entropy();
        }
    }
    args.logprobs.write_f64(&lp)?;
    if let Some(e) = &args.entropy {
        e.write_f64(&ent)?;
    }
    args.lse.write_f64(&lse)
}

pub fn shard_stats(args: &ShardStats) -> Result<()> {
    let input = &args.input;
    let labels = input.labels.read_i64()?;
    let stats = all_row_stats(input, &labels, false)?;
    let mut out = Vec::with_capacity(input.n * STATS_WIDTH);
    for s in &stats {
        out.extend([s.max, s.sum_exp, s.sum_exp_centered, s.target]);
    }
    args.stats.write_f64(&out)
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

pub fn shard_finish(args: &ShardFinish) -> Result<()> {
    let labels = args.labels.read_i64()?;
    let raw = args.stats.read_f64()?;
    let (n, r) = (args.n, args.shards);
    let (mut lp, mut ent, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for k in 0..n {
        if labels[k] < 0 {
            continue;
        }
        let rows: Vec<[f64; 4]> = (0..r)
            .map(|s| {
                let o = (s * n + k) * STATS_WIDTH;
                [raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]
            })
            .collect();
        let st = combine(&rows);
        if !(st.max.is_finite() && st.sum_exp > 0.0) || rows.iter().flatten().any(|v| v.is_nan()) {
            return Err(Error::new(
                crate::error::CalibrlStatus::NonFinite,
                format!("`stats`: row {k} has no finite statistics in any shard"),
            ));
        }
        lse[k] = st.lse();
        lp[k] = st.target - lse[k];
        ent[k] = st.entropy();
    }
    args.logprobs.write_f64(&lp)?;
    if let Some(e) = &args.entropy {
        e.write_f64(&ent)?;
    }
    args.lse.write_f64(&lse)
}

/// One row of ∂L/∂z = (1/T)·[g·(δ − p) − h·p·(log p + H)]. `src` and `dst` may be the same
/// memory (in place): each element is read once, before it is written.
unsafe fn backward_row<T: Elem>(src: *const T, dst: *mut T, len: usize, inv_t: f32, row: RowGrad) {
    for v in 0..len {
        let logp = (*src.add(v)).get() * inv_t - row.lse;
        let p = logp.exp();
        let mut d = -row.g * p;
        if row.h != 0.0 && p > 0.0 {
            d -= row.h * p * (logp + row.entropy);
        }
        if Some(v) == row.label {
            d += row.g;
        }
        *dst.add(v) = T::put(d * inv_t);
    }
}

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
    let locals: Vec<Option<usize>> = labels
        .iter()
        .enumerate()
        .map(|(k, &y)| local_label(input, y, k, false))
        .collect::<Result<_>>()?;
    let lse = args.lse.read_finite_f64()?;
    let g = args.grad_logprobs.read_finite_f64()?;
    let h = match &args.grad_entropy {
        Some(t) => t.read_finite_f64()?,
        None => vec![0.0; n],
    };
    let ent = match &args.entropy {
        Some(t) => t.read_finite_f64()?,
        None => vec![0.0; n],
    };
    // Reject NaN/+inf logits before anything is written (the output may alias the input).
    let inv_t = (1.0 / input.temperature) as f32;
    let bad = std::sync::atomic::AtomicUsize::new(usize::MAX);
    let src = SyncPtr(input.logits.ptr);
    for_row_chunks(n, 16, |b, e| {
        for k in b..e {
            let ok = unsafe {
                match input.logits.dtype {
                    DType::BF16 => rows::<bf16>(input, src.get(), k)
                        .iter()
                        .all(|z| !(z.is_nan() || z.to_f32() == f32::INFINITY)),
                    DType::F16 => rows::<f16>(input, src.get(), k)
                        .iter()
                        .all(|z| !(z.is_nan() || z.to_f32() == f32::INFINITY)),
                    _ => rows::<f32>(input, src.get(), k)
                        .iter()
                        .all(|z| !(z.is_nan() || *z == f32::INFINITY)),
                }
            };
            if !ok {
                bad.fetch_min(k, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let bad = bad.into_inner();
    if bad != usize::MAX {
        return Err(Error::new(
            crate::error::CalibrlStatus::NonFinite,
            format!("`logits`: row {bad} holds NaN or +inf"),
        ));
    }
    let dst_stride = if args.in_place() || n <= 1 {
        input.row_stride
    } else {
        args.grad_logits.strides[0] as usize
    };
    let dst = SyncPtr(args.grad_logits.ptr);
    for_row_chunks(n, 16, |b, e| {
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
                            (0..input.v).for_each(|v| *d.add(v) = <$t as Elem>::put(0.0));
                        } else {
                            backward_row::<$t>(s, d, input.v, inv_t, row);
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
    });
    Ok(())
}
