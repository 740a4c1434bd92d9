//! The group advantages (SPEC §3): per-group statistics, then each row's advantage, rarity
//! weight and sign.

use super::args::{launch, opt, req, THREADS};
use crate::config::Config;
use crate::cuda::device::device;
use crate::cuda::workspace::workspace;
use crate::desc::loss::Advantages;
use crate::desc::Stream;
use crate::error::Result;
use cudarc::driver::sys;
use std::ffi::c_void;

/// Mirrors `AdvParams` in cuda/loss.cu (every field 8 bytes wide, so the layouts agree).
#[repr(C)]
struct AdvParams {
    rewards: *const c_void,
    rewards_dt: i64,
    group_ids: *const c_void,
    group_ids_dt: i64,
    correct: *const c_void,
    correct_dt: i64,
    is_expert: *const c_void,
    is_expert_dt: i64,
    advantages: *const c_void,
    advantages_dt: i64,
    weights: *const c_void,
    weights_dt: i64,
    signs: *const c_void,
    signs_dt: i64,
    stats: sys::CUdeviceptr,
    rows: i64,
    num_groups: i64,
    adv_eps: f64,
    correct_threshold: f64,
    norm_by_std: i64,
    rarity_weighting: i64,
}

pub fn group_advantages(
    cfg: &Config,
    args: &Advantages,
    ordinal: i32,
    stream: Stream,
) -> Result<()> {
    let rows = args.rewards.shape[0];
    let (rewards, rewards_dt) = req(&args.rewards)?;
    let (group_ids, group_ids_dt) = req(&args.group_ids)?;
    let (correct, correct_dt) = opt(args.correct.as_ref())?;
    let (is_expert, is_expert_dt) = opt(args.is_expert.as_ref())?;
    let (advantages, advantages_dt) = req(&args.advantages)?;
    let (weights, weights_dt) = req(&args.weights)?;
    let (signs, signs_dt) = req(&args.signs)?;
    if rows == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let stats = workspace(dev, ordinal, stream, args.num_groups.max(1) * 3 * 8)?;
    let mut p = AdvParams {
        rewards,
        rewards_dt,
        group_ids,
        group_ids_dt,
        correct,
        correct_dt,
        is_expert,
        is_expert_dt,
        advantages,
        advantages_dt,
        weights,
        weights_dt,
        signs,
        signs_dt,
        stats,
        rows: rows as i64,
        num_groups: args.num_groups as i64,
        adv_eps: cfg.adv_eps,
        correct_threshold: cfg.correct_threshold,
        norm_by_std: cfg.norm_by_std as i64,
        rarity_weighting: cfg.rarity_weighting as i64,
    };
    if args.num_groups > 0 {
        launch(
            dev,
            "calibrl_group_stats",
            args.num_groups,
            THREADS,
            stream,
            &mut p,
        )?;
    }
    launch(
        dev,
        "calibrl_group_advantages",
        rows.div_ceil(THREADS as usize),
        THREADS,
        stream,
        &mut p,
    )
}
