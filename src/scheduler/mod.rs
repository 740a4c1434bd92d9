//! The expert-baseline forward-pass scheduler (SPEC.md §7).
//!
//! One training step's prompts (each with `G_g` rollouts of known length and at most one expert
//! response) become a [`Plan`]:
//! - the **no-grad pass** (old / expert log-probs): every rollout and one copy of each selected
//!   expert response, packed into token-budgeted micro-batches, balanced over data-parallel ranks;
//! - the **training pass**, per mini-batch: rollouts only for CalibRL / GRPO (expert rows too for
//!   LUFFY / RL-PLUS), the same micro-batch count on every rank;
//! - the **gather map** rollout → expert slot, and the **global normalisers** (SPEC §4.5) of each
//!   mini-batch, in the form `calibrl_loss` takes.
//!
//! # Sequence ids
//! Rollouts are numbered `0..R` in input order (prompt 0's rollouts first, then prompt 1's, ...).
//! Expert slots are numbered `0..P*` over the prompts whose expert is selected, in prompt order.
//! The single id space used by the plan (and the C ABI) is: rollout `i` → id `i`, expert slot
//! `s` → id `R + s`. Expert slot `s` is also the expert's index in the packed expert tensor
//! (`expert_offsets[s]..expert_offsets[s+1]`) and the value the gather map holds (`expert_index`
//! of the loss).
//!
//! # Tokens
//! A sequence's tokens are its prompt length plus its response length (what the forward pass
//! runs over); budgets and balancing use them. The normalisers count response tokens only (what
//! the loss aggregates), assuming every response token counts (mask = 1).

mod expert;
mod input;
mod partition;
mod plan;
mod planner;
mod selection;

pub use expert::{expert_sums, scatter_expert_logprobs};
pub use input::{
    ExpertSelection, PromptInput, SchedulerConfig, StepInput, CALIBRL_DEFAULT_QUADRATIC_COEF,
    CALIBRL_MAX_DP_RANKS, CALIBRL_MAX_RANK_PASSES,
};
pub(crate) use plan::check_index;
pub use plan::{MicroBatch, Minibatch, PassKind, PassPlan, Plan, SeqKind, SeqRef};
pub use planner::plan;
pub use selection::SplitMix64;
