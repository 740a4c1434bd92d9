//! Planning the passes of one training step (SPEC §7). This is the one place that decides
//! which rows run in which pass; everything else follows the plan.
//!
//! INTERIM: the library's scheduler (`calibrl::scheduler`, branch `sched`) was not usable when
//! this demo was written, so `plan_step` packs the passes itself, following SPEC §7 (one rank):
//! the no-grad pass holds every rollout and exactly one copy of each expert response; the
//! training pass holds rollouts only (plus expert rows for LUFFY / RL-PLUS); mini-batches get
//! their global normalisers; a gather map sends each group to its expert slot. Swap the body
//! for the scheduler's plan once it lands; the types below are what the trainer consumes.

use calibrl::cpu::loss::CalibrlNormalizers;

/// What the planner is told about one prompt of the step.
pub struct PromptRows {
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
    /// Old log-probs of the rollouts and ℓ* of each expert response (no gradient).
    pub no_grad: Vec<MicroBatch>,
    pub train: Vec<MiniBatch>,
    /// Gather map: the expert slot of each group (`None` = no expert), slots numbered in the
    /// order the expert rows appear in the no-grad pass.
    pub expert_slot: Vec<Option<usize>>,
}

/// Plans a step: `mini_batches` optimiser updates over whole groups, micro-batches packed
/// greedily under `token_budget` tokens. Expert rows enter the training pass only when
/// `train_experts` (LUFFY / RL-PLUS).
pub fn plan_step(
    prompts: &[PromptRows],
    train_experts: bool,
    mini_batches: usize,
    token_budget: usize,
) -> StepPlan {
    let len = |r: RowRef| match r {
        RowRef::Rollout { group, index } => prompts[group].rollout_lens[index],
        RowRef::Expert { group } => prompts[group].expert_len.expect("expert row has a length"),
    };
    let rollouts = |g: usize| {
        (0..prompts[g].rollout_lens.len()).map(move |i| RowRef::Rollout { group: g, index: i })
    };
    let expert = |g: usize| prompts[g].expert_len.map(|_| RowRef::Expert { group: g });

    let mut expert_slot = Vec::with_capacity(prompts.len());
    let mut next = 0;
    for p in prompts {
        expert_slot.push(p.expert_len.map(|_| {
            next += 1;
            next - 1
        }));
    }

    let all: Vec<RowRef> = (0..prompts.len())
        .flat_map(|g| rollouts(g).chain(expert(g)))
        .collect();
    let no_grad = pack(&all, token_budget, len);

    let per_mini = prompts.len().div_ceil(mini_batches.max(1)).max(1);
    let train = (0..prompts.len())
        .collect::<Vec<_>>()
        .chunks(per_mini)
        .map(|groups| {
            let rows: Vec<RowRef> = groups
                .iter()
                .flat_map(|&g| {
                    let e = if train_experts { expert(g) } else { None };
                    rollouts(g).chain(e)
                })
                .collect();
            MiniBatch {
                normalizers: CalibrlNormalizers {
                    token_count: rows.iter().map(|&r| len(r) as f64).sum(),
                    seq_count: rows.len() as f64,
                },
                micro: pack(&rows, token_budget, len),
            }
        })
        .collect();

    StepPlan {
        no_grad,
        train,
        expert_slot,
    }
}

/// Greedy packing in order: start a new micro-batch when the next row would pass the budget.
fn pack(rows: &[RowRef], budget: usize, len: impl Fn(RowRef) -> usize) -> Vec<MicroBatch> {
    let mut out = vec![MicroBatch::default()];
    let mut used = 0;
    for &r in rows {
        let n = len(r);
        if used + n > budget && !out.last().unwrap().rows.is_empty() {
            out.push(MicroBatch::default());
            used = 0;
        }
        out.last_mut().unwrap().rows.push(r);
        used += n;
    }
    out
}
