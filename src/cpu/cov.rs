//! Covariance-based entropy control (SPEC §4.6, Cui et al. 2025): which rollout tokens Clip-Cov
//! detaches and which KL-Cov penalises. The selection depends only on the inputs and the seed
//! (never on a thread count): Clip-Cov draws its random subset as the candidates of smallest
//! seeded hash of their flat position, KL-Cov takes the largest covariances, ties by position.

use crate::config::{Config, EntropyControl};

/// A token that may be selected: its flat index, its covariance and whether the ratio clip
/// clipped it (p2 > p1).
pub struct CovToken {
    pub k: usize,
    pub adv: f64,
    pub logp: f64,
    pub clipped: bool,
}

/// The counted tokens' covariances `(A − mean A)(ℓ − mean ℓ)` and the number n to select.
fn covariances(cfg: &Config, tokens: &[CovToken]) -> (Vec<f64>, usize) {
    let local_n = tokens.len() as f64;
    let mean = |f: fn(&CovToken) -> f64| {
        if local_n > 0.0 {
            tokens.iter().map(f).sum::<f64>() / local_n
        } else {
            0.0
        }
    };
    let adv_mean = cfg.cov_adv_mean.unwrap_or_else(|| mean(|t| t.adv));
    let logp_mean = cfg.cov_logprob_mean.unwrap_or_else(|| mean(|t| t.logp));
    let n_tok = cfg.cov_token_count.unwrap_or(local_n);
    let cov = tokens
        .iter()
        .map(|t| (t.adv - adv_mean) * (t.logp - logp_mean))
        .collect();
    let ratio = match cfg.entropy_control {
        EntropyControl::ClipCov => cfg.clip_cov_ratio,
        _ => cfg.kl_cov_ratio,
    };
    (cov, ((ratio * n_tok).floor() as usize).max(1))
}

/// SplitMix64 of the seed and a position: Clip-Cov's random key.
pub fn cov_key(seed: u64, k: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(k)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The flat indices of the selected tokens, in increasing order (empty when entropy control
/// is off or nothing qualifies).
pub fn select(cfg: &Config, tokens: &[CovToken]) -> Vec<usize> {
    if cfg.entropy_control == EntropyControl::None || tokens.is_empty() {
        return Vec::new();
    }
    let (cov, n) = covariances(cfg, tokens);
    let mut picked: Vec<usize> = match cfg.entropy_control {
        EntropyControl::ClipCov => {
            let mut cand: Vec<(u64, usize)> = tokens
                .iter()
                .zip(&cov)
                .filter(|(t, &c)| !t.clipped && cfg.clip_cov_lb < c && c < cfg.clip_cov_ub)
                .map(|(t, _)| (cov_key(cfg.cov_seed, t.k as u64), t.k))
                .collect();
            cand.sort_unstable();
            cand.into_iter().take(n).map(|(_, k)| k).collect()
        }
        _ => {
            // Largest covariance first; equal covariances by position.
            let mut order: Vec<usize> = (0..tokens.len()).collect();
            // (partial_cmp: −0 and +0 are the same covariance, a tie; inputs are finite.)
            order.sort_by(|&a, &b| {
                cov[b]
                    .partial_cmp(&cov[a])
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(tokens[a].k.cmp(&tokens[b].k))
            });
            order.into_iter().take(n).map(|j| tokens[j].k).collect()
        }
    };
    picked.sort_unstable();
    picked
}
