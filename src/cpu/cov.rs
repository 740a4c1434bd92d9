//! Covariance-based entropy control (SPEC §4.6, Cui et al. 2025): which rollout tokens Clip-Cov
//! detaches and which KL-Cov penalises. The selection depends only on the inputs and the seed
//! (never on a thread count): Clip-Cov draws its random subset as the candidates of smallest
//! seeded hash of their flat position, KL-Cov takes the largest covariances, ties by position.
//! The means are summed in an order fixed by the flat positions ([`fixed_order_sum`]), the
//! order the CUDA backend's kernels use, so both backends select the same tokens.

use crate::config::{Config, EntropyControl};
use crate::desc::loss::{
    COV_SUM_PER_THREAD as SUM_PER_THREAD, COV_SUM_THREADS as SUM_THREADS, COV_SUM_TILE as SUM_TILE,
};

/// A token that may be selected: its flat index, its covariance and whether the ratio clip
/// clipped it (p2 > p1). Tokens are given in increasing flat index.
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
            fixed_order_sum(tokens, f) / local_n
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

/// Σ f(token) in the order `calibrl_cov_prepare` (cuda/loss.cu) adds them, which depends on
/// the flat indices alone: thread j of tile t adds the tokens at flat indices
/// t·2048 + 8j … t·2048 + 8j + 7 in order (from +0); a tile adds its threads' sums by
/// `block_sum` (a shuffle tree in each warp of 32, then the 8 warps in order); the tiles' sums
/// go to thread t mod 256, in tile order, and those 256 sums through `block_sum` again. Any
/// order would do for one backend; this one gives both the same bits.
pub fn fixed_order_sum(tokens: &[CovToken], f: fn(&CovToken) -> f64) -> f64 {
    debug_assert!(tokens.windows(2).all(|w| w[0].k < w[1].k));
    let tiles = tokens.last().map_or(0, |t| t.k / SUM_TILE + 1);
    let mut across = [0.0f64; SUM_THREADS];
    let mut rest = tokens;
    for tile in 0..tiles {
        let n = rest.partition_point(|t| t.k / SUM_TILE == tile);
        let mut threads = [0.0f64; SUM_THREADS];
        for t in &rest[..n] {
            threads[(t.k % SUM_TILE) / SUM_PER_THREAD] += f(t);
        }
        rest = &rest[n..];
        across[tile % SUM_THREADS] += block_sum(&threads);
    }
    block_sum(&across)
}

/// cuda/loss.cu `block_sum` over 256 threads: per warp `v[l] += v[l + o]` for o = 16 … 1
/// (lane 0 keeps the warp's sum), then the warps' sums added in order from +0.
fn block_sum(v: &[f64; SUM_THREADS]) -> f64 {
    let mut total = 0.0;
    for warp in v.chunks_exact(32) {
        let mut x = [0.0f64; 32];
        x.copy_from_slice(warp);
        for o in [16, 8, 4, 2, 1] {
            for l in 0..o {
                x[l] += x[l + o];
            }
        }
        total += x[0];
    }
    total
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
