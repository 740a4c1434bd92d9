//! Expert selection: which prompts' expert responses the step forwards (SPEC §7.5).

use super::input::{ExpertSelection, SchedulerConfig, StepInput};
use crate::config::LossKind;
use crate::error::{Error, Result};

/// SplitMix64 (Steele, Lea & Flood 2014): a tiny, well-mixed, seedable generator. Self-written
/// so that a seed gives the same selection on every platform and crate version.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, n)` (Lemire's multiply-shift; the bias is below 2^-32 for any n < 2^32).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// `selected[g]`: whether prompt `g`'s expert is forwarded. Prompts without an expert, and
/// groups left out by dynamic sampling (`dropped`), are never selected; GRPO selects none
/// (nothing reads them).
pub(super) fn select_experts(
    input: &StepInput,
    config: &SchedulerConfig,
    dropped: &[bool],
) -> Result<Vec<bool>> {
    let has: Vec<bool> = input
        .prompts
        .iter()
        .zip(dropped)
        .map(|(p, &d)| p.expert_len.is_some() && !d)
        .collect();
    if config.loss_kind == LossKind::Grpo {
        return Ok(vec![false; has.len()]);
    }
    match config.expert_selection {
        ExpertSelection::All => Ok(has),
        ExpertSelection::RandomFraction { fraction, seed } => {
            let mut eligible: Vec<usize> = (0..has.len()).filter(|&g| has[g]).collect();
            let k = (fraction * eligible.len() as f64).round() as usize;
            // Partial Fisher–Yates: the first k entries become a uniform k-subset.
            let mut rng = SplitMix64::new(seed);
            for i in 0..k.min(eligible.len()) {
                let j = i + rng.below((eligible.len() - i) as u64) as usize;
                eligible.swap(i, j);
            }
            let mut selected = vec![false; has.len()];
            for &g in &eligible[..k.min(eligible.len())] {
                selected[g] = true;
            }
            Ok(selected)
        }
        ExpertSelection::PassRate {
            low,
            high,
            threshold,
        } => {
            let mut selected = vec![false; has.len()];
            for (g, p) in input.prompts.iter().enumerate() {
                if !has[g] {
                    continue;
                }
                let rewards = p.rewards.as_ref().ok_or_else(|| {
                    Error::invalid(
                        &format!("prompts[{g}].rewards"),
                        "is missing: pass-rate selection needs the rewards of every prompt that has an expert",
                    )
                })?;
                let passed = rewards.iter().filter(|&&r| r > threshold).count();
                let rate = passed as f64 / rewards.len() as f64;
                selected[g] = low <= rate && rate <= high;
            }
            Ok(selected)
        }
    }
}

/// DAPO dynamic sampling (SPEC §7.6): `dropped[g]` when prompt `g` has at least two rollouts
/// and their rewards are all equal (its advantages are exactly 0, SPEC §3). Needs the rewards.
pub(super) fn dynamic_sampling(input: &StepInput, config: &SchedulerConfig) -> Result<Vec<bool>> {
    if !config.dynamic_sampling {
        return Ok(vec![false; input.prompts.len()]);
    }
    input
        .prompts
        .iter()
        .enumerate()
        .map(|(g, p)| {
            let r = p.rewards.as_ref().ok_or_else(|| {
                Error::invalid(
                    &format!("prompts[{g}].rewards"),
                    "is missing: dynamic sampling needs the rewards of every prompt",
                )
            })?;
            Ok(r.len() >= 2 && r.iter().all(|&x| x == r[0]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_sequence() {
        // First outputs for seed 0 from the reference C implementation (Vigna's splitmix64.c).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = SplitMix64::new(7);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let v = r.below(5) as usize;
            assert!(v < 5);
            seen[v] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
