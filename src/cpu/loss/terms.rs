//! The per-token terms of SPEC §4.2–§4.6 as (value, derivative) pairs, and the summing
//! helpers every aggregation uses.

use crate::config::{Activation, Config, KlKind, LossKind};

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
pub(super) fn fsum(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, |a, b| a + b)
}

/// `mask · x` that never reads `x` where the mask is 0 (padding may hold NaN or ±inf).
pub(super) fn masked(mask: f64, x: f64) -> f64 {
    if mask == 0.0 {
        0.0
    } else {
        mask * x
    }
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
