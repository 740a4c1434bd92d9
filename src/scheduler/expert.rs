//! Turning the no-grad pass's output into the expert baseline the loss takes (host values;
//! the tensor form is the operation `ops::expert::collect_experts`).
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

use super::plan::{check_index, Plan, SeqKind};
use crate::desc::expert::{gather_slots, slot_sums};
use crate::error::{Error, Result};

impl Plan {
    /// For the given part of the no-grad output (`rank` `None` = all ranks in order): the
    /// response tokens it holds and, per expert slot, where the slot starts in it (−1 when
    /// that part does not hold it).
    pub fn expert_sources(&self, rank: Option<usize>) -> Result<(usize, Vec<i64>)> {
        let ranks = match rank {
            Some(r) => {
                check_index("rank", r, self.nograd.ranks.len())?;
                r..r + 1
            }
            None => 0..self.nograd.ranks.len(),
        };
        let mut at = 0usize;
        let mut source = vec![-1i64; self.num_expert_slots()];
        for mb in self.nograd.ranks[ranks].iter().flatten() {
            for s in &mb.seqs {
                if s.kind == SeqKind::Expert {
                    source[s.index as usize] = at as i64;
                }
                at += s.response_len as usize;
            }
        }
        Ok((at, source))
    }
}

/// The packed expert tensor `[T*]` from (part of) the packed no-grad output. Slots not in the
/// given part stay 0.
pub fn scatter_expert_logprobs(
    plan: &Plan,
    rank: Option<usize>,
    nograd_logprobs: &[f64],
) -> Result<Vec<f64>> {
    let (len, source) = plan.expert_sources(rank)?;
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
    gather_slots(&source, &plan.expert_offsets, nograd_logprobs)
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
    Ok(slot_sums(&plan.expert_offsets, packed, length_normalize))
}
