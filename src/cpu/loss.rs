//! The CalibRL loss on host data, in f64: the reference semantics of SPEC §4 (value, gradient
//! with respect to ℓ and H, metrics). [`run`] turns a loss descriptor's tensors into a
//! [`LossBatch`]; Rust callers (the training demo, the scheduler tests) may build one directly.

use crate::config::{
    Activation, Aggregation, Baseline, Config, DeltaMode, EntropyControl, KlKind, LossKind,
};
use crate::desc::loss::Loss;
use crate::desc::metrics::{CalibrlMetrics as Metrics, CalibrlNormalizers as Normalizers};
use crate::error::{Error, Result};
use crate::tensor::{out_of_memory, try_collect, try_vec};
use std::ops::Range;

/// Expert responses' token log-probs (one row per expert slot) and each row's slot.
#[derive(Clone, Debug, Default)]
pub struct ExpertBaseline {
    pub rows: Vec<Range<usize>>,
    pub logprobs: Vec<f64>,
    pub mask: Vec<f64>,
    /// Per policy row: its expert slot, or −1.
    pub index: Vec<i64>,
}

/// Host inputs of one loss call. Token arrays are flat; `rows[i]` is row i's token range
/// (a padded `[B, S]` batch has `rows[i] = i·S..(i+1)·S`). Position t of a row is its offset
/// inside the range (used by token-aligned Δ).
#[derive(Clone, Debug, Default)]
pub struct LossBatch {
    pub rows: Vec<Range<usize>>,
    pub logprobs: Vec<f64>,
    /// 1 for a token that counts, else 0.
    pub mask: Vec<f64>,
    pub old_logprobs: Option<Vec<f64>>,
    pub ref_logprobs: Option<Vec<f64>>,
    pub entropy: Option<Vec<f64>>,
    /// Per-token importance weights ρ (verl's `rollout_is_weights`): multiply each token's
    /// policy-gradient term p and its gradient; None = all 1.
    pub token_weights: Option<Vec<f64>>,
    pub advantages: Vec<f64>,
    pub weights: Vec<f64>,
    pub signs: Vec<f64>,
    pub is_expert: Option<Vec<bool>>,
    pub expert: Option<ExpertBaseline>,
    pub normalizers: Option<Normalizers>,
}

#[derive(Clone, Debug, Default)]
pub struct LossOutput {
    pub grad_logprobs: Vec<f64>,
    pub grad_entropy: Vec<f64>,
    pub metrics: Metrics,
}

/// φ and φ' of SPEC §4.2 (φ'(0) = α for LeakyReLU, as in PyTorch).
pub fn activation(cfg: &Config, x: f64) -> (f64, f64) {
    match cfg.activation {
        Activation::LeakyRelu => {
            if x > 0.0 {
                (x, 1.0)
            } else {
                (cfg.alpha * x, cfg.alpha)
            }
        }
        Activation::Relu => {
            if x > 0.0 {
                (x, 1.0)
            } else {
                (0.0, 0.0)
            }
        }
        Activation::Tanh => {
            let t = x.tanh();
            (t, 1.0 - t * t)
        }
        Activation::Sigmoid => {
            // Truncated: σ(max(x, 0)).
            let y = x.max(0.0);
            let s = 1.0 / (1.0 + (-y).exp());
            (s, if x > 0.0 { s * (1.0 - s) } else { 0.0 })
        }
        Activation::Huber => {
            // Smooth-L1 (δ = 1) of max(x, 0).
            if x <= 0.0 {
                (0.0, 0.0)
            } else if x < 1.0 {
                (0.5 * x * x, x)
            } else {
                (x - 0.5, 1.0)
            }
        }
    }
}

/// The clipped policy-gradient term for one token: (p, ∂p/∂ℓ, clipped, lower-clipped).
pub fn clipped_pg(cfg: &Config, a: f64, logp: f64, old: f64) -> (f64, f64, bool, bool) {
    let ratio = (logp - old).exp();
    let p1 = -a * ratio;
    let p2 = -a * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high);
    let clipped = p2 > p1;
    let pc = p1.max(p2);
    let mut grad = if clipped { 0.0 } else { -a * ratio };
    let mut p = pc;
    let mut lower = false;
    if cfg.dual_clip_on() && a < 0.0 {
        let cap = -a * cfg.dual_clip;
        if pc > cap {
            p = cap;
            grad = 0.0;
            lower = true;
        }
    }
    (p, grad, clipped, lower)
}

