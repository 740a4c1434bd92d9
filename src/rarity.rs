//! Rarity weighting (SPEC §3): group-normalised advantages, their magnitudes |A| as rarity
//! weights, and correctness signs. Group statistics use rollout rows only, never expert rows.

use crate::config::Config;
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct GroupAdvantages {
    pub advantages: Vec<f64>,
    /// w_i = |A_i|, or 1 when rarity weighting is off.
    pub weights: Vec<f64>,
    /// c_i = +1 for a correct row, −1 for a wrong one.
    pub signs: Vec<f64>,
}

/// Per-row inputs: `rewards[i]`, `group_ids[i] ∈ [0, num_groups)`, optional explicit
/// correctness and expert flags.
pub fn group_advantages(
    cfg: &Config,
    rewards: &[f64],
    group_ids: &[i64],
    num_groups: usize,
    correct: Option<&[bool]>,
    is_expert: Option<&[bool]>,
) -> Result<GroupAdvantages> {
    let b = rewards.len();
    if group_ids.len() != b {
        return Err(Error::shape(
            "group_ids",
            format!("has {} rows, `rewards` has {b}", group_ids.len()),
        ));
    }
    for (name, v) in [("correct", correct), ("is_expert", is_expert)] {
        if let Some(v) = v {
            if v.len() != b {
                return Err(Error::shape(
                    name,
                    format!("has {} rows, `rewards` has {b}", v.len()),
                ));
            }
        }
    }
    if let Some((i, r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(Error::non_finite("rewards", i, *r));
    }
    if let Some((i, g)) = group_ids
        .iter()
        .enumerate()
        .find(|(_, &g)| g < 0 || g as usize >= num_groups)
    {
        return Err(Error::invalid(
            "group_ids",
            format!("row {i}: group id {g} is outside [0, num_groups = {num_groups})"),
        ));
    }
    let expert = |i: usize| is_expert.is_some_and(|e| e[i]);

    // Statistics only for the groups present (`num_groups` is just the ids' bound, and may be
    // far larger than the batch): slot j of the sorted distinct ids.
    let mut present = group_ids.to_vec();
    present.sort_unstable();
    present.dedup();
    let slot: Vec<usize> = group_ids
        .iter()
        .map(|g| present.binary_search(g).expect("every id is present"))
        .collect();
    let slots = present.len();

    // Two-pass mean and unbiased variance per group, in f64, over rollout rows only.
    let mut count = vec![0usize; slots];
    let mut sum = vec![0f64; slots];
    let mut lo = vec![f64::INFINITY; slots];
    let mut hi = vec![f64::NEG_INFINITY; slots];
    for i in (0..b).filter(|&i| !expert(i)) {
        let g = slot[i];
        count[g] += 1;
        sum[g] += rewards[i];
        lo[g] = lo[g].min(rewards[i]);
        hi[g] = hi[g].max(rewards[i]);
    }
    // A group whose rewards are all equal takes that reward as its mean, so A = 0 exactly
    // (Σr/G may round away from r, leaving a residue that §7 could not recognise as empty).
    let mean: Vec<f64> = (0..slots)
        .map(|g| {
            if count[g] <= 1 {
                0.0
            } else if lo[g] == hi[g] {
                lo[g]
            } else {
                sum[g] / count[g] as f64
            }
        })
        .collect();
    let mut sq = vec![0f64; slots];
    for i in (0..b).filter(|&i| !expert(i)) {
        sq[slot[i]] += (rewards[i] - mean[slot[i]]).powi(2);
    }
    // A group of one rollout: μ = 0, σ = 1 (the authors' code).
    let std: Vec<f64> = (0..slots)
        .map(|g| {
            if count[g] > 1 {
                (sq[g] / (count[g] - 1) as f64).sqrt()
            } else {
                1.0
            }
        })
        .collect();

    let mut out = GroupAdvantages {
        advantages: Vec::with_capacity(b),
        weights: Vec::with_capacity(b),
        signs: Vec::with_capacity(b),
    };
    for i in 0..b {
        let (g, j) = (group_ids[i], slot[i]);
        if expert(i) && count[j] == 0 {
            return Err(Error::invalid(
                "is_expert",
                format!("row {i} is an expert row of group {g}, which has no rollouts to compare it with"),
            ));
        }
        let centered = rewards[i] - mean[j];
        let a = if cfg.norm_by_std {
            centered / (std[j] + cfg.adv_eps)
        } else {
            centered
        };
        let is_correct = match correct {
            Some(c) => c[i],
            None => rewards[i] > cfg.correct_threshold,
        };
        out.advantages.push(a);
        out.weights
            .push(if cfg.rarity_weighting { a.abs() } else { 1.0 });
        out.signs.push(if is_correct { 1.0 } else { -1.0 });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_worked_example() {
        let cfg = Config::default();
        for rewards in [[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]] {
            let a = group_advantages(&cfg, &rewards, &[0, 0, 0, 0], 1, None, None).unwrap();
            assert_eq!(a.weights, vec![0.75, 0.25, 0.25, 0.25]);
        }
    }

    #[test]
    fn all_equal_rewards_give_exact_zeros() {
        for norm_by_std in [false, true] {
            let cfg = Config {
                norm_by_std,
                ..Config::default()
            };
            let a = group_advantages(&cfg, &[1.2155; 8], &[0; 8], 1, None, None).unwrap();
            assert!(a.advantages.iter().all(|&x| x == 0.0), "{:?}", a.advantages);
            assert!(a.weights.iter().all(|&x| x == 0.0));
        }
    }
}
