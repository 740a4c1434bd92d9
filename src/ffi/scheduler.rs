//! Scheduler exports (SPEC §7): build a `calibrl_plan` from plain C arrays, then read every part
//! of it with query functions that fill caller-provided arrays.
//!
//! Array queries share one convention: `len` receives the element count; when the output
//! array(s) are NULL the call is a size query (status OK, only `*len` written); when `cap` is
//! smaller than the count nothing but `*len` is written and the status is
//! `CALIBRL_STATUS_BUFFER_TOO_SMALL`.
//!
//! Sequence ids: rollout `i` (numbered `0..R` in input order) is id `i`; expert slot `s`
//! (numbered `0..P*` over the prompts whose expert is selected, in prompt order) is id `R + s`.

use super::{deref, guard};
use crate::config::LossKind;
use crate::error::{CalibrlStatus, Error, Result};
use crate::ops::Stream;
use crate::scheduler::{
    self, CalibrlNormalizers, ExpertSelection, PassKind, Plan, PromptInput, SchedulerConfig,
    SeqRef, StepInput,
};
use crate::tensor::{DLTensor, Tensor};

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

/// Fills `*out` with the defaults: 1 rank, budgets of 16384 tokens, one mini-batch of up to
/// 2^32 - 1 prompts, CalibRL, all experts, seed 0, reward threshold 0.1, verl's workload model.
///
/// # Safety
/// `out` is a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn calibrl_scheduler_config_default(
    out: *mut CalibrlSchedulerConfig,
) -> CalibrlStatus {
    guard(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        *out = CalibrlSchedulerConfig {
            dp_ranks: 1,
            minibatch_prompts: u32::MAX,
            nograd_token_budget: 16384,
            train_token_budget: 16384,
            loss_kind: CALIBRL_LOSS_CALIBRL,
            expert_selection: CALIBRL_SELECT_ALL,
            seed: 0,
            fraction: 1.0,
            pass_rate_low: 0.0,
            pass_rate_high: 1.0,
            reward_threshold: 0.1,
            quadratic_coef: scheduler::CALIBRL_DEFAULT_QUADRATIC_COEF,
            dynamic_sampling: 0,
        };
        Ok(())
    })
}

fn convert_config(c: &CalibrlSchedulerConfig) -> Result<SchedulerConfig> {
    let loss_kind = match c.loss_kind {
        CALIBRL_LOSS_CALIBRL => LossKind::Calibrl,
        CALIBRL_LOSS_GRPO => LossKind::Grpo,
        CALIBRL_LOSS_LUFFY => LossKind::Luffy,
        CALIBRL_LOSS_RLPLUS => LossKind::Rlplus,
        other => {
            return Err(Error::invalid(
                "config.loss_kind",
                format!("unknown value {other} (expected CALIBRL_LOSS_*: 0..=3)"),
            ))
        }
    };
    let expert_selection = match c.expert_selection {
        CALIBRL_SELECT_ALL => ExpertSelection::All,
        CALIBRL_SELECT_RANDOM_FRACTION => ExpertSelection::RandomFraction {
            fraction: c.fraction,
            seed: c.seed,
        },
        CALIBRL_SELECT_PASS_RATE => ExpertSelection::PassRate {
            low: c.pass_rate_low,
            high: c.pass_rate_high,
            threshold: c.reward_threshold,
        },
        other => {
            return Err(Error::invalid(
                "config.expert_selection",
                format!("unknown value {other} (expected CALIBRL_SELECT_*: 0..=2)"),
            ))
        }
    };
    Ok(SchedulerConfig {
        dp_ranks: c.dp_ranks as usize,
        nograd_token_budget: c.nograd_token_budget,
        train_token_budget: c.train_token_budget,
        minibatch_prompts: c.minibatch_prompts as usize,
        expert_selection,
        loss_kind,
        quadratic_coef: c.quadratic_coef,
        dynamic_sampling: c.dynamic_sampling != 0,
    })
}

/// Borrows `n` elements at `ptr` (NULL allowed when `n == 0`).
unsafe fn slice<'a, T>(ptr: *const T, n: usize, name: &str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Error::null(name));
    }
    Ok(std::slice::from_raw_parts(ptr, n))
}

