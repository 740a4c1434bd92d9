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
use crate::error::{Error, Result};

/// A token that may be selected: its flat index, its covariance and whether the ratio clip
/// clipped it (p2 > p1). Tokens are given in increasing flat index.
pub struct CovToken {
    pub k: usize,
    pub adv: f64,
    pub logp: f64,
    pub clipped: bool,
}

/// The error for selection memory that cannot be had (an error status, never an abort).
pub fn no_memory(n: usize) -> Error {
    Error::invalid(
        "logprobs",
        format!(
            "Clip-Cov / KL-Cov needs working memory for {n} tokens, which could not be allocated"
        ),
    )
}

/// A vector of `n` values from `f`, allocated fallibly.
fn try_collect<T>(n: usize, values: impl Iterator<Item = T>) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| no_memory(n))?;
    v.extend(values);
    Ok(v)
}

/// The mean of the counted tokens' advantages: exactly their common value when they are all
/// equal (SPEC §4.6: then A − mean A is 0 for every token, and no rounding residue of a sum
/// ranks them), else the fixed-order sum over the count.
pub fn advantage_mean(tokens: &[CovToken]) -> f64 {
    match tokens.first() {
        None => 0.0,
        Some(t0) if tokens.iter().all(|t| t.adv == t0.adv) => t0.adv,
        Some(_) => fixed_order_sum(tokens, |t| t.adv) / tokens.len() as f64,
    }
}

/// The counted tokens' covariances `(A − mean A)(ℓ − mean ℓ)` and the number n to select.
fn covariances(cfg: &Config, tokens: &[CovToken]) -> Result<(Vec<f64>, usize)> {
    let local_n = tokens.len() as f64;
    let adv_mean = cfg.cov_adv_mean.unwrap_or_else(|| advantage_mean(tokens));
    let logp_mean = cfg.cov_logprob_mean.unwrap_or_else(|| {
        if local_n > 0.0 {
            fixed_order_sum(tokens, |t| t.logp) / local_n
        } else {
            0.0
        }
    });
    let n_tok = cfg.cov_token_count.unwrap_or(local_n);
    let cov = try_collect(
        tokens.len(),
        tokens
            .iter()
            .map(|t| (t.adv - adv_mean) * (t.logp - logp_mean)),
    )?;
    let ratio = match cfg.entropy_control {
        EntropyControl::ClipCov => cfg.clip_cov_ratio,
        _ => cfg.kl_cov_ratio,
    };
    Ok((cov, ((ratio * n_tok).floor() as usize).max(1)))
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

/// KL-Cov's sort key of a finite covariance: ascending key = descending covariance, −0 and +0
/// one key (a tie). The same map as `cov_candidate` in cuda/loss.cu.
pub fn kl_cov_key(cov: f64) -> u64 {
    let x = if cov == 0.0 { 0.0 } else { -cov };
    let bits = x.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

/// The flat indices of the selected tokens, in increasing order (empty when entropy control
/// is off or nothing qualifies). Candidates are sorted by (key, flat index), a total order
/// (flat indices are distinct): Clip-Cov's key is the seeded hash, KL-Cov's the descending
/// covariance. A covariance that is not finite (an overflow of finite inputs) is never a
/// candidate (SPEC §4.6).
pub fn select(cfg: &Config, tokens: &[CovToken]) -> Result<Vec<usize>> {
    if cfg.entropy_control == EntropyControl::None || tokens.is_empty() {
        return Ok(Vec::new());
    }
    let (cov, n) = covariances(cfg, tokens)?;
    let candidates = tokens.iter().zip(&cov).filter(|(t, &c)| {
        c.is_finite()
            && match cfg.entropy_control {
                EntropyControl::ClipCov => !t.clipped && cfg.clip_cov_lb < c && c < cfg.clip_cov_ub,
                _ => true,
            }
    });
    let count = candidates.clone().count();
    let mut keyed = try_collect(
        count,
        candidates.map(|(t, &c)| match cfg.entropy_control {
            EntropyControl::ClipCov => (cov_key(cfg.cov_seed, t.k as u64), t.k),
            _ => (kl_cov_key(c), t.k),
        }),
    )?;
    // Unstable sort: no allocation, and (key, k) pairs are distinct, so the order is unique.
    keyed.sort_unstable();
    keyed.truncate(n);
    let mut picked = try_collect(keyed.len(), keyed.iter().map(|&(_, k)| k))?;
    picked.sort_unstable();
    Ok(picked)
}
