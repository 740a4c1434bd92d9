//! The expert collection on tensors: the no-grad pass's output → the expert baseline.

use super::types::*;
use crate::desc::Stream;
use crate::error::{CalibrlStatus, Error, Result};
use crate::ffi::{deref, guard};
use crate::tensor::{DLTensor, Tensor};

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
        crate::ops::expert::collect_experts(
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