/// Builds the step input, checking what the C layout adds (counts, -1 sentinels) and naming the
/// C arguments in errors.
fn convert_input(
    prompts: &[CalibrlPromptDesc],
    rollout_lens: &[u32],
    rewards: Option<&[f64]>,
) -> Result<StepInput> {
    let mut at = 0usize;
    let mut out = Vec::with_capacity(prompts.len());
    for (g, p) in prompts.iter().enumerate() {
        if p.num_rollouts == 0 {
            return Err(Error::invalid(
                &format!("prompts[{g}].num_rollouts"),
                "is 0: every prompt needs at least one rollout",
            ));
        }
        let end = at + p.num_rollouts as usize;
        if end > rollout_lens.len() {
            return Err(Error::shape(
                "n_rollouts",
                format!(
                    "is {}, but prompts[0..={g}].num_rollouts already sum to {end}",
                    rollout_lens.len()
                ),
            ));
        }
        for (k, &len) in rollout_lens.iter().enumerate().take(end).skip(at) {
            if len == 0 {
                return Err(Error::invalid(
                    &format!("rollout_lens[{k}]"),
                    "is 0: a response has at least one token",
                ));
            }
            if p.prompt_len.checked_add(len).is_none() {
                return Err(Error::invalid(
                    &format!("rollout_lens[{k}]"),
                    format!(
                        "prompts[{g}].prompt_len {} + {len} overflows 32 bits",
                        p.prompt_len
                    ),
                ));
            }
        }
        let expert_len = match p.expert_len {
            -1 => None,
            len if (1..=u32::MAX as i64).contains(&len) => Some(len as u32),
            len => {
                return Err(Error::invalid(
                    &format!("prompts[{g}].expert_len"),
                    format!("{len} is neither -1 (no expert) nor in 1..=2^32-1"),
                ))
            }
        };
        out.push(PromptInput {
            prompt_len: p.prompt_len,
            rollout_lens: rollout_lens[at..end].to_vec(),
            expert_len,
            rewards: rewards.map(|r| r[at..end].to_vec()),
        });
        at = end;
    }
    if at != rollout_lens.len() {
        return Err(Error::shape(
            "n_rollouts",
            format!(
                "is {}, but prompts[*].num_rollouts sum to {at}",
                rollout_lens.len()
            ),
        ));
    }
    Ok(StepInput { prompts: out })
}

/// Plans one training step (SPEC §7). `prompts` holds `n_prompts` descriptors;
/// `rollout_lens` holds the `n_rollouts` rollout response lengths, prompt by prompt (so
/// `n_rollouts` = Σ `num_rollouts`); `rewards` (`[n_rollouts]`, same order) may be NULL unless
/// the selection is `CALIBRL_SELECT_PASS_RATE`. On success `*out` owns a new plan; free it with
/// `calibrl_plan_free`. The plan is deterministic for a given input and configuration.
///
/// # Safety
/// `config` and `out` are valid pointers; the arrays are NULL or valid for their counts.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_new(
    config: *const CalibrlSchedulerConfig,
    prompts: *const CalibrlPromptDesc,
    n_prompts: usize,
    rollout_lens: *const u32,
    n_rollouts: usize,
    rewards: *const f64,
    out: *mut *mut CalibrlPlan,
) -> CalibrlStatus {
    guard(|| {
        let config = convert_config(deref(config, "config")?)?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let prompts = slice(prompts, n_prompts, "prompts")?;
        let rollout_lens = slice(rollout_lens, n_rollouts, "rollout_lens")?;
        let rewards = if rewards.is_null() {
            None
        } else {
            Some(slice(rewards, n_rollouts, "rewards")?)
        };
        let input = convert_input(prompts, rollout_lens, rewards)?;
        let plan = scheduler::plan(&input, &config)?;
        *out = Box::into_raw(Box::new(CalibrlPlan { inner: plan }));
        Ok(())
    })
}

/// Releases a plan (NULL is a no-op).
///
/// # Safety
/// `plan` is NULL or a handle from `calibrl_plan_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_free(plan: *mut CalibrlPlan) {
    if !plan.is_null() {
        let _ = std::panic::catch_unwind(|| drop(Box::from_raw(plan)));
    }
}

