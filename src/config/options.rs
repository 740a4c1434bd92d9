//! The choices of SPEC §4 that are not numbers: loss kind, Δ mode, activation, baseline,
//! aggregation, entropy control and KL estimator. Their serde names are the JSON values.

use serde::{Deserialize, Serialize};

/// Which objective the loss computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Clipped PG on rollouts + λ·exploration term against the expert baseline.
    Calibrl,
    /// Clipped PG only (the exploration term is off whatever λ says).
    Grpo,
    /// Expert rows trained with the LUFFY off-policy term `−A·π/(π+γ)`.
    Luffy,
    /// Expert rows trained with the RL-PLUS off-policy term.
    Rlplus,
}

/// How Δ is formed (SPEC §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaMode {
    /// The paper: sequence log-prob sums, Δ_i = S_i − E_g.
    Sequence,
    /// The authors' code: per token, Δ[i,t] = ℓ[i,t] − ℓ*[g,t].
    TokenAligned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    LeakyRelu,
    Relu,
    Tanh,
    Sigmoid,
    Huber,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    Expert,
    RefPolicy,
}

/// Token aggregation (SPEC §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aggregation {
    #[serde(rename = "token-mean")]
    TokenMean,
    #[serde(rename = "seq-mean-token-sum")]
    SeqMeanTokenSum,
    #[serde(rename = "seq-mean-token-mean")]
    SeqMeanTokenMean,
    #[serde(rename = "seq-mean-token-sum-norm")]
    SeqMeanTokenSumNorm,
    #[serde(rename = "token-sum")]
    TokenSum,
}

/// Covariance-based entropy control (SPEC §4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntropyControl {
    None,
    /// Zero p and ∂p/∂ℓ of a seeded random pick among unclipped tokens with lb < cov < ub.
    ClipCov,
    /// Add β·|ℓ − ℓold| to the unclipped p of the top-k tokens by cov.
    KlCov,
}

/// KL estimator (SPEC §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KlKind {
    #[serde(rename = "k1")]
    K1,
    #[serde(rename = "abs")]
    Abs,
    #[serde(rename = "k2", alias = "mse")]
    K2,
    #[serde(rename = "k3", alias = "low_var_kl")]
    K3,
}
