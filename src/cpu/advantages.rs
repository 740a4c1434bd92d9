//! The group advantages (SPEC §3) on host tensors: reads, computes with [`crate::rarity`] in
//! f64, writes.

use crate::config::Config;
use crate::desc::loss::Advantages;
use crate::error::Result;
use crate::tensor::write_all;

pub fn group_advantages(cfg: &Config, args: &Advantages) -> Result<()> {
    let correct = args.correct.as_ref().map(|t| t.read_bool()).transpose()?;
    let is_expert = args.is_expert.as_ref().map(|t| t.read_bool()).transpose()?;
    let out = crate::rarity::group_advantages(
        cfg,
        &args.rewards.read_f64()?,
        &args.group_ids.read_i64()?,
        args.num_groups,
        correct.as_deref(),
        is_expert.as_deref(),
    )?;
    write_all(&[
        (Some(&args.advantages), &out.advantages),
        (Some(&args.weights), &out.weights),
        (Some(&args.signs), &out.signs),
    ])
}
