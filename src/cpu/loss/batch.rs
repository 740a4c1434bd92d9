//! The host inputs and outputs of one loss call.

use crate::desc::metrics::{CalibrlMetrics as Metrics, CalibrlNormalizers as Normalizers};
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
