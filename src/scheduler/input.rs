//! What the planner takes: the step's prompts and the scheduler configuration.

use crate::config::LossKind;
use crate::error::{Error, Result};

/// verl's workload model of a 7B dense transformer (hidden size 4096): FLOPs ∝
/// `24576·s + s²`, i.e. `s + s²/24576` per sequence of `s` tokens.
pub const CALIBRL_DEFAULT_QUADRATIC_COEF: f64 = 1.0 / 24576.0;

/// One prompt of the step.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptInput {
    /// Prompt tokens (forwarded with every rollout and with the expert response).
    pub prompt_len: u32,
    /// Response length of each rollout; at least one rollout, each at least one token.
    pub rollout_lens: Vec<u32>,
    /// Response length of the expert response, when the prompt has one.
    pub expert_len: Option<u32>,
    /// One reward per rollout; required for pass-rate selection, ignored otherwise.
    pub rewards: Option<Vec<f64>>,
}

/// The step's prompts, in the order the trainer holds them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepInput {
    pub prompts: Vec<PromptInput>,
}

/// Which prompts get their expert response forwarded (and, for LUFFY / RL-PLUS, trained).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ExpertSelection {
    /// Every prompt that has an expert response.
    All,
    /// `round(fraction · E)` of the `E` prompts that have one, drawn with a seeded shuffle.
    RandomFraction { fraction: f64, seed: u64 },
    /// Prompts whose pass rate (share of rollouts with reward `> threshold`) lies in
    /// `[low, high]` — the authors' pass-ratio option (e.g. `[0, 0]`: only all-wrong groups).
    PassRate { low: f64, high: f64, threshold: f64 },
}

/// Most data-parallel ranks a plan supports.
pub const CALIBRL_MAX_DP_RANKS: usize = 1 << 20;
/// Most rank plans (ranks × passes) one plan holds, so that its memory stays bounded.
pub const CALIBRL_MAX_RANK_PASSES: usize = 1 << 22;

/// Scheduler configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// Number of data-parallel ranks (≥ 1).
    pub dp_ranks: usize,
    /// Maximum tokens (prompt + response) of one no-grad micro-batch.
    pub nograd_token_budget: u64,
    /// Maximum tokens (prompt + response) of one training micro-batch.
    pub train_token_budget: u64,
    /// Prompts per mini-batch (one optimiser step each); the last one may hold fewer.
    pub minibatch_prompts: usize,
    pub expert_selection: ExpertSelection,
    /// CalibRL / GRPO keep expert rows out of the training pass; LUFFY / RL-PLUS train them.
    /// GRPO has no use for experts, so none is selected.
    pub loss_kind: LossKind,
    /// `c` of the workload model `tokens + c·tokens²` (attention's quadratic term); ≥ 0.
    pub quadratic_coef: f64,
    /// DAPO dynamic sampling (SPEC §7.6): groups whose rewards are all equal are left out of
    /// both passes, the normalisers and expert selection (needs every prompt's rewards).
    pub dynamic_sampling: bool,
}

impl SchedulerConfig {
    /// A configuration with all experts selected, CalibRL and verl's workload model.
    pub fn new(
        dp_ranks: usize,
        nograd_token_budget: u64,
        train_token_budget: u64,
        minibatch_prompts: usize,
    ) -> Self {
        SchedulerConfig {
            dp_ranks,
            nograd_token_budget,
            train_token_budget,
            minibatch_prompts,
            expert_selection: ExpertSelection::All,
            loss_kind: LossKind::Calibrl,
            quadratic_coef: CALIBRL_DEFAULT_QUADRATIC_COEF,
            dynamic_sampling: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.dp_ranks == 0 {
            return Err(Error::invalid("config.dp_ranks", "must be at least 1"));
        }
        // A plan holds every rank's micro-batches: the count is bounded before anything is
        // allocated per rank.
        if self.dp_ranks > CALIBRL_MAX_DP_RANKS {
            return Err(Error::invalid(
                "config.dp_ranks",
                format!(
                    "{} exceeds the supported maximum {CALIBRL_MAX_DP_RANKS}",
                    self.dp_ranks
                ),
            ));
        }
        if self.nograd_token_budget == 0 {
            return Err(Error::invalid(
                "config.nograd_token_budget",
                "must be at least 1 token",
            ));
        }
        if self.train_token_budget == 0 {
            return Err(Error::invalid(
                "config.train_token_budget",
                "must be at least 1 token",
            ));
        }
        if self.minibatch_prompts == 0 {
            return Err(Error::invalid(
                "config.minibatch_prompts",
                "must be at least 1 prompt",
            ));
        }
        if !(self.quadratic_coef.is_finite() && self.quadratic_coef >= 0.0) {
            return Err(Error::invalid(
                "config.quadratic_coef",
                format!("{} must be finite and >= 0", self.quadratic_coef),
            ));
        }
        match self.expert_selection {
            ExpertSelection::All => {}
            ExpertSelection::RandomFraction { fraction, .. } => {
                if !(0.0..=1.0).contains(&fraction) {
                    return Err(Error::invalid(
                        "config.expert_selection.fraction",
                        format!("{fraction} is outside [0, 1]"),
                    ));
                }
            }
            ExpertSelection::PassRate {
                low,
                high,
                threshold,
            } => {
                if !(0.0..=1.0).contains(&low) || !(0.0..=1.0).contains(&high) || low > high {
                    return Err(Error::invalid(
                        "config.expert_selection",
                        format!(
                            "pass-rate window [{low}, {high}] must satisfy 0 <= low <= high <= 1"
                        ),
                    ));
                }
                if !threshold.is_finite() {
                    return Err(Error::invalid(
                        "config.expert_selection.threshold",
                        format!("{threshold} is not finite"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// True when expert rows are trained (and so counted by the normalisers).
    pub fn trains_experts(&self) -> bool {
        matches!(self.loss_kind, LossKind::Luffy | LossKind::Rlplus)
    }
}
