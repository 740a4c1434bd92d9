//! An independent float64 implementation of SPEC.md (§3 rarity weighting, §4 loss, §6 logits),
//! written from the specification and docs/abi.md only — never from the library's sources.
//! Every test compares the library against this file.

#![allow(dead_code, clippy::needless_range_loop)]

use calibrl::config::{
    Activation, Aggregation, Baseline, DeltaMode, EntropyControl, KlKind, LossKind,
};
use calibrl::Config;
use std::ops::Range;

// ---------------------------------------------------------------------------------------------
// §3 Rarity weighting
// ---------------------------------------------------------------------------------------------

pub struct RefAdvantages {
    pub advantages: Vec<f64>,
    pub weights: Vec<f64>,
    pub signs: Vec<f64>,
}

/// SPEC §3: group statistics over the group's rollout rows only (expert rows excluded), unbiased
/// std, G = 1 → μ = 0, σ = 1; expert rows get an advantage against their group's statistics.
pub fn ref_group_advantages(
    cfg: &Config,
    rewards: &[f64],
    groups: &[i64],
    num_groups: usize,
    correct: Option<&[bool]>,
    is_expert: Option<&[bool]>,
) -> RefAdvantages {
    let b = rewards.len();
    let expert = |i: usize| is_expert.map(|e| e[i]).unwrap_or(false);
    let mut mu = vec![0.0; num_groups];
    let mut sigma = vec![1.0; num_groups];
    for g in 0..num_groups {
        let members: Vec<f64> = (0..b)
            .filter(|&i| groups[i] as usize == g && !expert(i))
            .map(|i| rewards[i])
            .collect();
        let n = members.len();
        if n >= 2 && members.iter().all(|&r| r == members[0]) {
            // All rewards equal: A = 0 exactly (not a rounding residue of the mean).
            mu[g] = members[0];
            sigma[g] = 0.0;
        } else if n >= 2 {
            let m = members.iter().sum::<f64>() / n as f64;
            let var = members.iter().map(|r| (r - m) * (r - m)).sum::<f64>() / (n - 1) as f64;
            mu[g] = m;
            sigma[g] = var.sqrt();
        } else {
            // G_g == 1 (and, by extension, an empty group): μ = 0, σ = 1.
            mu[g] = 0.0;
            sigma[g] = 1.0;
        }
    }
    let mut out = RefAdvantages {
        advantages: vec![0.0; b],
        weights: vec![0.0; b],
        signs: vec![0.0; b],
    };
    for i in 0..b {
        let g = groups[i] as usize;
        let a = if cfg.norm_by_std {
            (rewards[i] - mu[g]) / (sigma[g] + cfg.adv_eps)
        } else {
            rewards[i] - mu[g]
        };
        out.advantages[i] = a;
        out.weights[i] = if cfg.rarity_weighting { a.abs() } else { 1.0 };
        let ok = match correct {
            Some(c) => c[i],
            None => rewards[i] > cfg.correct_threshold,
        };
        out.signs[i] = if ok { 1.0 } else { -1.0 };
    }
    out
}

// ---------------------------------------------------------------------------------------------
// §4 The loss
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct RefExpert {
    /// Token ranges of each expert slot in `logp`.
    pub rows: Vec<Range<usize>>,
    pub logp: Vec<f64>,
    pub mask: Vec<f64>,
    /// Per policy row: its expert slot or −1.
    pub index: Vec<i64>,
}

