//! CPU fused logits path. Per row: one online-softmax pass for the forward (max, Σe^(u−m),
//! Σe^(u−m)·(u−m), target), one pass for the backward. Entropy uses the (u − m) form so that
//! large logits (±1e4) do not cancel catastrophically.

use super::fastmath::exp_f32;
use super::parallel::{for_row_chunks, for_row_chunks_with_scratch};
use crate::desc::logits::{
    inv_temperature, Backward, Forward, LogitsInput, ShardFinish, ShardStats, STATS_WIDTH,
};
use crate::error::{Error, Result};
use crate::tensor::{try_vec, write_all, DType};
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

/// Logit element types: bulk conversion of a row to and from f32 (vectorised by `half`).
trait Elem: Copy + Send + Sync {
    fn load_row(src: &[Self], dst: &mut [f32]);
    fn store_row(src: &[f32], dst: &mut [Self]);
    /// NaN or +inf (−inf is allowed: a masked vocabulary entry).
    fn any_bad(row: &[Self]) -> bool;
    fn to_f32(self) -> f32;
}
impl Elem for f32 {
    fn load_row(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn store_row(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }
    fn any_bad(row: &[Self]) -> bool {
        row.iter()
            .fold(false, |bad, &x| bad | (x.is_nan() | (x == f32::INFINITY)))
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    fn load_row(src: &[Self], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    fn store_row(src: &[f32], dst: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
    fn any_bad(row: &[Self]) -> bool {
        // Exponent all ones with any mantissa (NaN), or exactly +inf.
        row.iter().fold(false, |bad, x| {
            let b = x.to_bits();
            bad | ((b & 0x7fff) > 0x7f80) | (b == 0x7f80)
        })
    }
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}
impl Elem for f16 {
    fn load_row(src: &[Self], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    fn store_row(src: &[f32], dst: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
    fn any_bad(row: &[Self]) -> bool {
        row.iter().fold(false, |bad, x| {
            let b = x.to_bits();
            bad | ((b & 0x7fff) > 0x7c00) | (b == 0x7c00)
        })
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// The error when a scratch row of `v` logits cannot be allocated.
fn scratch_error(v: usize) -> Error {
    Error::invalid(
        "logits",
        format!("a working row of {v} vocabulary entries cannot be allocated"),
    )
}

/// Row chunks in parallel, each with a scratch row of `v` f32 (allocated before any row is
/// touched; an allocation failure is an error, not an abort).
fn for_rows_with_scratch(
    n: usize,
    v: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Result<()> {
    for_row_chunks_with_scratch(n, rows_per_thread(v), v, f).map_err(|_| scratch_error(v))
}

/// The largest element as f32 (NaN entries are skipped, as by `f32::max`). Eight independent
/// lanes let the compiler vectorise the reduction.
fn lane_max<T: Elem>(u: &[T]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = u.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..8 {
            lanes[j] = lanes[j].max(c[j].to_f32());
        }
    }
    tail.iter()
        .map(|&x| x.to_f32())
        .chain(lanes)
        .fold(f32::NEG_INFINITY, |a, b| a.max(b))
}

/// Statistics of one row: max pass, then a branch-free pass for the sums.
fn row_stats<T: Elem>(row: &[T], inv_t: f32, target: Option<usize>, u: &mut [f32]) -> RowStats {
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

/// Each row's label position inside this shard (working memory requested fallibly).
fn local_labels(
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

fn all_row_stats(input: &LogitsInput, labels: &[i64], full_vocab: bool) -> Result<Vec<RowStats>> {
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

/// Rows per thread so that each thread gets at least ~64k logits: spawning threads for less
/// costs more than it saves.
fn rows_per_thread(v: usize) -> usize {
    (1 << 16) / v.max(1) + 1
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
    let mut lp = try_vec(input.n, 0.0, "logprobs")?;
    let mut ent = try_vec(input.n, 0.0, "entropy")?;
    let mut lse = try_vec(input.n, 0.0, "lse")?;
    for k in 0..input.n {
        if labels[k] >= 0 {
            lse[k] = stats[k].lse();
            lp[k] = stats[k].target - lse[k];
            ent[k] = stats[k].entropy();
        }
    }
    write_all(&[
        (Some(&args.logprobs), &lp),
        (args.entropy.as_ref(), &ent),
        (Some(&args.lse), &lse),
    ])
}

pub fn shard_stats(args: &ShardStats) -> Result<()> {
    let input = &args.input;
    let labels = input.labels.read_i64()?;
    let stats = all_row_stats(input, &labels, false)?;
    write_all(&[(Some(&args.stats), &stats_rows(&stats)?)])
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

pub fn shard_finish(args: &ShardFinish) -> Result<()> {
    let labels = args.labels.read_i64()?;
    let raw = args.stats.read_f64()?;
    let (n, r) = (args.n, args.shards);
    let mut lp = try_vec(n, 0.0, "logprobs")?;
    let mut ent = try_vec(n, 0.0, "entropy")?;
    let mut lse = try_vec(n, 0.0, "lse")?;
    let mut rows = try_vec(r, [0.0; 4], "stats")?;
    for k in 0..n {
        if labels[k] < 0 {
            continue;
        }
        for (s, row) in rows.iter_mut().enumerate() {
            let o = (s * n + k) * STATS_WIDTH;
            *row = [raw[o], raw[o + 1], raw[o + 2], raw[o + 3]];
        }
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
    write_all(&[
        (Some(&args.logprobs), &lp),
        (args.entropy.as_ref(), &ent),
        (Some(&args.lse), &lse),
    ])
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
