//! Fixed-size queries of a plan: its counts, a mini-batch, its normalisers, one sequence.

use super::types::*;
use crate::desc::metrics::CalibrlNormalizers;
use crate::error::{CalibrlStatus, Error, Result};
use crate::ffi::{deref, guard};
use crate::scheduler::{self, PassKind, Plan};

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

pub(super) fn minibatch(p: &Plan, index: usize) -> Result<&scheduler::Minibatch> {
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