/// One loss call's host data: flat token arrays, each row a token range.
#[derive(Clone, Debug)]
pub struct RefBatch {
    pub rows: Vec<Range<usize>>,
    pub logp: Vec<f64>,
    pub mask: Vec<f64>,
    pub old: Option<Vec<f64>>,
    pub refl: Option<Vec<f64>>,
    pub ent: Option<Vec<f64>>,
    pub adv: Vec<f64>,
    pub w: Vec<f64>,
    pub c: Vec<f64>,
    pub is_expert: Vec<bool>,
    pub expert: Option<RefExpert>,
    /// Global (token_count, seq_count).
    pub norm: Option<(f64, f64)>,
    /// The value the detached factor sg(·) of RL-PLUS sees (None: `logp`); lets finite
    /// differences hold the stop-gradient part fixed.
    pub sg_logp: Option<Vec<f64>>,
    /// Per-token importance weights ρ on the policy-gradient term (None: 1).
    pub tw: Option<Vec<f64>>,
}

#[derive(Clone, Debug, Default)]
pub struct RefMetrics {
    pub loss: f64,
    pub pg_loss: f64,
    pub explore_loss: f64,
    pub entropy_loss: f64,
    pub kl_loss: f64,
    pub clipfrac: f64,
    pub clipfrac_lower: f64,
    pub ppo_kl: f64,
    pub mean_delta: f64,
    pub mean_expert_logprob: f64,
    pub mean_response_length: f64,
    pub frac_correct: f64,
    pub mean_rarity_weight: f64,
    pub num_tokens: f64,
    pub num_seqs: f64,
    pub cov_selected_frac: f64,
}

impl RefMetrics {
    pub fn to_array(&self) -> [f64; 16] {
        [
            self.loss,
            self.pg_loss,
            self.explore_loss,
            self.entropy_loss,
            self.kl_loss,
            self.clipfrac,
            self.clipfrac_lower,
            self.ppo_kl,
            self.mean_delta,
            self.mean_expert_logprob,
            self.mean_response_length,
            self.frac_correct,
            self.mean_rarity_weight,
            self.num_tokens,
            self.num_seqs,
            self.cov_selected_frac,
        ]
    }
}

pub const METRIC_NAMES: [&str; 16] = [
    "loss",
    "pg_loss",
    "explore_loss",
    "entropy_loss",
    "kl_loss",
    "clipfrac",
    "clipfrac_lower",
    "ppo_kl",
    "mean_delta",
    "mean_expert_logprob",
    "mean_response_length",
    "frac_correct",
    "mean_rarity_weight",
    "num_tokens",
    "num_seqs",
    "cov_selected_frac",
];

#[derive(Clone, Debug)]
pub struct RefOut {
    pub grad_l: Vec<f64>,
    pub grad_h: Vec<f64>,
    pub m: RefMetrics,
    /// Smallest distance of any sample to a kink of the loss (for finite differences).
    pub kink: f64,
    /// §4.6: flat indices of the tokens Clip-Cov / KL-Cov selected, increasing.
    pub cov_selected: Vec<usize>,
}

