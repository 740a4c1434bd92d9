//! The expert collection (see [`crate::desc::expert`]) on host tensors.

use crate::desc::expert::{gather_slots, slot_sums, slot_sums_from_source, CollectExperts};
use crate::error::Result;
use crate::tensor::write_all;

pub fn collect_experts(args: &CollectExperts) -> Result<()> {
    let nograd = args.nograd_logprobs.read_f64()?;
    if args.expert_logprobs.is_none() {
        // Only the sums: no buffer of the expert tokens' size (see slot_sums_from_source).
        let sums =
            slot_sums_from_source(&args.source, &args.offsets, &nograd, args.length_normalize)?;
        return write_all(&[(args.expert_sums.as_ref(), &sums)]);
    }
    let packed = gather_slots(&args.source, &args.offsets, &nograd)?;
    let sums = slot_sums(&args.offsets, &packed, args.length_normalize);
    write_all(&[
        (args.expert_logprobs.as_ref(), &packed),
        (args.expert_sums.as_ref(), &sums),
    ])
}
