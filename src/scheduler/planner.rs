//! Building the plan of one step (SPEC §7): checking the input, selecting experts, packing
//! and balancing the passes.

use super::input::{SchedulerConfig, StepInput, CALIBRL_MAX_RANK_PASSES};
use super::plan::{Minibatch, Plan, SeqKind, SeqRef};
use super::{partition, selection};
use crate::desc::metrics::CalibrlNormalizers;
use crate::error::{Error, Result};

/// Validated per-prompt facts the planner works from.
struct Checked {
    prompt_lens: Vec<u32>,
    rollout_offsets: Vec<usize>,
    rollout_lens: Vec<u32>,
    rollout_prompt: Vec<u32>,
}

fn check_input(input: &StepInput) -> Result<Checked> {
    if input.prompts.is_empty() {
        return Err(Error::invalid(
            "prompts",
            "is empty: a step needs at least one prompt",
        ));
    }
    if input.prompts.len() > u32::MAX as usize {
        return Err(Error::invalid("prompts", "more than 2^32 - 1 prompts"));
    }
    let mut rollout_offsets = Vec::with_capacity(input.prompts.len() + 1);
    let mut rollout_lens = Vec::new();
    let mut rollout_prompt = Vec::new();
    let mut prompt_lens = Vec::with_capacity(input.prompts.len());
    // Total tokens must fit in u64 so that every count below is exact.
    let mut total: u64 = 0;
    let overflow =
        |arg: String| Error::invalid(&arg, "the step's total token count overflows 64 bits");
    for (g, p) in input.prompts.iter().enumerate() {
        if p.rollout_lens.is_empty() {
            return Err(Error::invalid(
                &format!("prompts[{g}].rollout_lens"),
                "is empty: every prompt needs at least one rollout",
            ));
        }
        let seq_tokens = |len: u32, arg: &dyn Fn() -> String| -> Result<u64> {
            if len == 0 {
                return Err(Error::invalid(
                    &arg(),
                    "is 0: a response has at least one token",
                ));
            }
            p.prompt_len.checked_add(len).map(u64::from).ok_or_else(|| {
                Error::invalid(
                    &arg(),
                    format!(
                        "prompt_len {} + length {len} overflows 32 bits",
                        p.prompt_len
                    ),
                )
            })
        };
        rollout_offsets.push(rollout_lens.len());
        for (j, &len) in p.rollout_lens.iter().enumerate() {
            let t = seq_tokens(len, &|| format!("prompts[{g}].rollout_lens[{j}]"))?;
            total = total
                .checked_add(t)
                .ok_or_else(|| overflow(format!("prompts[{g}].rollout_lens[{j}]")))?;
            rollout_lens.push(len);
            rollout_prompt.push(g as u32);
        }
        if let Some(len) = p.expert_len {
            let t = seq_tokens(len, &|| format!("prompts[{g}].expert_len"))?;
            total = total
                .checked_add(t)
                .ok_or_else(|| overflow(format!("prompts[{g}].expert_len")))?;
        }
        if let Some(r) = &p.rewards {
            if r.len() != p.rollout_lens.len() {
                return Err(Error::shape(
                    &format!("prompts[{g}].rewards"),
                    format!(
                        "has {} rewards for {} rollouts",
                        r.len(),
                        p.rollout_lens.len()
                    ),
                ));
            }
            if let Some((j, &v)) = r.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::non_finite(&format!("prompts[{g}].rewards"), j, v));
            }
        }
        prompt_lens.push(p.prompt_len);
    }
    if rollout_lens.len() > (i64::MAX as usize) / 2 || rollout_lens.len() > u32::MAX as usize {
        return Err(Error::invalid("prompts", "more than 2^32 - 1 rollouts"));
    }
    rollout_offsets.push(rollout_lens.len());
    Ok(Checked {
        prompt_lens,
        rollout_offsets,
        rollout_lens,
        rollout_prompt,
    })
}

