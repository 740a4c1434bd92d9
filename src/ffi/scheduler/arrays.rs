//! Array queries of a plan (the convention of the module: `len` receives the count; NULL
//! outputs make a size query; a `cap` too small writes only `*len` and returns
//! `CALIBRL_STATUS_BUFFER_TOO_SMALL`).

use super::types::*;
use crate::error::{CalibrlStatus, Error, Result};
use crate::ffi::{deref, guard};
use crate::scheduler::{self, PassKind, Plan, SeqRef};

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
    Ok(pass.microbatch(rank, mb))
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
        let seqs = microbatch(&super::info::minibatch(p, minibatch)?.pass, rank, mb)?;
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