/// The off-policy term of an expert row (LUFFY / RL-PLUS): (p_off, ∂p_off/∂ℓ).
pub fn off_policy(cfg: &Config, a: f64, logp: f64, old: f64) -> (f64, f64) {
    let pi = logp.exp();
    match cfg.loss {
        LossKind::Luffy => {
            let g = cfg.luffy_gamma;
            let f = pi / (pi + g);
            (-a * f, -a * g * pi / ((pi + g) * (pi + g)))
        }
        _ => {
            let pi_old = old.exp();
            let denom = pi_old + 0.5 * (pi_old + 1.0);
            let sg = (1.0 - pi).max(0.0).sqrt();
            let v = -a * 2.0 * pi / denom * sg;
            (v, v) // ∂/∂ℓ of e^ℓ is e^ℓ; the sqrt factor carries no gradient
        }
    }
}

/// k(ℓ, ℓref) and ∂k/∂ℓ (SPEC §4.3).
pub fn kl_term(kind: KlKind, logp: f64, reference: f64) -> (f64, f64) {
    let d = logp - reference;
    match kind {
        KlKind::K1 => (d, 1.0),
        KlKind::Abs => (
            d.abs(),
            if d > 0.0 {
                1.0
            } else if d < 0.0 {
                -1.0
            } else {
                0.0
            },
        ),
        KlKind::K2 => (0.5 * d * d, d),
        KlKind::K3 => {
            let r = -d; // ℓref − ℓ
            let raw = r.exp() - r - 1.0;
            if !(-10.0..=10.0).contains(&raw) {
                (raw.clamp(-10.0, 10.0), 0.0)
            } else {
                (raw, 1.0 - r.exp())
            }
        }
    }
}

/// A sum that starts at +0 (`Iterator::sum` of f64 starts at −0, so an empty sum would be −0).
fn fsum(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, |a, b| a + b)
}

/// `mask · x` that never reads `x` where the mask is 0 (padding may hold NaN or ±inf).
fn masked(mask: f64, x: f64) -> f64 {
    if mask == 0.0 {
        0.0
    } else {
        mask * x
    }
}

/// The denominators of one call (SPEC §4.5, §4.7): `tokens`/`seqs` for L_pg and L_explore,
/// `all_tokens`/`all_seqs` for entropy and KL (every row under the authors' arithmetic, else
/// the same rows).
struct Denominators {
    tokens: f64,
    seqs: f64,
    all_tokens: f64,
    all_seqs: f64,
}

impl Denominators {
    /// The caller's global normalisers (an all-row count left 0 means "the same as the
    /// rollout-row count"), or this call's own counts.
    fn resolve(
        given: Option<Normalizers>,
        local: Denominators,
        expert_tokens: f64,
    ) -> Result<Self> {
        let Some(n) = given else {
            return Ok(local);
        };
        if expert_tokens > 0.0 {
            // Left 0, the all-row counts say the mini-batch has no expert-row token; this call has.
            for (name, v) in [
                ("normalizers.all_token_count", n.all_token_count),
                ("normalizers.all_seq_count", n.all_seq_count),
            ] {
                if v == 0.0 {
                    return Err(Error::invalid(
                        name,
                        format!(
                            "is 0 (= the rollout-row count) but this call counts {expert_tokens} \
                             expert-row tokens; the `authors` preset needs every row's count"
                        ),
                    ));
                }
            }
        }
        let or = |all: f64, base: f64| if all == 0.0 { base } else { all };
        Ok(Denominators {
            tokens: n.token_count,
            seqs: n.seq_count,
            all_tokens: or(n.all_token_count, n.token_count),
            all_seqs: or(n.all_seq_count, n.seq_count),
        })
    }
}

