//! Turning the no-grad pass's output into the expert baseline the loss takes.
//!
//! Input layout ("packed no-grad output"): the response-token log-probs of every sequence of
//! the no-grad plan, concatenated without padding in plan order — rank by rank (or one rank
//! only), micro-batch by micro-batch, sequence by sequence, `response_len` values each.
//!
//! Outputs:
//! - the packed expert tensor `[T*]` with `expert_offsets [P*+1]` (the plan's), the layout
//!   `calibrl_loss` takes as `expert_logprobs` — token-aligned mode needs it, sequence mode
//!   sums it;
//! - the per-slot sums `E_g` `[P*]` (optionally divided by `n*_g`), for sequence-mode metrics
//!   and for trainers that only exchange `P*` numbers between ranks.
//!
//! With one rank's part as input, the slots held by other ranks are left 0: summing the outputs
//! of all ranks (an all-reduce) gives the full tensors, because every selected expert is in
//! exactly one rank's no-grad plan.

use super::{check_index, Plan, SeqKind};
use crate::error::{Error, Result};
use crate::ops::{on_device, Stream};
use crate::tensor::{common_device, Tensor};

/// For the given part of the no-grad output (`rank` `None` = all ranks in order): its length
/// and, per expert found in it, `(slot, start)` in that part.
fn expert_segments(plan: &Plan, rank: Option<usize>) -> Result<(usize, Vec<(usize, usize)>)> {
    let ranks = match rank {
        Some(r) => {
            check_index("rank", r, plan.nograd.ranks.len())?;
            r..r + 1
        }
        None => 0..plan.nograd.ranks.len(),
    };
    let mut at = 0usize;
    let mut found = Vec::new();
    for mb in plan.nograd.ranks[ranks].iter().flatten() {
        for s in &mb.seqs {
            if s.kind == SeqKind::Expert {
                found.push((s.index as usize, at));
            }
            at += s.response_len as usize;
        }
    }
    Ok((at, found))
}

/// The packed expert tensor `[T*]` from (part of) the packed no-grad output. Slots not in the
/// given part stay 0.
pub fn scatter_expert_logprobs(
    plan: &Plan,
    rank: Option<usize>,
    nograd_logprobs: &[f64],
) -> Result<Vec<f64>> {
    let (len, segments) = expert_segments(plan, rank)?;
    if nograd_logprobs.len() != len {
        return Err(Error::shape(
            "nograd_logprobs",
            format!(
                "has {} values, the no-grad plan's {} holds {len} response tokens",
                nograd_logprobs.len(),
                rank.map_or("all ranks".to_string(), |r| format!("rank {r}"))
            ),
        ));
    }
    let total = *plan.expert_offsets.last().unwrap_or(&0) as usize;
    let mut packed = crate::tensor::try_vec(total, 0.0, "expert_logprobs")?;
    for (slot, start) in segments {
        let (o0, o1) = (
            plan.expert_offsets[slot] as usize,
            plan.expert_offsets[slot + 1] as usize,
        );
        let src = &nograd_logprobs[start..start + (o1 - o0)];
        if let Some((j, &v)) = src.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::non_finite("nograd_logprobs", start + j, v));
        }
        packed[o0..o1].copy_from_slice(src);
    }
    Ok(packed)
}

/// `E_g` per expert slot (`[P*]`) from the packed expert tensor: `Σ_t ℓ*[g,t]`, or divided by
/// `n*_g` when `length_normalize`.
pub fn expert_sums(plan: &Plan, packed: &[f64], length_normalize: bool) -> Result<Vec<f64>> {
    let total = *plan.expert_offsets.last().unwrap_or(&0) as usize;
    if packed.len() != total {
        return Err(Error::shape(
            "expert_logprobs",
            format!(
                "has {} values, the plan's experts hold {total} tokens",
                packed.len()
            ),
        ));
    }
    Ok(plan
        .expert_offsets
        .windows(2)
        .map(|w| {
            let seg = &packed[w[0] as usize..w[1] as usize];
            let sum: f64 = seg.iter().sum();
            if length_normalize {
                sum / seg.len() as f64
            } else {
                sum
            }
        })
        .collect())
}

/// Tensor entry point (what `calibrl_plan_collect_experts` runs): validates, then dispatches on
/// the tensors' device. `nograd_logprobs` is 1-D float in the packed no-grad layout of `rank`
/// (`None` = all ranks); `expert_logprobs` (`[T*]`) and `expert_sums` (`[P*]`) are optional
/// 1-D float outputs, written only on success.
pub fn collect_experts(
    plan: &Plan,
    rank: Option<usize>,
    nograd_logprobs: &Tensor,
    expert_logprobs: Option<&Tensor>,
    expert_sums_out: Option<&Tensor>,
    length_normalize: bool,
    stream: Stream,
) -> Result<()> {
    let device = common_device(&[Some(nograd_logprobs), expert_logprobs, expert_sums_out])?;
    let (len, _) = expert_segments(plan, rank)?;
    nograd_logprobs.require_float()?;
    nograd_logprobs.require_shape(&[len])?;
    let total = *plan.expert_offsets.last().unwrap_or(&0) as usize;
    if let Some(t) = expert_logprobs {
        t.require_float()?;
        t.require_shape(&[total])?;
    }
    if let Some(t) = expert_sums_out {
        t.require_float()?;
        t.require_shape(&[plan.num_expert_slots()])?;
    }
    for out in [expert_logprobs, expert_sums_out].into_iter().flatten() {
        if out.numel() > 0 && out.overlaps(nograd_logprobs) {
            return Err(Error::invalid(out.name, "overlaps `nograd_logprobs`"));
        }
    }
    if let (Some(a), Some(b)) = (expert_logprobs, expert_sums_out) {
        if a.numel() > 0 && b.numel() > 0 && a.overlaps(b) {
            return Err(Error::invalid(b.name, "overlaps `expert_logprobs`"));
        }
    }
    on_device(
        device,
        || {
            let src = nograd_logprobs.read_f64()?;
            let packed = scatter_expert_logprobs(plan, rank, &src)?;
            let sums = expert_sums(plan, &packed, length_normalize)?;
            crate::tensor::write_all(&[(expert_logprobs, &packed), (expert_sums_out, &sums)])
        },
        |ordinal| {
            // Where each slot starts in this part of the no-grad output (−1: not in it).
            let (_, segments) = expert_segments(plan, rank)?;
            let mut source = vec![-1i64; plan.num_expert_slots()];
            for (slot, start) in segments {
                source[slot] = start as i64;
            }
            crate::cuda::expert::collect_experts(
                nograd_logprobs,
                &source,
                &plan.expert_offsets,
                expert_logprobs,
                expert_sums_out,
                length_normalize,
                ordinal,
                stream,
            )
        },
    )
}