/// Writes the plan's counts into `*out`.
///
/// # Safety
/// `plan` is a valid handle; `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_summary(
    plan: *const CalibrlPlan,
    out: *mut CalibrlPlanInfo,
) -> CalibrlStatus {
    guard(|| {
        let p = &deref(plan, "plan")?.inner;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        *out = CalibrlPlanInfo {
            num_prompts: p.num_prompts() as u64,
            num_rollouts: p.num_rollouts() as u64,
            num_expert_slots: p.num_expert_slots() as u64,
            expert_tokens: *p.expert_offsets.last().unwrap_or(&0) as u64,
            dp_ranks: p.config.dp_ranks as u64,
            nograd_microbatches: p.nograd.microbatches_per_rank() as u64,
            num_minibatches: p.minibatches.len() as u64,
            nograd_oversize: p.nograd.oversize.len() as u64,
            train_oversize: p.oversize(PassKind::Train).len() as u64,
            dropped_prompts: p.dropped_prompts.len() as u64,
        };
        Ok(())
    })
}

fn minibatch(p: &Plan, index: usize) -> Result<&scheduler::Minibatch> {
    scheduler::check_index("minibatch", index, p.minibatches.len())?;
    Ok(&p.minibatches[index])
}

/// Writes mini-batch `minibatch`'s prompt range, micro-batch count per rank and normalisers.
///
/// # Safety
/// `plan` is a valid handle; `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_minibatch(
    plan: *const CalibrlPlan,
    minibatch: usize,
    out: *mut CalibrlMinibatchInfo,
) -> CalibrlStatus {
    guard(|| {
        let mb = self::minibatch(&deref(plan, "plan")?.inner, minibatch)?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        *out = CalibrlMinibatchInfo {
            first_prompt: mb.first_prompt as u64,
            num_prompts: mb.num_prompts as u64,
            microbatches: mb.pass.microbatches_per_rank() as u64,
            normalizers: mb.normalizers,
        };
        Ok(())
    })
}

/// Writes the global normalisers of mini-batch `minibatch` (response tokens and rows that are
/// trained, over all ranks and micro-batches): pass them to every `calibrl_loss` call of that
/// mini-batch so the slices' losses and gradients add up to the whole batch's.
///
/// # Safety
/// `plan` is a valid handle; `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_normalizers(
    plan: *const CalibrlPlan,
    minibatch: usize,
    out: *mut CalibrlNormalizers,
) -> CalibrlStatus {
    guard(|| {
        let mb = self::minibatch(&deref(plan, "plan")?.inner, minibatch)?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        *out = mb.normalizers;
        Ok(())
    })
}

/// Copies `values` into `out[..cap]` following the module's array convention.
unsafe fn write_array<T: Copy>(
    values: &[T],
    out: *mut T,
    cap: usize,
    len: *mut usize,
    name: &str,
) -> Result<()> {
    if len.is_null() {
        return Err(Error::null("len"));
    }
    if out.is_null() {
        *len = values.len();
        return Ok(());
    }
    if cap < values.len() {
        *len = values.len();
        return Err(too_small(name, values.len(), cap));
    }
    std::ptr::copy_nonoverlapping(values.as_ptr(), out, values.len());
    *len = values.len();
    Ok(())
}

fn too_small(name: &str, needed: usize, cap: usize) -> Error {
    Error::new(
        CalibrlStatus::BufferTooSmall,
        format!("`{name}`: needs {needed} elements, cap is {cap}"),
    )
}

/// Writes a micro-batch's sequence ids and kinds (either array may be NULL).
unsafe fn write_microbatch(
    p: &Plan,
    seqs: &[SeqRef],
    seq_ids: *mut i64,
    kinds: *mut u8,
    cap: usize,
    len: *mut usize,
) -> Result<()> {
    if len.is_null() {
        return Err(Error::null("len"));
    }
    if !(seq_ids.is_null() && kinds.is_null()) && cap < seqs.len() {
        *len = seqs.len();
        let name = if seq_ids.is_null() {
            "kinds"
        } else {
            "seq_ids"
        };
        return Err(too_small(name, seqs.len(), cap));
    }
    for (j, s) in seqs.iter().enumerate() {
        if !seq_ids.is_null() {
            *seq_ids.add(j) = s.id(p.num_rollouts());
        }
        if !kinds.is_null() {
            *kinds.add(j) = s.kind as u8;
        }
    }
    *len = seqs.len();
    Ok(())
}

fn microbatch(pass: &scheduler::PassPlan, rank: usize, mb: usize) -> Result<&[SeqRef]> {
    scheduler::check_index("rank", rank, pass.ranks.len())?;
    scheduler::check_index("mb", mb, pass.microbatches_per_rank())?;
    Ok(&pass.ranks[rank][mb].seqs)
}