pub fn compute(cfg: &Config, batch: &LossBatch) -> Result<LossOutput> {
    let b = batch.rows.len();
    let expert_row = |i: usize| batch.is_expert.as_ref().is_some_and(|e| e[i]);
    // Rows that are trained: rollouts, plus expert rows for LUFFY / RL-PLUS.
    let trained = |i: usize| !expert_row(i) || cfg.trains_expert_rows();
    // SPEC §4.7: the authors' arithmetic counts every row in the regularisers and the metrics
    // (an untrained expert row's p and exploration term are 0).
    let authors = cfg.authors();
    let counted_row = |i: usize| trained(i) || authors;
    // Working memory is requested fallibly (an error status, never an abort; docs/abi.md).
    let n_tokens = try_collect(
        batch
            .rows
            .iter()
            .map(|r| fsum(batch.mask[r.clone()].iter().copied())),
        "logprobs",
    )?;
    let tokens_of =
        |row: &dyn Fn(usize) -> bool| fsum((0..b).filter(|&i| row(i)).map(|i| n_tokens[i]));
    // A row without counted tokens adds nothing and is not counted in N_seq (SPEC §4.5).
    let seqs_of = |row: &dyn Fn(usize) -> bool| {
        (0..b).filter(|&i| row(i) && n_tokens[i] > 0.0).count() as f64
    };
    let local = Denominators {
        tokens: tokens_of(&trained),
        seqs: seqs_of(&trained),
        all_tokens: tokens_of(&counted_row),
        all_seqs: seqs_of(&counted_row),
    };
    let (local_tokens, local_seqs) = (local.tokens, local.seqs);
    let expert_tokens = local.all_tokens - local.tokens;
    let norm = Denominators::resolve(batch.normalizers, local, expert_tokens)?;
    require_global_counts(norm.tokens, norm.seqs, local_tokens, local_seqs)?;
    let inv = |x: f64| if x > 0.0 { 1.0 / x } else { 0.0 };
    let weight = |i: usize, tokens: f64, seqs: f64| match cfg.agg {
        Aggregation::TokenMean => inv(tokens),
        Aggregation::SeqMeanTokenSum => inv(seqs),
        Aggregation::SeqMeanTokenMean => inv(seqs) * inv(n_tokens[i]),
        Aggregation::SeqMeanTokenSumNorm => inv(cfg.t_norm.unwrap_or(1.0)),
        Aggregation::TokenSum => 1.0,
    };
    // L_pg and L_explore over the rollout rows' counts; entropy and KL over every row's.
    let agg_weight = |i: usize| weight(i, norm.tokens, norm.seqs);
    let agg_weight_all = |i: usize| weight(i, norm.all_tokens, norm.all_seqs);

    let lambda = cfg.effective_lambda();
    let baseline = explore_baseline(cfg, batch, authors)?;
    require_inputs(cfg, batch, lambda > 0.0 && baseline.is_none())?;
    let (selected, cov_frac) = cov_selection(cfg, batch, expert_row)?;

    let mut out = LossOutput {
        grad_logprobs: try_vec(batch.logprobs.len(), 0.0, "grad_logprobs")?,
        grad_entropy: try_vec(batch.logprobs.len(), 0.0, "grad_entropy")?,
        metrics: Metrics {
            cov_selected_frac: cov_frac,
            ..Metrics::default()
        },
    };
    let m = &mut out.metrics;
    let (mut clip_n, mut lower_n, mut kl_sum, mut rollout_tokens) = (0.0, 0.0, 0.0, 0.0);
    let (mut delta_sum, mut delta_n) = (0.0, 0.0);

    for i in (0..b).filter(|&i| counted_row(i)) {
        let pg_row = trained(i);
        let a = batch.advantages[i];
        let w = batch.weights[i];
        let c = batch.signs[i];
        let aw = agg_weight(i);
        let aw_all = agg_weight_all(i);
        let is_exp = expert_row(i);
        for (t, k) in batch.rows[i].clone().enumerate() {
            if batch.mask[k] == 0.0 {
                continue;
            }
            let logp = batch.logprobs[k];
            let old = batch.old_logprobs.as_ref().map_or(logp, |o| o[k]);
            let (p, dp) = if is_exp && pg_row {
                off_policy(cfg, a, logp, old)
            } else {
                let (p, dp, clipped, lower) = clipped_pg(cfg, a, logp, old);
                clip_n += clipped as u8 as f64;
                lower_n += lower as u8 as f64;
                kl_sum += old - logp;
                rollout_tokens += 1.0;
                match cfg.entropy_control {
                    _ if !pg_row => (0.0, 0.0),
                    EntropyControl::ClipCov if selected[k] => (0.0, 0.0),
                    EntropyControl::KlCov => kl_cov_pg(cfg, a, logp, old, selected[k]),
                    // Clip-Cov's other tokens: max(p1, p2), no dual clip (dual_clip_on).
                    _ => (p, dp),
                }
            };
            // ρ is a constant per token (no gradient flows into it), as in verl.
            let rho = batch.token_weights.as_ref().map_or(1.0, |r| r[k]);
            m.pg_loss += aw * rho * p;
            out.grad_logprobs[k] += aw * rho * dp;
            if let Some(h) = &batch.entropy {
                m.entropy_loss += aw_all * h[k];
                out.grad_entropy[k] = -cfg.entropy_coef * aw_all;
            }
            if let Some(r) = &batch.ref_logprobs {
                let (kv, dk) = kl_term(cfg.kl_kind, logp, r[k]);
                m.kl_loss += aw_all * kv;
                out.grad_logprobs[k] += cfg.kl_coef * aw_all * dk;
            }
            if let (DeltaMode::TokenAligned, Some(base), false) =
                (cfg.delta_mode, &baseline, is_exp)
            {
                if let Some(bt) = base.token(i, t, k) {
                    let delta = logp - bt;
                    let (phi, dphi) = activation(cfg, -c * delta);
                    m.explore_loss += aw * w * phi;
                    out.grad_logprobs[k] += lambda * aw * w * dphi * -c;
                    delta_sum += delta;
                    delta_n += 1.0;
                }
            }
        }
        if let (DeltaMode::Sequence, Some(base), false, true) =
            (cfg.delta_mode, &baseline, is_exp, n_tokens[i] > 0.0)
        {
            if let Some(e) = base.sequence(cfg, batch, i) {
                let scale = if cfg.length_normalize {
                    inv(n_tokens[i])
                } else {
                    1.0
                };
                let s = fsum(
                    batch.rows[i]
                        .clone()
                        .map(|k| masked(batch.mask[k], batch.logprobs[k])),
                ) * scale;
                let delta = s - e;
                let (phi, dphi) = activation(cfg, -c * delta);
                let inv_seq = inv(norm.seqs);
                m.explore_loss += inv_seq * w * phi;
                let g = lambda * inv_seq * w * dphi * -c * scale;
                for k in batch.rows[i].clone() {
                    out.grad_logprobs[k] += g * batch.mask[k];
                }
                delta_sum += delta;
                delta_n += 1.0;
            }
        }
    }

    m.loss = m.pg_loss + lambda * m.explore_loss - cfg.entropy_coef * m.entropy_loss
        + cfg.kl_coef * m.kl_loss;
    m.clipfrac = mean(clip_n, rollout_tokens);
    m.clipfrac_lower = mean(lower_n, rollout_tokens);
    m.ppo_kl = mean(kl_sum, rollout_tokens);
    m.mean_delta = mean(delta_sum, delta_n);
    // Per-row metrics over rollouts (every row in the authors' arithmetic).
    let mut rollouts = Vec::new();
    rollouts
        .try_reserve_exact(b)
        .map_err(|_| out_of_memory("advantages", b, std::mem::size_of::<usize>()))?;
    rollouts.extend((0..b).filter(|&i| !expert_row(i) || authors));
    row_metrics(m, batch, &rollouts, &n_tokens);
    m.num_tokens = local_tokens;
    m.num_seqs = local_seqs;
    Ok(out)
}

