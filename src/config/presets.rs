//! The complete [`Config`], the named presets of SPEC §5, and the derived switches the
//! backends read.

use super::options::{
    Activation, Aggregation, Baseline, DeltaMode, EntropyControl, KlKind, LossKind,
};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The complete configuration. Field names are the JSON keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub loss: LossKind,
    pub delta_mode: DeltaMode,
    /// Divide S_i by n_i and E_g by n*_g (appendix C ablation).
    pub length_normalize: bool,
    pub activation: Activation,
    /// LeakyReLU negative slope α.
    pub alpha: f64,
    pub baseline: Baseline,
    /// w_i = |A_i| when on, 1 when off (Table 4 ablation).
    pub rarity_weighting: bool,
    /// λ, the exploration coefficient.
    pub lambda: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    /// Dual-clip constant c; off when ≤ 1.
    pub dual_clip: f64,
    pub agg: Aggregation,
    /// The constant denominator of `seq-mean-token-sum-norm`.
    pub t_norm: Option<f64>,
    pub norm_by_std: bool,
    pub adv_eps: f64,
    /// τ: a rollout is correct when r > τ (unless correctness is given explicitly).
    pub correct_threshold: f64,
    /// β_H (the entropy bonus enters the loss as −β_H·L_H).
    pub entropy_coef: f64,
    /// β_KL.
    pub kl_coef: f64,
    pub kl_kind: KlKind,
    /// γ of LUFFY's f(π) = π/(π+γ).
    pub luffy_gamma: f64,
    /// SPEC §4.7 (preset `authors`): entropy, KL, the normalisers and the metrics take every
    /// row, expert rows included; a rollout without a selected expert explores against ℓ* = 0.
    pub authors_arithmetic: bool,
    /// SPEC §4.6.
    pub entropy_control: EntropyControl,
    pub clip_cov_ratio: f64,
    pub clip_cov_lb: f64,
    pub clip_cov_ub: f64,
    pub kl_cov_ratio: f64,
    pub kl_cov_coef: f64,
    /// Seed of Clip-Cov's random selection.
    pub cov_seed: u64,
    /// Caller-provided global means of A and ℓ and the global counted-token count (all ranks);
    /// null: this call's own.
    pub cov_adv_mean: Option<f64>,
    pub cov_logprob_mean: Option<f64>,
    pub cov_token_count: Option<f64>,
}

pub const PRESETS: [&str; 4] = ["paper", "reference", "grpo", "authors"];

impl Default for Config {
    fn default() -> Self {
        Config::preset("paper").expect("paper preset exists")
    }
}

impl Config {
    /// A named preset of SPEC §5.
    pub fn preset(name: &str) -> Result<Config> {
        let paper = Config {
            loss: LossKind::Calibrl,
            delta_mode: DeltaMode::Sequence,
            length_normalize: false,
            activation: Activation::LeakyRelu,
            alpha: 0.5,
            baseline: Baseline::Expert,
            rarity_weighting: true,
            lambda: 0.1,
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: 3.0,
            agg: Aggregation::TokenMean,
            t_norm: None,
            norm_by_std: false,
            adv_eps: 1e-6,
            correct_threshold: 0.1,
            entropy_coef: 0.0,
            kl_coef: 0.0,
            kl_kind: KlKind::K3,
            luffy_gamma: 0.1,
            authors_arithmetic: false,
            entropy_control: EntropyControl::None,
            clip_cov_ratio: 2e-4,
            clip_cov_lb: 1.0,
            clip_cov_ub: 5.0,
            // verl 0.9.1 actor.yaml: policy_loss.kl_cov_ratio, policy_loss.ppo_kl_coef.
            kl_cov_ratio: 2e-4,
            kl_cov_coef: 0.1,
            cov_seed: 0,
            cov_adv_mean: None,
            cov_logprob_mean: None,
            cov_token_count: None,
        };
        match name {
            "paper" => Ok(paper),
            "reference" => Ok(Config {
                delta_mode: DeltaMode::TokenAligned,
                ..paper
            }),
            "grpo" => Ok(Config {
                loss: LossKind::Grpo,
                lambda: 0.0,
                ..paper
            }),
            "authors" => Ok(Config {
                delta_mode: DeltaMode::TokenAligned,
                authors_arithmetic: true,
                ..paper
            }),
            other => Err(Error::config(
                "preset",
                format!(
                    "unknown preset {other:?} (expected one of {})",
                    PRESETS.join(", ")
                ),
            )),
        }
    }

    /// λ as it applies: zero unless the loss kind is CalibRL.
    pub fn effective_lambda(&self) -> f64 {
        if self.loss == LossKind::Calibrl {
            self.lambda
        } else {
            0.0
        }
    }

    pub fn trains_expert_rows(&self) -> bool {
        matches!(self.loss, LossKind::Luffy | LossKind::Rlplus)
    }

    /// SPEC §4.7 applies: the `authors` preset, unless LUFFY / RL-PLUS train the expert rows.
    pub fn authors(&self) -> bool {
        self.authors_arithmetic && !self.trains_expert_rows()
    }

    /// Whether the dual clip caps p for A < 0: never under Clip-Cov / KL-Cov (SPEC §4.6, as in
    /// verl), at any c_dual under the authors' arithmetic (§4.7), else when c_dual > 1 (§4.1).
    pub fn dual_clip_on(&self) -> bool {
        self.entropy_control == EntropyControl::None && (self.authors() || self.dual_clip > 1.0)
    }
}