/// Micro-batch `mb` of rank `rank` in the no-grad pass: its sequence ids into `seq_ids` and
/// their kinds (`CALIBRL_SEQ_*`) into `kinds` (either may be NULL; both NULL = size query), the
/// count into `*len`. Every rank has `calibrl_plan_summary().nograd_microbatches`
/// micro-batches; some may be empty (`*len` = 0) when a rank holds few sequences.
///
/// # Safety
/// `plan` is a valid handle; `seq_ids`/`kinds` are NULL or valid for `cap` elements; `len` is
/// valid.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_nograd_microbatch(
    plan: *const CalibrlPlan,
    rank: usize,
    mb: usize,
    seq_ids: *mut i64,
    kinds: *mut u8,
    cap: usize,
    len: *mut usize,
) -> CalibrlStatus {
    guard(|| {
        let p = &deref(plan, "plan")?.inner;
        let seqs = microbatch(&p.nograd, rank, mb)?;
        write_microbatch(p, seqs, seq_ids, kinds, cap, len)
    })
}

/// Micro-batch `mb` of rank `rank` in mini-batch `minibatch` of the training pass; same
/// outputs as `calibrl_plan_nograd_microbatch`. Expert rows appear only for LUFFY / RL-PLUS.
///
/// # Safety
/// As `calibrl_plan_nograd_microbatch`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_train_microbatch(
    plan: *const CalibrlPlan,
    minibatch: usize,
    rank: usize,
    mb: usize,
    seq_ids: *mut i64,
    kinds: *mut u8,
    cap: usize,
    len: *mut usize,
) -> CalibrlStatus {
    guard(|| {
        let p = &deref(plan, "plan")?.inner;
        let seqs = microbatch(&self::minibatch(p, minibatch)?.pass, rank, mb)?;
        write_microbatch(p, seqs, seq_ids, kinds, cap, len)
    })
}

/// The gather map `[R]`: for each rollout, its prompt's expert slot, or -1 when the prompt's
/// expert is not selected (or it has none). It is `expert_index` of `calibrl_loss`.
///
/// # Safety
/// `plan` is a valid handle; `expert_index` is NULL or valid for `cap` elements; `len` valid.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_gather_map(
    plan: *const CalibrlPlan,
    expert_index: *mut i64,
    cap: usize,
    len: *mut usize,
) -> CalibrlStatus {
    guard(|| {
        let p = &deref(plan, "plan")?.inner;
        write_array(&p.gather, expert_index, cap, len, "expert_index")
    })
}

/// The prompt of each expert slot `[P*]`.
///
/// # Safety
/// As `calibrl_plan_gather_map`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_expert_prompts(
    plan: *const CalibrlPlan,
    prompts: *mut i64,
    cap: usize,
    len: *mut usize,
) -> CalibrlStatus {
    guard(|| {
        let p = &deref(plan, "plan")?.inner;
        let v: Vec<i64> = p.expert_prompts.iter().map(|&g| g as i64).collect();
        write_array(&v, prompts, cap, len, "prompts")
    })
}

/// The prompts left out by dynamic sampling, increasing (`[dropped_prompts]` of the summary):
/// their rewards were all equal, so they would train nothing; sample as many more.
///
/// # Safety
/// As `calibrl_plan_gather_map`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_dropped_prompts(
    plan: *const CalibrlPlan,
    prompts: *mut i64,
    cap: usize,
    len: *mut usize,
) -> CalibrlStatus {
    guard(|| {
        let p = &deref(plan, "plan")?.inner;
        let v: Vec<i64> = p.dropped_prompts.iter().map(|&g| g as i64).collect();
        write_array(&v, prompts, cap, len, "prompts")
    })
}

/// The offsets `[P*+1]` of the packed expert tensor (`expert_offsets` of `calibrl_loss`): slot
/// `s` holds its response tokens at `offsets[s]..offsets[s+1]`.
///
/// # Safety
/// As `calibrl_plan_gather_map`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_expert_offsets(
    plan: *const CalibrlPlan,
    offsets: *mut i64,
    cap: usize,
    len: *mut usize,
) -> CalibrlStatus {
    guard(|| {
        let p = &deref(plan, "plan")?.inner;
        write_array(&p.expert_offsets, offsets, cap, len, "offsets")
    })
}

