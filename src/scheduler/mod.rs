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
mod partition;
mod selection;

#[allow(deprecated)]
pub use expert::collect_experts;
pub use expert::{expert_sums, scatter_expert_logprobs};
pub use selection::SplitMix64;

/// The global normalisers of one mini-batch (SPEC §4.5), the type `calibrl_loss` takes: the
/// plan fills them with the response tokens and the number of the rows that are trained.
pub use crate::desc::metrics::CalibrlNormalizers;

use crate::config::LossKind;
use crate::error::{CalibrlStatus, Error, Result};

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum SeqKind {
    Rollout = 0,
    Expert = 1,
}

/// One sequence in a micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqRef {
    pub kind: SeqKind,
    /// The prompt it belongs to.
    pub prompt: u32,
    /// Rollout index (global, `0..R`) or expert slot (`0..P*`).
    pub index: u32,
    /// Prompt + response tokens.
    pub tokens: u32,
    /// Response tokens.
    pub response_len: u32,
}

impl SeqRef {
    /// The sequence id (see the module docs): `index` for rollouts, `num_rollouts + index`
    /// for expert slots.
    pub fn id(&self, num_rollouts: usize) -> i64 {
        match self.kind {
            SeqKind::Rollout => self.index as i64,
            SeqKind::Expert => (num_rollouts + self.index as usize) as i64,
        }
    }
}

/// A micro-batch: the sequences one forward (and backward) call processes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MicroBatch {
    pub seqs: Vec<SeqRef>,
}

impl MicroBatch {
    pub fn tokens(&self) -> u64 {
        self.seqs.iter().map(|s| s.tokens as u64).sum()
    }
    pub fn response_tokens(&self) -> u64 {
        self.seqs.iter().map(|s| s.response_len as u64).sum()
    }
}

/// One pass over a set of sequences. Every rank runs the same number of micro-batches,
/// `microbatches` (collectives stay in step); `ranks[r]` holds rank `r`'s micro-batches that
/// have sequences, ordered by decreasing workload (so that the heavy ones of all ranks run at
/// the same time), and the rank runs the remaining ones of the count empty (zero-token steps).
/// Empty micro-batches are not stored, so a plan's memory follows its sequences, not
/// ranks × the busiest rank's count (docs/abi.md states the bound).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassPlan {
    pub ranks: Vec<Vec<MicroBatch>>,
    /// Micro-batches per rank (the same on every rank).
    pub microbatches: usize,
    /// Sequences longer than the pass's budget; each sits alone in a micro-batch.
    pub oversize: Vec<SeqRef>,
}

impl PassPlan {
    /// Micro-batches per rank (the same on every rank).
    pub fn microbatches_per_rank(&self) -> usize {
        self.microbatches
    }
    /// The sequences of micro-batch `mb` of rank `rank` (empty past the stored ones).
    /// Panics when `rank` or `mb` is out of range.
    pub fn microbatch(&self, rank: usize, mb: usize) -> &[SeqRef] {
        assert!(
            mb < self.microbatches,
            "micro-batch {mb} of {}",
            self.microbatches
        );
        self.ranks[rank].get(mb).map_or(&[], |m| &m.seqs)
    }
    /// Rank `rank`'s micro-batches, all `microbatches` of them (the empty ones included).
    pub fn rank_microbatches(&self, rank: usize) -> impl Iterator<Item = &[SeqRef]> {
        (0..self.microbatches).map(move |mb| self.microbatch(rank, mb))
    }
    /// Token load (prompt + response) of each rank.
    pub fn rank_tokens(&self) -> Vec<u64> {
        self.ranks
            .iter()
            .map(|r| r.iter().map(MicroBatch::tokens).sum())
            .collect()
    }
    pub fn seqs(&self) -> impl Iterator<Item = &SeqRef> {
        self.ranks.iter().flatten().flat_map(|mb| mb.seqs.iter())
    }
}

