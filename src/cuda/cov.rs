//! Clip-Cov and KL-Cov on CUDA (SPEC §4.6; kernels `calibrl_cov_*` in `cuda/loss.cu`).
//!
//! The loss call runs, on its stream and before the loss kernel, `calibrl_cov_prepare` (the
//! covariance's means and N_tok) and one `calibrl_cov_histogram` per byte of the radix select
//! (8 over the 64-bit key, then one per byte of the largest flat index). The selection lives in
//! device memory (a threshold on (key, flat index)) and the loss kernel applies it inline, so
//! nothing synchronises with the host and the call stays capturable in a CUDA graph. The tokens
//! selected are the CPU backend's (`crate::cpu::cov`): the same keys, the same order, and means
//! summed in the same fixed order on both backends (`crate::cpu::cov::fixed_order_sum`).

use crate::config::{Config, EntropyControl};
use cudarc::driver::sys;

/// Threads per block of the entropy-control kernels (COV_THREADS in cuda/loss.cu).
pub(super) const THREADS: u32 = 256;
/// Flat indices per block iteration (COV_TILE in cuda/loss.cu).
const TILE: usize = crate::desc::loss::COV_SUM_TILE;
/// Histogram bins (COV_BINS in cuda/loss.cu).
const BINS: usize = 256;
/// Bytes of the sort key (COV_KEY_PASSES in cuda/loss.cu).
const KEY_PASSES: i64 = 8;
/// Doubles per tile in the tile sums (COV_TILE_FIELDS in cuda/loss.cu).
const TILE_FIELDS: usize = 5;
/// Doubles of `CovState` in cuda/loss.cu, rounded up.
const STATE_DOUBLES: usize = 16;

/// Mirrors `CovParams` in cuda/loss.cu (every field 8 bytes wide); the last field of the loss
/// kernels' parameter struct.
#[repr(C)]
#[derive(Default)]
pub(super) struct CovParams {
    control: i64,
    lb: f64,
    ub: f64,
    ratio: f64,
    coef: f64,
    seed: u64,
    given: i64,
    adv_mean: f64,
    logprob_mean: f64,
    token_count: f64,
    pass: i64,
    k_passes: i64,
    numel: i64,
    tiles: i64,
    state: sys::CUdeviceptr,
    hist: sys::CUdeviceptr,
    tile_sums: sys::CUdeviceptr,
}

/// The parameters for a policy tensor of `numel` elements (workspace pointers unset).
pub(super) fn params(cfg: &Config, numel: usize) -> CovParams {
    let control = match cfg.entropy_control {
        EntropyControl::None => return CovParams::default(),
        EntropyControl::ClipCov => 1,
        EntropyControl::KlCov => 2,
    };
    let given = cfg.cov_adv_mean.is_some() as i64
        | (cfg.cov_logprob_mean.is_some() as i64) << 1
        | (cfg.cov_token_count.is_some() as i64) << 2;
    // Bytes needed by the largest flat index numel − 1.
    let index_bits = usize::BITS - numel.saturating_sub(1).leading_zeros();
    CovParams {
        control,
        lb: cfg.clip_cov_lb,
        ub: cfg.clip_cov_ub,
        ratio: match cfg.entropy_control {
            EntropyControl::ClipCov => cfg.clip_cov_ratio,
            _ => cfg.kl_cov_ratio,
        },
        coef: cfg.kl_cov_coef,
        seed: cfg.cov_seed,
        given,
        adv_mean: cfg.cov_adv_mean.unwrap_or(0.0),
        logprob_mean: cfg.cov_logprob_mean.unwrap_or(0.0),
        token_count: cfg.cov_token_count.unwrap_or(0.0),
        pass: 0,
        k_passes: index_bits.div_ceil(8) as i64,
        numel: numel as i64,
        tiles: numel.div_ceil(TILE) as i64,
        state: 0,
        hist: 0,
        tile_sums: 0,
    }
}

impl CovParams {
    fn on(&self) -> bool {
        self.control != 0
    }

    /// Workspace bytes the kernels need (0 when entropy control is off).
    pub(super) fn workspace_bytes(&self) -> usize {
        if !self.on() {
            return 0;
        }
        (STATE_DOUBLES + BINS + TILE_FIELDS * self.tiles as usize) * 8
    }

    /// Places the state, the histogram and the tile sums at `base` (`workspace_bytes` long).
    pub(super) fn set_workspace(&mut self, base: sys::CUdeviceptr) {
        if self.on() {
            self.state = base;
            self.hist = base + (STATE_DOUBLES * 8) as u64;
            self.tile_sums = self.hist + (BINS * 8) as u64;
        }
    }

    /// The launches before the loss kernel, in order: (kernel, blocks, digit pass). Blocks are
    /// at most `max_blocks` (the kernels loop over tiles); results do not depend on them.
    pub(super) fn launches(&self, max_blocks: usize) -> Vec<(&'static str, usize, i64)> {
        if !self.on() {
            return Vec::new();
        }
        let blocks = (self.tiles as usize).clamp(1, max_blocks.max(1));
        let mut v = vec![("calibrl_cov_prepare", blocks, 0)];
        v.extend(
            (0..KEY_PASSES + self.k_passes).map(|pass| ("calibrl_cov_histogram", blocks, pass)),
        );
        v
    }

    /// Sets the digit pass of the next `calibrl_cov_histogram` launch.
    pub(super) fn set_pass(&mut self, pass: i64) {
        self.pass = pass;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_passes_cover_the_largest_flat_index() {
        let cfg = Config {
            entropy_control: EntropyControl::KlCov,
            ..Config::default()
        };
        for (numel, passes) in [(0, 0), (1, 0), (2, 1), (256, 1), (257, 2), (65537, 3)] {
            assert_eq!(params(&cfg, numel).k_passes, passes, "numel {numel}");
        }
        let p = params(&cfg, 5000);
        assert_eq!(p.tiles, 3);
        assert_eq!(p.launches(1000).len(), 1 + 8 + 2);
        assert!(params(&Config::default(), 5000).launches(10).is_empty());
        assert_eq!(params(&Config::default(), 5000).workspace_bytes(), 0);
    }
}
