//! The scheduler ABI's constants, `#[repr(C)]` structures and the opaque plan handle.

use crate::desc::metrics::CalibrlNormalizers;
use crate::scheduler::Plan;

/// `calibrl_scheduler_config.loss_kind`: CalibRL (expert rows forwarded once, never trained).
pub const CALIBRL_LOSS_CALIBRL: u32 = 0;
/// `loss_kind`: GRPO (no expert is forwarded).
pub const CALIBRL_LOSS_GRPO: u32 = 1;
/// `loss_kind`: LUFFY (expert rows also trained).
pub const CALIBRL_LOSS_LUFFY: u32 = 2;
/// `loss_kind`: RL-PLUS (expert rows also trained).
pub const CALIBRL_LOSS_RLPLUS: u32 = 3;

/// `calibrl_scheduler_config.expert_selection`: every prompt that has an expert.
pub const CALIBRL_SELECT_ALL: u32 = 0;
/// `expert_selection`: `round(fraction · E)` of the `E` prompts with an expert, seeded by `seed`.
pub const CALIBRL_SELECT_RANDOM_FRACTION: u32 = 1;
/// `expert_selection`: prompts whose pass rate (share of rollouts with reward
/// `> reward_threshold`) lies in `[pass_rate_low, pass_rate_high]`; needs `rewards`.
pub const CALIBRL_SELECT_PASS_RATE: u32 = 2;

/// Sequence kind written by the micro-batch queries: a rollout.
pub const CALIBRL_SEQ_ROLLOUT: u8 = 0;
/// Sequence kind: an expert response.
pub const CALIBRL_SEQ_EXPERT: u8 = 1;

/// `pass` argument of `calibrl_plan_oversize`: the no-grad pass.
pub const CALIBRL_PASS_NOGRAD: u32 = 0;
/// `pass` argument of `calibrl_plan_oversize`: the training pass (all mini-batches).
pub const CALIBRL_PASS_TRAIN: u32 = 1;

/// Scheduler configuration. Fill it with `calibrl_scheduler_config_default`, then set fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CalibrlSchedulerConfig {
    /// Data-parallel ranks (>= 1).
    pub dp_ranks: u32,
    /// Prompts per mini-batch (>= 1); the last mini-batch may hold fewer.
    pub minibatch_prompts: u32,
    /// Maximum prompt + response tokens of one no-grad micro-batch (>= 1).
    pub nograd_token_budget: u64,
    /// Maximum prompt + response tokens of one training micro-batch (>= 1).
    pub train_token_budget: u64,
    /// `CALIBRL_LOSS_*`.
    pub loss_kind: u32,
    /// `CALIBRL_SELECT_*`.
    pub expert_selection: u32,
    /// Seed of `CALIBRL_SELECT_RANDOM_FRACTION`.
    pub seed: u64,
    /// Fraction in [0, 1] for `CALIBRL_SELECT_RANDOM_FRACTION`.
    pub fraction: f64,
    /// Pass-rate window for `CALIBRL_SELECT_PASS_RATE` (0 <= low <= high <= 1).
    pub pass_rate_low: f64,
    pub pass_rate_high: f64,
    /// A rollout passes when its reward is > this (default 0.1, the loss's τ).
    pub reward_threshold: f64,
    /// `c` of the workload model `tokens + c·tokens²` (default 1/24576, verl's 7B model).
    pub quadratic_coef: f64,
    /// Non-zero: DAPO dynamic sampling (SPEC §7.6) — prompts whose rollouts' rewards are all
    /// equal are left out of both passes, the normalisers and expert selection; `rewards` is
    /// then required. `calibrl_plan_dropped_prompts` lists them. (ABI 3.)
    pub dynamic_sampling: u32,
}

/// One prompt of the step.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CalibrlPromptDesc {
    /// Prompt tokens.
    pub prompt_len: u32,
    /// Number of rollouts (>= 1); their lengths follow the previous prompts' in `rollout_lens`.
    pub num_rollouts: u32,
    /// Expert response length, or -1 when the prompt has none.
    pub expert_len: i64,
}

/// Counts of a plan.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CalibrlPlanInfo {
    pub num_prompts: u64,
    /// R: rollout ids are 0..R.
    pub num_rollouts: u64,
    /// P*: expert slot ids are R..R+P*.
    pub num_expert_slots: u64,
    /// T*: length of the packed expert tensor.
    pub expert_tokens: u64,
    pub dp_ranks: u64,
    /// Micro-batches of the no-grad pass on every rank.
    pub nograd_microbatches: u64,
    pub num_minibatches: u64,
    /// Sequences over the no-grad budget (each alone in a micro-batch).
    pub nograd_oversize: u64,
    /// Sequences over the training budget, all mini-batches together.
    pub train_oversize: u64,
    /// Prompts left out by dynamic sampling (0 when it is off). (ABI 3.)
    pub dropped_prompts: u64,
}

/// One mini-batch of the training pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CalibrlMinibatchInfo {
    /// Its prompts are first_prompt .. first_prompt + num_prompts.
    pub first_prompt: u64,
    pub num_prompts: u64,
    /// Micro-batches on every rank.
    pub microbatches: u64,
    /// Its global normalisers (what `calibrl_loss` takes).
    pub normalizers: CalibrlNormalizers,
}

/// One sequence of a plan.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CalibrlSeqInfo {
    /// `CALIBRL_SEQ_ROLLOUT` or `CALIBRL_SEQ_EXPERT`.
    pub kind: u32,
    /// The prompt it belongs to.
    pub prompt: u32,
    /// Rollout index (0..R) or expert slot (0..P*).
    pub index: u32,
    /// Prompt + response tokens.
    pub tokens: u32,
    /// Response tokens.
    pub response_len: u32,
}

/// Opaque plan handle.
pub struct CalibrlPlan {
    pub(crate) inner: Plan,
}