/// One mini-batch of the training pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Minibatch {
    /// Its prompts: `first_prompt .. first_prompt + num_prompts`.
    pub first_prompt: usize,
    pub num_prompts: usize,
    pub pass: PassPlan,
    pub normalizers: CalibrlNormalizers,
}

/// Which pass a query is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassKind {
    NoGrad,
    Train,
}

/// The schedule of one training step. Fields are public and read-only by convention: the plan
/// is a value computed once by [`plan`].
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub config: SchedulerConfig,
    /// Per prompt: the id of its first rollout (`[P+1]`, the last entry is `R`).
    pub rollout_offsets: Vec<usize>,
    /// Per prompt: its prompt length.
    pub prompt_lens: Vec<u32>,
    /// Per rollout: its response length.
    pub rollout_lens: Vec<u32>,
    /// Per rollout: its prompt.
    pub rollout_prompt: Vec<u32>,
    /// Per expert slot: its prompt.
    pub expert_prompts: Vec<u32>,
    /// Per expert slot: its response length.
    pub expert_lens: Vec<u32>,
    /// Per expert slot: start of its tokens in the packed expert tensor (`[P*+1]`).
    pub expert_offsets: Vec<i64>,
    /// Per rollout: its prompt's expert slot, or −1 (`expert_index` of the loss).
    pub gather: Vec<i64>,
    /// Prompts left out by dynamic sampling (all-equal rewards), increasing; their rollouts are
    /// in neither pass (the trainer may sample this many more prompts).
    pub dropped_prompts: Vec<u32>,
    pub nograd: PassPlan,
    pub minibatches: Vec<Minibatch>,
}

impl Plan {
    pub fn num_prompts(&self) -> usize {
        self.prompt_lens.len()
    }
    pub fn num_rollouts(&self) -> usize {
        self.rollout_lens.len()
    }
    pub fn num_expert_slots(&self) -> usize {
        self.expert_prompts.len()
    }
    /// Number of sequence ids (`R + P*`).
    pub fn num_seqs(&self) -> usize {
        self.num_rollouts() + self.num_expert_slots()
    }

    /// The sequence with the given id (see the module docs).
    pub fn seq(&self, id: i64) -> Option<SeqRef> {
        let r = self.num_rollouts();
        let id = usize::try_from(id).ok()?;
        if id < r {
            let prompt = self.rollout_prompt[id];
            let len = self.rollout_lens[id];
            Some(SeqRef {
                kind: SeqKind::Rollout,
                prompt,
                index: id as u32,
                tokens: self.prompt_lens[prompt as usize] + len,
                response_len: len,
            })
        } else if id < r + self.num_expert_slots() {
            let slot = id - r;
            let prompt = self.expert_prompts[slot];
            let len = self.expert_lens[slot];
            Some(SeqRef {
                kind: SeqKind::Expert,
                prompt,
                index: slot as u32,
                tokens: self.prompt_lens[prompt as usize] + len,
                response_len: len,
            })
        } else {
            None
        }
    }

    /// The oversize sequences of a pass (for `Train`, over all mini-batches in order).
    pub fn oversize(&self, pass: PassKind) -> Vec<SeqRef> {
        match pass {
            PassKind::NoGrad => self.nograd.oversize.clone(),
            PassKind::Train => self
                .minibatches
                .iter()
                .flat_map(|m| m.pass.oversize.iter().copied())
                .collect(),
        }
    }
}

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

/// Fails with `CALIBRL_STATUS_INVALID_ARGUMENT` naming `arg` when `value >= bound`.
pub(crate) fn check_index(arg: &str, value: usize, bound: usize) -> Result<()> {
    if value >= bound {
        return Err(Error::new(
            CalibrlStatus::InvalidArgument,
            format!("`{arg}`: {value} is out of range (must be < {bound})"),
        ));
    }
    Ok(())
}