/// A global normaliser is a denominator: where this call counts tokens (rows), it must be
/// positive (a 0 would silently zero the terms that divide by it). It may be smaller than the
/// call's own count: a caller may fold its data-parallel factor into it (global count / D, as
/// the TRL drop-in does for TRL's `dapo` normalisation), and ranks' loads may be uneven.
fn require_global_counts(
    global_tokens: f64,
    global_seqs: f64,
    tokens: f64,
    seqs: f64,
) -> Result<()> {
    for (name, global, local) in [
        ("normalizers.token_count", global_tokens, tokens),
        ("normalizers.seq_count", global_seqs, seqs),
    ] {
        if local > 0.0 && global <= 0.0 {
            return Err(Error::invalid(
                name,
                format!(
                    "{global} while this call counts {local}: a global normaliser is a \
                     denominator and must be positive"
                ),
            ));
        }
    }
    Ok(())
}

fn mean(sum: f64, n: f64) -> f64 {
    if n > 0.0 {
        sum / n
    } else {
        0.0
    }
}

/// The inputs a configuration needs (the CUDA backend checks the same before launching).
fn require_inputs(cfg: &Config, batch: &LossBatch, baseline_missing: bool) -> Result<()> {
    if baseline_missing {
        return Err(match cfg.baseline {
            Baseline::Expert => Error::null("expert_logprobs")
                .with_reason("λ > 0 with the expert baseline needs it"),
            Baseline::RefPolicy => Error::null("ref_logprobs")
                .with_reason("λ > 0 with the ref_policy baseline needs it"),
        });
    }
    if cfg.entropy_coef != 0.0 && batch.entropy.is_none() {
        return Err(Error::null("entropy").with_reason("entropy_coef != 0 needs it"));
    }
    if cfg.kl_coef != 0.0 && batch.ref_logprobs.is_none() {
        return Err(Error::null("ref_logprobs").with_reason("kl_coef != 0 needs it"));
    }
    Ok(())
}

