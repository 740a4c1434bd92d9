//! The scheduler configuration and building (and freeing) a plan from plain C arrays.

use super::types::*;
use crate::config::LossKind;
use crate::error::{CalibrlStatus, Error, Result};
use crate::ffi::{deref, guard};
use crate::scheduler::{self, ExpertSelection, PromptInput, SchedulerConfig, StepInput};

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