/// The ids of the sequences longer than a pass's token budget (`CALIBRL_PASS_NOGRAD` or
/// `CALIBRL_PASS_TRAIN`); each sits alone in a micro-batch, none is dropped.
///
/// # Safety
/// As `calibrl_plan_gather_map`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_oversize(
    plan: *const CalibrlPlan,
    pass: u32,
    seq_ids: *mut i64,
    cap: usize,
    len: *mut usize,
) -> CalibrlStatus {
    guard(|| {
        let p = &deref(plan, "plan")?.inner;
        let which = match pass {
            CALIBRL_PASS_NOGRAD => PassKind::NoGrad,
            CALIBRL_PASS_TRAIN => PassKind::Train,
            other => {
                return Err(Error::invalid(
                    "pass",
                    format!(
                    "unknown value {other} (expected CALIBRL_PASS_NOGRAD or CALIBRL_PASS_TRAIN)"
                ),
                ))
            }
        };
        let ids: Vec<i64> = p
            .oversize(which)
            .iter()
            .map(|s| s.id(p.num_rollouts()))
            .collect();
        write_array(&ids, seq_ids, cap, len, "seq_ids")
    })
}

/// Describes sequence `seq_id` (kind, prompt, rollout index or slot, token counts).
///
/// # Safety
/// `plan` is a valid handle; `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_seq(
    plan: *const CalibrlPlan,
    seq_id: i64,
    out: *mut CalibrlSeqInfo,
) -> CalibrlStatus {
    guard(|| {
        let p = &deref(plan, "plan")?.inner;
        let s = p.seq(seq_id).ok_or_else(|| {
            Error::invalid(
                "seq_id",
                format!("{seq_id} is out of range (must be in 0..{})", p.num_seqs()),
            )
        })?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        *out = CalibrlSeqInfo {
            kind: s.kind as u32,
            prompt: s.prompt,
            index: s.index,
            tokens: s.tokens,
            response_len: s.response_len,
        };
        Ok(())
    })
}

/// Turns the no-grad pass's output into the expert baseline `calibrl_loss` takes.
/// `nograd_logprobs`: 1-D float, the response-token log-probs of the no-grad plan's sequences
/// packed without padding in plan order (micro-batch by micro-batch, sequence by sequence,
/// `response_len` values each) — of rank `rank` only, or of all ranks in rank order when `rank`
/// is -1. Outputs (each optional, NULL = not wanted, written only on success):
/// `expert_logprobs` `[T*]` float, the packed expert tensor (offsets from
/// `calibrl_plan_expert_offsets`); `expert_sums` `[P*]` float, `E_g` per slot (divided by the
/// expert's length when `length_normalize`). With one rank's part, slots held by other ranks
/// are 0: sum the outputs over ranks (all-reduce) to get the full tensors. Host or CUDA
/// tensors (on CUDA the plan's offsets are copied to the device first, so do not capture this
/// call in a CUDA graph; values are not checked there).
///
/// # Safety
/// `plan` is a valid handle; the tensors are NULL or valid DLPack descriptors.
#[no_mangle]
pub unsafe extern "C" fn calibrl_plan_collect_experts(
    plan: *const CalibrlPlan,
    rank: i64,
    nograd_logprobs: *const DLTensor,
    expert_logprobs: *const DLTensor,
    expert_sums: *const DLTensor,
    length_normalize: bool,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let p = &deref(plan, "plan")?.inner;
        let rank = match rank {
            -1 => None,
            r if r >= 0 => Some(r as usize),
            r => {
                return Err(Error::invalid(
                    "rank",
                    format!("{r} is neither -1 (all ranks) nor a rank index"),
                ))
            }
        };
        let src = Tensor::from_raw(nograd_logprobs, "nograd_logprobs")?;
        let opt = |t: *const DLTensor, name: &'static str| -> Result<Option<Tensor>> {
            if t.is_null() {
                Ok(None)
            } else {
                Tensor::from_raw(t, name).map(Some)
            }
        };
        let packed = opt(expert_logprobs, "expert_logprobs")?;
        let sums = opt(expert_sums, "expert_sums")?;
        scheduler::collect_experts(
            p,
            rank,
            &src,
            packed.as_ref(),
            sums.as_ref(),
            length_normalize,
            stream,
        )
    })
}
