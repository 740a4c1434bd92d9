//! Dispatch of the scheduler's expert helper (what `calibrl_plan_collect_experts` runs): the
//! plan says where each expert slot sits in the no-grad output; the backend of the tensors'
//! device gathers and sums.

use super::on_device;
use crate::desc::expert::CollectExperts;
use crate::desc::Stream;
use crate::error::Result;
use crate::scheduler::Plan;
use crate::tensor::Tensor;

/// `nograd_logprobs` is 1-D float in the packed no-grad layout of `rank` (`None` = all ranks);
/// `expert_logprobs` (`[T*]`) and `expert_sums` (`[P*]`) are optional 1-D float outputs,
/// written only on success.
pub fn collect_experts(
    plan: &Plan,
    rank: Option<usize>,
    nograd_logprobs: &Tensor,
    expert_logprobs: Option<&Tensor>,
    expert_sums: Option<&Tensor>,
    length_normalize: bool,
    stream: Stream,
) -> Result<()> {
    let (nograd_len, source) = plan.expert_sources(rank)?;
    let args = CollectExperts {
        nograd_logprobs: nograd_logprobs.clone(),
        nograd_len,
        source,
        offsets: plan.expert_offsets.clone(),
        expert_logprobs: expert_logprobs.cloned(),
        expert_sums: expert_sums.cloned(),
        length_normalize,
    };
    let device = args.validate()?;
    on_device(
        device,
        || crate::cpu::expert::collect_experts(&args),
        |ordinal| crate::cuda::expert::collect_experts(&args, ordinal, stream),
    )
}
