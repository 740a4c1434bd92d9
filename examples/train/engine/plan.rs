//! Planning the passes of one training step with the library's scheduler (SPEC §7,
//! `calibrl::scheduler`), and the plan in the terms the trainer uses: rows named by (prompt,
//! rollout) or (prompt, expert).
//!
//! The scheduler decides: the no-grad pass holds every rollout and exactly one copy of each
//! selected expert response (none for GRPO, which has no use for them); the training pass holds
//! rollouts only (plus expert rows for LUFFY / RL-PLUS); each mini-batch carries its global
//! normalisers; the gather map sends each rollout to its prompt's expert slot.

use calibrl::config::LossKind;
use calibrl::desc::metrics::CalibrlNormalizers;
use calibrl::scheduler::{self, PromptInput, SchedulerConfig, SeqKind, SeqRef, StepInput};

/// What the planner is told about one prompt of the step.
pub struct PromptRows {
    pub prompt_len: usize,
    pub rollout_lens: Vec<usize>,
    /// Length of its expert response, when the prompt has one.
    pub expert_len: Option<usize>,
}

/// A row of a pass: rollout `index` of prompt `group`, or the expert response of `group`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowRef {
    Rollout { group: usize, index: usize },
    Expert { group: usize },
}

/// Rows that run together in one forward (and, in training, one backward).
#[derive(Clone, Debug, Default)]
pub struct MicroBatch {
    pub rows: Vec<RowRef>,
}

/// One optimiser update: its micro-batches and the normalisers they all share.
#[derive(Clone, Debug)]
pub struct MiniBatch {
    pub micro: Vec<MicroBatch>,
    pub normalizers: CalibrlNormalizers,
}

#[derive(Clone, Debug)]
pub struct StepPlan {
    /// Old log-probs of the rollouts and ℓ* of each selected expert response (no gradient).
    pub no_grad: Vec<MicroBatch>,
    pub train: Vec<MiniBatch>,
    /// Gather map per group: its expert slot (`None` = no expert forwarded), slots numbered as
    /// the scheduler numbers them.
    pub expert_slot: Vec<Option<usize>>,
    pub num_expert_slots: usize,
}

/// Plans a step on one data-parallel rank: `minibatch_prompts` prompts per optimiser update,
/// micro-batches under `token_budget` tokens (prompt + response).
pub fn plan_step(
    prompts: &[PromptRows],
    loss: LossKind,
    minibatch_prompts: usize,
    token_budget: usize,
) -> StepPlan {
    let input = StepInput {
        prompts: prompts
            .iter()
            .map(|p| PromptInput {
                prompt_len: p.prompt_len as u32,
                rollout_lens: p.rollout_lens.iter().map(|&l| l as u32).collect(),
                expert_len: p.expert_len.map(|l| l as u32),
                rewards: None,
            })
            .collect(),
    };
    let config = SchedulerConfig {
        loss_kind: loss,
        // The demo's policy costs the same per token whatever the length: no attention term.
        quadratic_coef: 0.0,
        ..SchedulerConfig::new(
            1,
            token_budget as u64,
            token_budget as u64,
            minibatch_prompts,
        )
    };
    let plan = scheduler::plan(&input, &config).expect("a valid step plan");

    // The scheduler numbers rollouts globally and experts by slot; name them by prompt.
    let row = |s: &SeqRef| match s.kind {
        SeqKind::Rollout => {
            let group = plan.rollout_prompt[s.index as usize] as usize;
            RowRef::Rollout {
                group,
                index: s.index as usize - plan.rollout_offsets[group],
            }
        }
        SeqKind::Expert => RowRef::Expert {
            group: plan.expert_prompts[s.index as usize] as usize,
        },
    };
    let micro = |mbs: &[scheduler::MicroBatch]| -> Vec<MicroBatch> {
        mbs.iter()
            .filter(|mb| !mb.seqs.is_empty())
            .map(|mb| MicroBatch {
                rows: mb.seqs.iter().map(row).collect(),
            })
            .collect()
    };
    let mut expert_slot = vec![None; prompts.len()];
    for (slot, &g) in plan.expert_prompts.iter().enumerate() {
        expert_slot[g as usize] = Some(slot);
    }
    StepPlan {
        no_grad: micro(&plan.nograd.ranks[0]),
        train: plan
            .minibatches
            .iter()
            .map(|m| MiniBatch {
                micro: micro(&m.pass.ranks[0]),
                normalizers: m.normalizers,
            })
            .collect(),
        expert_slot,
        num_expert_slots: plan.num_expert_slots(),
    }
}