/// SPEC §4.6: per token, whether Clip-Cov detaches it or KL-Cov penalises it (among counted
/// rollout tokens), and the selected fraction. Allocation failures are errors, never aborts.
fn cov_selection(
    cfg: &Config,
    batch: &LossBatch,
    expert_row: impl Fn(usize) -> bool,
) -> Result<(Vec<bool>, f64)> {
    if cfg.entropy_control == EntropyControl::None {
        return Ok((Vec::new(), 0.0));
    }
    let mut selected = crate::tensor::try_vec(batch.logprobs.len(), false, "logprobs")?;
    let rollouts = || (0..batch.rows.len()).filter(|&i| !expert_row(i));
    let counted = |i: usize| batch.rows[i].clone().filter(|&k| batch.mask[k] != 0.0);
    let n: usize = rollouts().map(|i| counted(i).count()).sum();
    let mut tokens = Vec::new();
    tokens
        .try_reserve_exact(n)
        .map_err(|_| crate::cpu::cov::no_memory(n))?;
    for i in rollouts() {
        for k in counted(i) {
            let logp = batch.logprobs[k];
            let old = batch.old_logprobs.as_ref().map_or(logp, |o| o[k]);
            tokens.push(crate::cpu::cov::CovToken {
                k,
                adv: batch.advantages[i],
                logp,
                clipped: clipped_pg(cfg, batch.advantages[i], logp, old).2,
            });
        }
    }
    let picked = crate::cpu::cov::select(cfg, &tokens)?;
    let frac = mean(picked.len() as f64, tokens.len() as f64);
    for k in picked {
        selected[k] = true;
    }
    Ok((selected, frac))
}

/// The per-row metrics over `rollouts`, and the experts' mean log-prob.
fn row_metrics(m: &mut Metrics, batch: &LossBatch, rollouts: &[usize], n_tokens: &[f64]) {
    let nr = rollouts.len() as f64;
    m.mean_expert_logprob = batch.expert.as_ref().map_or(0.0, |e| {
        mean(
            fsum(e.logprobs.iter().zip(&e.mask).map(|(&l, &m)| masked(m, l))),
            fsum(e.mask.iter().copied()),
        )
    });
    m.mean_response_length = mean(fsum(rollouts.iter().map(|&i| n_tokens[i])), nr);
    m.frac_correct = mean(
        rollouts.iter().filter(|&&i| batch.signs[i] > 0.0).count() as f64,
        nr,
    );
    m.mean_rarity_weight = mean(fsum(rollouts.iter().map(|&i| batch.weights[i])), nr);
}

/// KL-Cov's policy-gradient term (SPEC §4.6): the unclipped −A·ρ, plus β·|ℓ − ℓold| on a
/// selected token. (p, ∂p/∂ℓ).
pub fn kl_cov_pg(cfg: &Config, a: f64, logp: f64, old: f64, selected: bool) -> (f64, f64) {
    let ratio = (logp - old).exp();
    let (mut p, mut dp) = (-a * ratio, -a * ratio);
    if selected {
        let d = logp - old;
        p += cfg.kl_cov_coef * d.abs();
        dp += cfg.kl_cov_coef
            * if d > 0.0 {
                1.0
            } else if d < 0.0 {
                -1.0
            } else {
                0.0
            };
    }
    (p, dp)
}

/// Where Δ's baseline comes from, resolved once per call.
enum BaselineSource<'a> {
    /// Per-slot expert sums E_g (already length-normalised when configured). With
    /// `zero_when_missing` (the authors' arithmetic) a row without an expert explores against 0.
    Expert {
        expert: &'a ExpertBaseline,
        sums: Vec<f64>,
        zero_when_missing: bool,
    },
    /// The authors' arithmetic with no expert selected in the call: ℓ* = 0 everywhere.
    Zero,
    Reference(&'a [f64]),
}