/// Builds the plan of one step. Deterministic: the same input and configuration (seed included)
/// give the same plan.
pub fn plan(input: &StepInput, config: &SchedulerConfig) -> Result<Plan> {
    config.validate()?;
    // One pass per mini-batch plus the no-grad pass, each with `dp_ranks` rank plans.
    let passes = input.prompts.len().div_ceil(config.minibatch_prompts) + 1;
    if passes.saturating_mul(config.dp_ranks) > CALIBRL_MAX_RANK_PASSES {
        return Err(Error::invalid(
            "config.dp_ranks",
            format!(
                "{} ranks x {passes} passes (mini-batches + the no-grad pass) exceeds the \
                 supported {CALIBRL_MAX_RANK_PASSES} rank plans; raise config.minibatch_prompts",
                config.dp_ranks
            ),
        ));
    }
    reserve_planning_memory(input, config, passes - 1)?;
    let c = check_input(input)?;
    let dropped = selection::dynamic_sampling(input, config)?;
    let selected = selection::select_experts(input, config, &dropped)?;

    let mut expert_prompts = Vec::new();
    let mut expert_lens = Vec::new();
    let mut expert_offsets = vec![0i64];
    let mut slot_of_prompt = vec![-1i64; input.prompts.len()];
    for (g, p) in input.prompts.iter().enumerate() {
        if let (true, Some(len)) = (selected[g], p.expert_len) {
            slot_of_prompt[g] = expert_prompts.len() as i64;
            expert_prompts.push(g as u32);
            expert_lens.push(len);
            expert_offsets.push(expert_offsets.last().copied().unwrap_or(0) + len as i64);
        }
    }
    let gather: Vec<i64> = c
        .rollout_prompt
        .iter()
        .map(|&g| slot_of_prompt[g as usize])
        .collect();

    let rollout = |i: usize| SeqRef {
        kind: SeqKind::Rollout,
        prompt: c.rollout_prompt[i],
        index: i as u32,
        tokens: c.prompt_lens[c.rollout_prompt[i] as usize] + c.rollout_lens[i],
        response_len: c.rollout_lens[i],
    };
    let expert = |s: usize| SeqRef {
        kind: SeqKind::Expert,
        prompt: expert_prompts[s],
        index: s as u32,
        tokens: c.prompt_lens[expert_prompts[s] as usize] + expert_lens[s],
        response_len: expert_lens[s],
    };

    let ranks = config.dp_ranks;
    let coef = config.quadratic_coef;
    // Rollouts of dropped groups are trained on nothing: no pass needs their log-probs.
    let kept = |i: &usize| !dropped[c.rollout_prompt[*i] as usize];
    let nograd_seqs: Vec<SeqRef> = (0..c.rollout_lens.len())
        .filter(kept)
        .map(rollout)
        .chain((0..expert_prompts.len()).map(expert))
        .collect();
    let nograd = partition::plan_pass(nograd_seqs, ranks, config.nograd_token_budget, coef, true);

    // Mini-batches: prompts in input order, `minibatch_prompts` at a time; planned in parallel
    // with each other (each one's ranks serially).
    let n_prompts = input.prompts.len();
    let firsts: Vec<usize> = (0..n_prompts).step_by(config.minibatch_prompts).collect();
    let minibatches = partition::par_map(&firsts, firsts.len() > 1, |&first| {
        let end = (first + config.minibatch_prompts).min(n_prompts);
        let mut seqs: Vec<SeqRef> = (c.rollout_offsets[first]..c.rollout_offsets[end])
            .filter(kept)
            .map(rollout)
            .collect();
        if config.trains_experts() {
            seqs.extend(
                (first..end)
                    .filter(|&g| slot_of_prompt[g] >= 0)
                    .map(|g| expert(slot_of_prompt[g] as usize)),
            );
        }
        let token_count = seqs.iter().map(|s| s.response_len as u64).sum::<u64>() as f64;
        // An empty rollout adds nothing and is not counted in N_seq (SPEC §4.5).
        let seq_count = seqs.iter().filter(|s| s.response_len > 0).count() as f64;
        // The training pass holds no untrained expert row (SPEC §7), so every row's counts
        // (SPEC §4.7) are the trained rows'.
        let normalizers = CalibrlNormalizers {
            token_count,
            seq_count,
            all_token_count: token_count,
            all_seq_count: seq_count,
        };
        Minibatch {
            first_prompt: first,
            num_prompts: end - first,
            pass: partition::plan_pass(seqs, ranks, config.train_token_budget, coef, false),
            normalizers,
        }
    });

    Ok(Plan {
        config: config.clone(),
        rollout_offsets: c.rollout_offsets,
        prompt_lens: c.prompt_lens,
        rollout_lens: c.rollout_lens,
        rollout_prompt: c.rollout_prompt,
        expert_prompts,
        expert_lens,
        expert_offsets,
        gather,
        dropped_prompts: (0..n_prompts as u32)
            .filter(|&g| dropped[g as usize])
            .collect(),
        nograd,
        minibatches,
    })
}

/// Working memory planning may need at its peak, per rank of each pass planned at once and per
/// sequence (measured: 0.78 GB for 2^20 ranks, 2^20 sequences and two passes; with margin).
const PLAN_BYTES_PER_RANK: usize = 512;
const PLAN_BYTES_PER_SEQ: usize = 512;

/// Asks, fallibly, for the memory planning will need at its peak before planning starts (the
/// planner's own containers grow infallibly): an input too large for the memory available is
/// an error naming `prompts`, not an abort. An estimate, so not a guarantee: the mini-batches
/// are planned on several threads at once, each holding every rank's items.
fn reserve_planning_memory(
    input: &StepInput,
    config: &SchedulerConfig,
    minibatches: usize,
) -> Result<()> {
    let seqs = input
        .prompts
        .iter()
        .map(|p| p.rollout_lens.len() + usize::from(p.expert_len.is_some()))
        .fold(0usize, usize::saturating_add);
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let at_once = minibatches.min(threads).max(1);
    let bytes = config
        .dp_ranks
        .saturating_mul(at_once)
        .saturating_mul(PLAN_BYTES_PER_RANK)
        .saturating_add(seqs.saturating_mul(PLAN_BYTES_PER_SEQ));
    let mut probe: Vec<u8> = Vec::new();
    probe.try_reserve_exact(bytes).map_err(|_| {
        Error::invalid(
            "prompts",
            format!(
                "out of memory: planning {seqs} sequences on {} ranks needs about {bytes} bytes \
                 of working memory, which could not be allocated",
                config.dp_ranks
            ),
        )
    })
}