/// SplitMix64 finaliser of `seed·φ64 + k + φ64` (docs/abi.md: Clip-Cov's key of position k).
pub fn splitmix_key(seed: u64, k: u64) -> u64 {
    const PHI: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut z = seed.wrapping_mul(PHI).wrapping_add(k).wrapping_add(PHI);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SPEC §4.6 selection over the counted rollout tokens: (selected flat indices, distance of the
/// selection to changing under a perturbation of ℓ, for finite differences).
pub fn ref_cov_selection(cfg: &Config, b: &RefBatch) -> (Vec<usize>, f64) {
    if cfg.entropy_control == EntropyControl::None {
        return (vec![], f64::INFINITY);
    }
    let old = b.old.clone().unwrap_or_else(|| b.logp.clone());
    // (position, A, ℓ, clipped)
    let mut toks: Vec<(usize, f64, f64, bool)> = vec![];
    for i in 0..b.rows.len() {
        if b.is_expert[i] {
            continue;
        }
        for t in b.rows[i].clone() {
            if b.mask[t] != 0.0 {
                let (_, _, clipped, _, _) = clipped_pg(cfg, b.adv[i], b.logp[t], old[t]);
                toks.push((t, b.adv[i], b.logp[t], clipped));
            }
        }
    }
    if toks.is_empty() {
        return (vec![], f64::INFINITY);
    }
    let cnt = toks.len() as f64;
    // SPEC §4.6: when every counted advantage is the same, A − mean A is exactly 0.
    let all_equal = toks.iter().all(|t| t.1 == toks[0].1);
    let a_mean = cfg.cov_adv_mean.unwrap_or(if all_equal {
        toks[0].1
    } else {
        toks.iter().map(|t| t.1).sum::<f64>() / cnt
    });
    let l_mean = cfg
        .cov_logprob_mean
        .unwrap_or(toks.iter().map(|t| t.2).sum::<f64>() / cnt);
    let n_tok = cfg.cov_token_count.unwrap_or(cnt);
    let cov: Vec<f64> = toks
        .iter()
        .map(|t| (t.1 - a_mean) * (t.2 - l_mean))
        .collect();
    let mut kink = f64::INFINITY;
    let mut sel: Vec<usize> = match cfg.entropy_control {
        EntropyControl::ClipCov => {
            let n = ((cfg.clip_cov_ratio * n_tok).floor() as usize).max(1);
            let mut cand = vec![];
            for (j, t) in toks.iter().enumerate() {
                kink = kink
                    .min((cov[j] - cfg.clip_cov_lb).abs())
                    .min((cov[j] - cfg.clip_cov_ub).abs());
                if !t.3 && cfg.clip_cov_lb < cov[j] && cov[j] < cfg.clip_cov_ub {
                    cand.push((splitmix_key(cfg.cov_seed, t.0 as u64), t.0));
                }
            }
            cand.sort();
            cand.truncate(n);
            cand.into_iter().map(|c| c.1).collect()
        }
        _ => {
            let n = ((cfg.kl_cov_ratio * n_tok).floor() as usize).max(1);
            // Finite covariances only (SPEC §4.6).
            let mut order: Vec<usize> = (0..toks.len()).filter(|&j| cov[j].is_finite()).collect();
            // Bubble-free: a plain stable sort by decreasing cov keeps position order on ties.
            order.sort_by(|&x, &y| cov[y].partial_cmp(&cov[x]).unwrap());
            if n < order.len() {
                kink = kink.min((cov[order[n - 1]] - cov[order[n]]).abs());
            }
            order.truncate(n);
            order.into_iter().map(|j| toks[j].0).collect()
        }
    };
    sel.sort();
    (sel, kink)
}

/// φ(x) and φ'(x) of SPEC §4.2 (and the library's documented choices for sigmoid / huber).
/// Also returns the distance of x to the activation's kinks.
pub fn activation(cfg: &Config, x: f64) -> (f64, f64, f64) {
    match cfg.activation {
        Activation::LeakyRelu => {
            if x > 0.0 {
                (x, 1.0, x.abs())
            } else {
                (cfg.alpha * x, cfg.alpha, x.abs())
            }
        }
        Activation::Relu => {
            if x > 0.0 {
                (x, 1.0, x.abs())
            } else {
                (0.0, 0.0, x.abs())
            }
        }
        Activation::Tanh => {
            let t = x.tanh();
            (t, 1.0 - t * t, f64::INFINITY)
        }
        Activation::Sigmoid => {
            let y = x.max(0.0);
            let s = 1.0 / (1.0 + (-y).exp());
            let d = if x > 0.0 { s * (1.0 - s) } else { 0.0 };
            (s, d, x.abs())
        }
        Activation::Huber => {
            let y = x.max(0.0);
            let kink = x.abs().min((x - 1.0).abs());
            if x <= 0.0 {
                (0.0, 0.0, kink)
            } else if y < 1.0 {
                (0.5 * y * y, y, kink)
            } else {
                (y - 0.5, 1.0, kink)
            }
        }
    }
}

/// Clipped PG of SPEC §4.1: (p, ∂p/∂ℓ, p2 > p1, lower-clip indicator, kink distance).
pub fn clipped_pg(cfg: &Config, a: f64, l: f64, old: f64) -> (f64, f64, bool, bool, f64) {
    let rho = (l - old).exp();
    let lo = 1.0 - cfg.clip_low;
    let hi = 1.0 + cfg.clip_high;
    let p1 = -a * rho;
    let p2 = -a * rho.clamp(lo, hi);
    let (pc, mut dp) = if p1 >= p2 { (p1, -a * rho) } else { (p2, 0.0) };
    let mut kink = (rho - lo).abs().min((rho - hi).abs());
    let mut p = pc;
    // SPEC §4.1: off at c_dual ≤ 1; §4.6: never under Clip-Cov / KL-Cov.
    let dual_on = cfg.dual_clip > 1.0 && cfg.entropy_control == EntropyControl::None;
    let mut lower = false;
    if dual_on && a < 0.0 {
        let cap = -a * cfg.dual_clip;
        if pc > cap {
            p = cap;
            dp = 0.0;
            lower = true;
        }
        kink = kink.min((rho - cfg.dual_clip).abs());
    }
    if a == 0.0 {
        kink = f64::INFINITY;
    }
    (p, dp, p2 > p1, lower, kink)
}

/// Off-policy terms of SPEC §4.4 for trained expert rows: (p_off, ∂p_off/∂ℓ).
pub fn off_policy(cfg: &Config, a: f64, l: f64, old: f64, l_sg: f64) -> (f64, f64) {
    let pi = l.exp();
    match cfg.loss {
        LossKind::Luffy => {
            let g = cfg.luffy_gamma;
            (-a * pi / (pi + g), -a * g * pi / ((pi + g) * (pi + g)))
        }
        LossKind::Rlplus => {
            let po = old.exp();
            let den = po + 0.5 * (po + 1.0);
            let s = (1.0 - l_sg.exp()).max(0.0).sqrt();
            let v = -a * 2.0 * pi / den * s;
            // d/dℓ of 2π/den is 2π/den; the square root is detached.
            (v, v)
        }
        _ => unreachable!("off-policy term only for luffy / rlplus"),
    }
}

/// KL estimators of SPEC §4.3: (k, ∂k/∂ℓ, kink distance).
pub fn kl(kind: KlKind, l: f64, r: f64) -> (f64, f64, f64) {
    match kind {
        KlKind::K1 => (l - r, 1.0, f64::INFINITY),
        KlKind::Abs => {
            let d = l - r;
            (d.abs(), if d > 0.0 { 1.0 } else { -1.0 }, d.abs())
        }
        KlKind::K2 => {
            let d = l - r;
            (0.5 * d * d, d, f64::INFINITY)
        }
        KlKind::K3 => {
            let x = r - l;
            let v = x.exp() - x - 1.0;
            let kink = (v - 10.0).abs().min((v + 10.0).abs());
            if v > 10.0 {
                (10.0, 0.0, kink)
            } else if v < -10.0 {
                (-10.0, 0.0, kink)
            } else {
                // dv/dℓ = −e^x + 1
                (v, 1.0 - x.exp(), kink)
            }
        }
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The loss of SPEC §4 with the semantics docs/abi.md fixes where SPEC is silent.
pub fn ref_loss(cfg: &Config, b: &RefBatch) -> RefOut {
    let nrows = b.rows.len();
    let trains_expert = matches!(cfg.loss, LossKind::Luffy | LossKind::Rlplus);
    let counted: Vec<bool> = (0..nrows)
        .map(|i| !b.is_expert[i] || trains_expert)
        .collect();
    let rollout: Vec<bool> = (0..nrows).map(|i| !b.is_expert[i]).collect();
    let n: Vec<f64> = b
        .rows
        .iter()
        .map(|r| r.clone().map(|t| b.mask[t]).sum())
        .collect();
    let local_tok: f64 = (0..nrows).filter(|&i| counted[i]).map(|i| n[i]).sum();
    // SPEC §4.5: a row with n_i = 0 is not counted in N_seq.
    let local_seq = (0..nrows).filter(|&i| counted[i] && n[i] > 0.0).count() as f64;
    let (n_tok, n_seq) = b.norm.unwrap_or((local_tok, local_seq));
    let safe = |d: f64| if d > 0.0 { 1.0 / d } else { 0.0 };
    let coef = |i: usize| -> f64 {
        match cfg.agg {
            Aggregation::TokenMean => safe(n_tok),
            Aggregation::SeqMeanTokenSum => safe(n_seq),
            Aggregation::SeqMeanTokenMean => safe(n_seq) * safe(n[i]),
            Aggregation::SeqMeanTokenSumNorm => 1.0 / cfg.t_norm.expect("t_norm"),
            Aggregation::TokenSum => 1.0,
        }
    };
    let lam = if cfg.loss == LossKind::Calibrl {
        cfg.lambda
    } else {
        0.0
    };
    let old: Vec<f64> = b.old.clone().unwrap_or_else(|| b.logp.clone());
    let mut gl = vec![0.0; b.logp.len()];
    let mut gh = vec![0.0; b.logp.len()];
    let mut m = RefMetrics::default();
    let (cov_selected, mut kink) = ref_cov_selection(cfg, b);
    let (mut clipn, mut lowern, mut ppo, mut ntok_roll) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..nrows {
        if !counted[i] {
            continue;
        }
        let k = coef(i);
        for t in b.rows[i].clone() {
            if b.mask[t] == 0.0 {
                continue;
            }
            let (p, dp) = if b.is_expert[i] {
                off_policy(
                    cfg,
                    b.adv[i],
                    b.logp[t],
                    old[t],
                    b.sg_logp.as_ref().map(|s| s[t]).unwrap_or(b.logp[t]),
                )
            } else {
                let (p, dp, clipped, lower, kk) = clipped_pg(cfg, b.adv[i], b.logp[t], old[t]);
                kink = kink.min(kk);
                clipn += clipped as u8 as f64;
                lowern += lower as u8 as f64;
                ppo += old[t] - b.logp[t];
                ntok_roll += 1.0;
                let chosen = cov_selected.binary_search(&t).is_ok();
                match cfg.entropy_control {
                    // Clip-Cov: a selected token's p and ∂p/∂ℓ are 0.
                    EntropyControl::ClipCov if chosen => (0.0, 0.0),
                    // KL-Cov: unclipped −A·ρ, plus β·|ℓ − ℓold| when selected.
                    EntropyControl::KlCov => {
                        let rho = (b.logp[t] - old[t]).exp();
                        let d = b.logp[t] - old[t];
                        if chosen {
                            kink = kink.min(d.abs());
                            (
                                -b.adv[i] * rho + cfg.kl_cov_coef * d.abs(),
                                // d|x|/dx at 0 is 0 (as PyTorch's abs).
                                -b.adv[i] * rho
                                    + cfg.kl_cov_coef * if d == 0.0 { 0.0 } else { d.signum() },
                            )
                        } else {
                            (-b.adv[i] * rho, -b.adv[i] * rho)
                        }
                    }
                    _ => (p, dp),
                }
            };
            let rho = b.tw.as_ref().map_or(1.0, |w| w[t]);
            m.pg_loss += k * rho * p;
            gl[t] += k * rho * dp;
            if let Some(h) = &b.ent {
                m.entropy_loss += k * h[t];
                gh[t] = -cfg.entropy_coef * k;
            }
            if let Some(r) = &b.refl {
                let (v, dv, kk) = kl(cfg.kl_kind, b.logp[t], r[t]);
                if cfg.kl_coef != 0.0 {
                    kink = kink.min(kk);
                }
                m.kl_loss += k * v;
                gl[t] += cfg.kl_coef * k * dv;
            }
        }
    }
    m.clipfrac = if ntok_roll > 0.0 {
        clipn / ntok_roll
    } else {
        0.0
    };
    m.clipfrac_lower = if ntok_roll > 0.0 {
        lowern / ntok_roll
    } else {
        0.0
    };
    m.ppo_kl = if ntok_roll > 0.0 {
        ppo / ntok_roll
    } else {
        0.0
    };

    // Exploration term.
    let has_baseline = match cfg.baseline {
        Baseline::Expert => b.expert.is_some(),
        Baseline::RefPolicy => b.refl.is_some(),
    };
    let mut deltas: Vec<f64> = Vec::new();
    if has_baseline {
        let ln = cfg.length_normalize;
        for i in 0..nrows {
            if !rollout[i] {
                continue;
            }
            let ci = b.c[i];
            let wi = b.w[i];
            // The expert slot (or None for ref_policy).
            let slot = match cfg.baseline {
                Baseline::Expert => {
                    let idx = b.expert.as_ref().unwrap().index[i];
                    if idx < 0 {
                        continue;
                    }
                    Some(idx as usize)
                }
                Baseline::RefPolicy => None,
            };
            match cfg.delta_mode {
                // SPEC §4.5: an empty rollout adds nothing, not even φ(c·E).
                DeltaMode::Sequence if n[i] == 0.0 => {}
                DeltaMode::Sequence => {
                    let ni = n[i];
                    let scale_i = if ln { safe(ni) } else { 1.0 };
                    let s: f64 = b.rows[i]
                        .clone()
                        .map(|t| b.mask[t] * b.logp[t])
                        .sum::<f64>()
                        * scale_i;
                    let base = match slot {
                        Some(g) => {
                            let e = b.expert.as_ref().unwrap();
                            let sum: f64 = e.rows[g].clone().map(|t| e.mask[t] * e.logp[t]).sum();
                            let ns: f64 = e.rows[g].clone().map(|t| e.mask[t]).sum();
                            if ln {
                                sum * safe(ns)
                            } else {
                                sum
                            }
                        }
                        None => {
                            let r = b.refl.as_ref().unwrap();
                            b.rows[i].clone().map(|t| b.mask[t] * r[t]).sum::<f64>() * scale_i
                        }
                    };
                    let delta = s - base;
                    deltas.push(delta);
                    let x = -ci * delta;
                    let (phi, dphi, kk) = activation(cfg, x);
                    kink = kink.min(kk);
                    m.explore_loss += safe(n_seq) * wi * phi;
                    for t in b.rows[i].clone() {
                        gl[t] += lam * safe(n_seq) * wi * dphi * (-ci) * b.mask[t] * scale_i;
                    }
                }
                DeltaMode::TokenAligned => {
                    let k = coef(i);
                    let start = b.rows[i].start;
                    for t in b.rows[i].clone() {
                        if b.mask[t] == 0.0 {
                            continue;
                        }
                        let pos = t - start;
                        let base = match slot {
                            Some(g) => {
                                let e = b.expert.as_ref().unwrap();
                                let r = &e.rows[g];
                                if pos < r.len() {
                                    e.mask[r.start + pos] * e.logp[r.start + pos]
                                } else {
                                    0.0
                                }
                            }
                            None => b.refl.as_ref().unwrap()[t],
                        };
                        let delta = b.logp[t] - base;
                        deltas.push(delta);
                        let x = -ci * delta;
                        let (phi, dphi, kk) = activation(cfg, x);
                        kink = kink.min(kk);
                        m.explore_loss += k * wi * phi;
                        gl[t] += lam * k * wi * dphi * (-ci);
                    }
                }
            }
        }
    }
    m.mean_delta = mean(&deltas);
    // docs/abi.md: "per-token mean of the referenced experts' log-probs" — the expert rows
    // given to the call (whatever the baseline), over their counted tokens.
    if let Some(e) = &b.expert {
        let (mut s, mut cnt) = (0.0, 0.0);
        for r in &e.rows {
            for t in r.clone() {
                s += e.mask[t] * e.logp[t];
                cnt += e.mask[t];
            }
        }
        m.mean_expert_logprob = if cnt > 0.0 { s / cnt } else { 0.0 };
    }
    let roll_rows: Vec<usize> = (0..nrows).filter(|&i| rollout[i]).collect();
    m.mean_response_length = mean(&roll_rows.iter().map(|&i| n[i]).collect::<Vec<_>>());
    m.frac_correct = mean(
        &roll_rows
            .iter()
            .map(|&i| (b.c[i] > 0.0) as u8 as f64)
            .collect::<Vec<_>>(),
    );
    m.mean_rarity_weight = mean(&roll_rows.iter().map(|&i| b.w[i]).collect::<Vec<_>>());
    // §4.6: selected share of the counted rollout tokens.
    let counted_roll: f64 = (0..nrows).filter(|&i| rollout[i]).map(|i| n[i]).sum();
    if counted_roll > 0.0 {
        m.cov_selected_frac = cov_selected.len() as f64 / counted_roll;
    }
    m.num_tokens = local_tok;
    m.num_seqs = local_seq;
    m.loss = m.pg_loss + lam * m.explore_loss - cfg.entropy_coef * m.entropy_loss
        + cfg.kl_coef * m.kl_loss;
    RefOut {
        grad_l: gl,
        grad_h: gh,
        m,
        kink,
        cov_selected,
    }
}

/// Only the scalar loss (for finite differences of the reference itself).
pub fn ref_value(cfg: &Config, b: &RefBatch) -> f64 {
    ref_loss(cfg, b).m.loss
}

// ---------------------------------------------------------------------------------------------
// §6 The fused logits path
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct RefLogits {
    pub logp: Vec<f64>,
    pub ent: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Forward of SPEC §6 on `[n, v]` logits (already in f64). Negative labels → 0 outputs.
pub fn ref_logits_forward(z: &[f64], n: usize, v: usize, labels: &[i64], temp: f64) -> RefLogits {
    let mut out = RefLogits {
        logp: vec![0.0; n],
        ent: vec![0.0; n],
        lse: vec![0.0; n],
    };
    for k in 0..n {
        if labels[k] < 0 {
            continue;
        }
        let u: Vec<f64> = z[k * v..(k + 1) * v].iter().map(|&x| x / temp).collect();
        let mx = u.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = u.iter().map(|&x| (x - mx).exp()).sum();
        let lse = mx + s.ln();
        let mut pu = 0.0;
        for &x in &u {
            if x == f64::NEG_INFINITY {
                continue;
            }
            pu += (x - lse).exp() * x;
        }
        out.lse[k] = lse;
        out.logp[k] = u[labels[k] as usize] - lse;
        out.ent[k] = lse - pu;
    }
    out
}

/// Analytic backward of SPEC §6: ∂L/∂z given g = ∂L/∂ℓ and h = ∂L/∂H.
pub fn ref_logits_backward(
    z: &[f64],
    n: usize,
    v: usize,
    labels: &[i64],
    temp: f64,
    g: &[f64],
    h: &[f64],
) -> Vec<f64> {
    let f = ref_logits_forward(z, n, v, labels, temp);
    let mut out = vec![0.0; n * v];
    for k in 0..n {
        if labels[k] < 0 {
            continue;
        }
        for j in 0..v {
            let u = z[k * v + j] / temp;
            if u == f64::NEG_INFINITY {
                continue;
            }
            let p = (u - f.lse[k]).exp();
            let delta = if j as i64 == labels[k] { 1.0 } else { 0.0 };
            let du = g[k] * (delta - p) - h[k] * p * (u - f.lse[k] + f.ent[k]);
            out[k * v + j] = du / temp;
        }
    }
    out
}