fn explore_baseline<'a>(
    cfg: &Config,
    batch: &'a LossBatch,
    authors: bool,
) -> Result<Option<BaselineSource<'a>>> {
    Ok(match cfg.baseline {
        Baseline::RefPolicy => batch.ref_logprobs.as_deref().map(BaselineSource::Reference),
        Baseline::Expert if authors && batch.expert.is_none() => Some(BaselineSource::Zero),
        Baseline::Expert => match batch.expert.as_ref() {
            None => None,
            Some(e) => {
                let sums = try_collect(
                    e.rows.iter().map(|r| {
                        let s = fsum(r.clone().map(|k| masked(e.mask[k], e.logprobs[k])));
                        let n = fsum(e.mask[r.clone()].iter().copied());
                        if cfg.length_normalize {
                            if n > 0.0 {
                                s / n
                            } else {
                                0.0
                            }
                        } else {
                            s
                        }
                    }),
                    "expert_logprobs",
                )?;
                Some(BaselineSource::Expert {
                    expert: e,
                    sums,
                    zero_when_missing: authors,
                })
            }
        },
    })
}

impl BaselineSource<'_> {
    /// The sequence-mode baseline of row i, or None when its prompt has no expert.
    fn sequence(&self, cfg: &Config, batch: &LossBatch, i: usize) -> Option<f64> {
        match self {
            BaselineSource::Expert {
                expert,
                sums,
                zero_when_missing,
            } => {
                let slot = expert.index[i];
                if slot >= 0 {
                    Some(sums[slot as usize])
                } else {
                    zero_when_missing.then_some(0.0)
                }
            }
            BaselineSource::Zero => Some(0.0),
            BaselineSource::Reference(r) => {
                let rows = batch.rows[i].clone();
                let n = fsum(batch.mask[rows.clone()].iter().copied());
                let s = fsum(rows.map(|k| masked(batch.mask[k], r[k])));
                Some(if cfg.length_normalize {
                    if n > 0.0 {
                        s / n
                    } else {
                        0.0
                    }
                } else {
                    s
                })
            }
        }
    }

    /// The token-aligned baseline at position t (flat index k) of row i: ℓ*[g, t], taken as 0
    /// past the expert's length or at masked expert positions.
    fn token(&self, i: usize, t: usize, k: usize) -> Option<f64> {
        match self {
            BaselineSource::Zero => Some(0.0),
            BaselineSource::Expert {
                expert,
                zero_when_missing,
                ..
            } => {
                let slot = expert.index[i];
                if slot < 0 {
                    return zero_when_missing.then_some(0.0);
                }
                let r = &expert.rows[slot as usize];
                Some(if t < r.len() {
                    masked(expert.mask[r.start + t], expert.logprobs[r.start + t])
                } else {
                    0.0
                })
            }
            BaselineSource::Reference(r) => Some(r[k]),
        }
    }
}

/// Reads a loss call's host tensors, computes, and writes the outputs (only on success).
pub fn run(cfg: &Config, args: &Loss, host_metrics: Option<&mut Metrics>) -> Result<()> {
    let batch = read_batch(args)?;
    let out = compute(cfg, &batch)?;
    let metrics = out.metrics.to_array();
    // Extreme but finite inputs (say ℓ − ℓ_old = 1000) can overflow: report it, write nothing.
    if let Some(i) = metrics.iter().position(|v| !v.is_finite()) {
        return Err(Error::new(
            crate::error::CalibrlStatus::NonFinite,
            format!(
                "`metrics`: value {i} of the result is {} (the inputs are finite but out of \
                 range, e.g. a log-ratio that overflows exp)",
                metrics[i]
            ),
        ));
    }
    crate::tensor::write_all(&[
        (args.grad_logprobs.as_ref(), &out.grad_logprobs),
        (args.grad_entropy.as_ref(), &out.grad_entropy),
        (args.metrics.as_ref(), &metrics),
    ])?;
    if let Some(h) = host_metrics {
        *h = out.metrics;
    }
    Ok(())
}

/// Checks that the counted entries (mask ≠ 0) of `v` are finite and zeroes the others.
fn counted_only(name: &str, mut v: Vec<f64>, mask: &[f64]) -> Result<Vec<f64>> {
    for (k, (x, &m)) in v.iter_mut().zip(mask).enumerate() {
        if m == 0.0 {
            *x = 0.0;
        } else if !x.is_finite() {
            return Err(Error::non_finite(name, k, *x));
        }
    }
    Ok(v)
}

