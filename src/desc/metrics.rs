//! The loss's results and global denominators, shared by both backends, the scheduler and the
//! C ABI (`#[repr(C)]`: these are the ABI's `calibrl_metrics` and `calibrl_normalizers`).

/// Global denominators of SPEC §4.5 (all ranks, all micro-batches of a mini-batch).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CalibrlNormalizers {
    /// Σ m over the trained rows' tokens (rollouts; plus expert rows for LUFFY / RL-PLUS): the
    /// denominator of L_pg and L_explore.
    pub token_count: f64,
    /// Number of trained rows with at least one counted token.
    pub seq_count: f64,
    /// Σ m over every row's tokens, expert rows included: the denominator of entropy and KL
    /// under the `authors` preset (SPEC §4.7). 0 means "equal to `token_count`" (no untrained
    /// expert row in the mini-batch; always the case for the other presets, which ignore it).
    /// Otherwise it must be >= `token_count`.
    pub all_token_count: f64,
    /// Number of rows with at least one counted token, expert rows included (SPEC §4.7); 0
    /// means "equal to `seq_count`", otherwise it must be >= `seq_count`.
    pub all_seq_count: f64,
}

impl CalibrlNormalizers {
    /// Rollout-row counts only (no expert row counted apart: the all-row counts are the same).
    pub fn new(token_count: f64, seq_count: f64) -> Self {
        CalibrlNormalizers {
            token_count,
            seq_count,
            all_token_count: 0.0,
            all_seq_count: 0.0,
        }
    }
}

/// Loss metrics, in the order of the `metrics` output tensor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CalibrlMetrics {
    /// Total loss L = L_pg + λ·L_explore − β_H·L_H + β_KL·L_KL (additive across slices).
    pub loss: f64,
    pub pg_loss: f64,
    /// L_explore before λ.
    pub explore_loss: f64,
    /// L_H (the entropy aggregate, before −β_H).
    pub entropy_loss: f64,
    /// L_KL (before β_KL).
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
    /// Clip-Cov / KL-Cov: the fraction of counted rollout tokens selected (SPEC §4.6; local).
    pub cov_selected_frac: f64,
}

pub const METRICS_LEN: usize = 16;

impl CalibrlMetrics {
    /// The inverse of [`CalibrlMetrics::to_array`].
    pub fn from_array(v: &[f64; METRICS_LEN]) -> Self {
        let [loss, pg_loss, explore_loss, entropy_loss, kl_loss, clipfrac, clipfrac_lower, ppo_kl, mean_delta, mean_expert_logprob, mean_response_length, frac_correct, mean_rarity_weight, num_tokens, num_seqs, cov_selected_frac] =
            *v;
        CalibrlMetrics {
            loss,
            pg_loss,
            explore_loss,
            entropy_loss,
            kl_loss,
            clipfrac,
            clipfrac_lower,
            ppo_kl,
            mean_delta,
            mean_expert_logprob,
            mean_response_length,
            frac_correct,
            mean_rarity_weight,
            num_tokens,
            num_seqs,
            cov_selected_frac,
        }
    }

    /// The values in the order of the `metrics` output tensor.
    pub fn to_array(&self) -> [f64; METRICS_LEN] {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_array_inverts_to_array() {
        let v: [f64; METRICS_LEN] = std::array::from_fn(|i| i as f64 + 0.5);
        assert_eq!(CalibrlMetrics::from_array(&v).to_array(), v);
    }
}
