//! The expert collection (see [`crate::desc::expert`]) on host tensors.

use crate::desc::expert::{gather_slots, slot_sums, CollectExperts};
use crate::error::Result;
use crate::tensor::write_all;

pub fn collect_experts(args: &CollectExperts) -> Result<()> {
    let nograd = args.nograd_logprobs.read_f64()?;
    let packed = gather_slots(&args.source, &args.offsets, &nograd)?;
    let sums = slot_sums(&args.offsets, &packed, args.length_normalize);
    write_all(&[
        (args.expert_logprobs.as_ref(), &packed),
        (args.expert_sums.as_ref(), &sums),
    ])
}