/// The policy's log-probabilities (this step's forward output, the one input every term
/// differentiates) are ≤ 0 (SPEC §4): a counted value above [`LOGPROB_TOLERANCE`] is a caller's
/// mistake (logits, or a sign error), not rounding. Masked entries were zeroed. The other
/// log-prob inputs (old, reference, expert) are taken as given (docs/abi.md).
fn require_log_probs(name: &str, values: &[f64]) -> Result<()> {
    match values.iter().position(|&v| v > LOGPROB_TOLERANCE) {
        None => Ok(()),
        Some(k) => Err(Error::invalid(
            name,
            format!(
                "element {k} is {}: a log-probability is <= 0 (up to {LOGPROB_TOLERANCE} of \
                 rounding)",
                values[k]
            ),
        )),
    }
}

/// How far above 0 a log-probability may be (rounding of a log-softmax computed in low
/// precision) before it is rejected.
const LOGPROB_TOLERANCE: f64 = 0.1;

fn read_batch(args: &Loss) -> Result<LossBatch> {
    let rows = args.policy.ranges()?;
    let mask = args.policy.mask_values()?;
    let b = rows.len();
    // Only tokens that count must be finite: padding may hold anything, and is replaced by 0
    // here so that no value (loss, Δ, metric) can ever read it.
    let counted = |name: &'static str, v: Vec<f64>| counted_only(name, v, &mask);
    let logprobs = counted("logprobs", args.policy.values.read_f64()?)?;
    let opt = |t: &Option<crate::tensor::Tensor>, name| -> Result<Option<Vec<f64>>> {
        t.as_ref().map(|t| counted(name, t.read_f64()?)).transpose()
    };
    let old_logprobs = opt(&args.old_logprobs, "old_logprobs")?;
    let ref_logprobs = opt(&args.ref_logprobs, "ref_logprobs")?;
    let entropy = opt(&args.entropy, "entropy")?;
    let token_weights = opt(&args.token_weights, "token_weights")?;
    if let Some((k, r)) = token_weights.as_ref().and_then(|w| {
        w.iter()
            .zip(&mask)
            .enumerate()
            .find(|(_, (r, m))| **m != 0.0 && **r < 0.0)
            .map(|(k, (r, _))| (k, *r))
    }) {
        return Err(Error::invalid(
            "token_weights",
            format!("element {k} is {r}; importance weights must be >= 0"),
        ));
    }
    require_log_probs("logprobs", &logprobs)?;
    let advantages = args.advantages.read_finite_f64()?;
    let weights = args.weights.read_finite_f64()?;
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| **w < 0.0) {
        return Err(Error::invalid(
            "weights",
            format!("element {i} is {w}; rarity weights are >= 0 (|A|, or 1)"),
        ));
    }
    let signs = args.signs.read_finite_f64()?;
    if let Some((i, s)) = signs.iter().enumerate().find(|(_, s)| s.abs() != 1.0) {
        return Err(Error::invalid(
            "signs",
            format!("element {i} is {s}, expected +1 or -1"),
        ));
    }
    let is_expert = args.is_expert.as_ref().map(|t| t.read_bool()).transpose()?;
    let expert = match &args.expert {
        None => None,
        Some(e) => {
            let erows = e.ranges()?;
            let emask = e.mask_values()?;
            let values = counted_only("expert_logprobs", e.values.read_f64()?, &emask)?;
            let index = args.expert_index.as_ref().expect("validated").read_i64()?;
            let p = erows.len() as i64;
            if let Some((i, s)) = index.iter().enumerate().find(|(_, &s)| s < -1 || s >= p) {
                return Err(Error::invalid(
                    "expert_index",
                    format!("row {i}: slot {s} is outside [-1, {p}) (expert rows given: {p})"),
                ));
            }
            Some(ExpertBaseline {
                rows: erows,
                logprobs: values,
                mask: emask,
                index,
            })
        }
    };
    debug_assert_eq!(advantages.len(), b);
    Ok(LossBatch {
        rows,
        logprobs,
        mask,
        old_logprobs,
        ref_logprobs,
        entropy,
        token_weights,
        advantages,
        weights,
        signs,
        is_expert,
        expert,
        normalizers: args.normalizers,
    })
}
