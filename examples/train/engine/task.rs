//! The verifiable task: running sums modulo 5, written out step by step.
//!
//! A prompt is K digits `d1..dK` (K = 2, 3 or 4, digits 0–4). The answer is the chain of
//! partial sums `s1 = d1, s2 = s1 + d2, …, sK` (mod 5) followed by EOS: each token is one
//! arithmetic step and the last one is the final answer. The reward is 1 iff the whole response
//! is exactly right, else 0 (binary and verifiable). The expert response of a prompt is that
//! correct chain. Longer prompts make correct answers rarer for an untrained policy, and the
//! held-out prompts are combinations never seen in training, so passing them needs the rule,
//! not a memorised table of prompts.

use super::rng::Rng;

/// Digits are tokens 0..BASE; EOS is token BASE.
pub const BASE: usize = 5;
pub const EOS: usize = BASE;
pub const VOCAB: usize = BASE + 1;
pub const LENGTHS: [usize; 3] = [2, 3, 4];
/// Generation stops at EOS or after this many tokens (room for two tokens past the longest
/// answer, so over-long responses can happen and be penalised).
pub const MAX_RESPONSE: usize = 6;
/// Share of the prompts of each length held out for evaluation.
const HELDOUT_FRACTION: f64 = 0.2;

pub type Prompt = Vec<usize>;

/// The correct response: partial sums mod BASE, then EOS.
pub fn expert_response(prompt: &[usize]) -> Vec<usize> {
    let mut s = 0;
    let mut out: Vec<usize> = prompt
        .iter()
        .map(|&d| {
            s = (s + d) % BASE;
            s
        })
        .collect();
    out.push(EOS);
    out
}

/// 1 iff the response is exactly the correct chain and its EOS.
pub fn reward(prompt: &[usize], response: &[usize]) -> f64 {
    (response == expert_response(prompt).as_slice()) as u8 as f64
}

/// Train and held-out prompts, split per prompt length.
pub struct Dataset {
    /// `train[j]` holds the training prompts of length `LENGTHS[j]`.
    pub train: Vec<Vec<Prompt>>,
    pub heldout: Vec<Prompt>,
}

impl Dataset {
    /// Every prompt of every length, shuffled with `seed` and split per length.
    pub fn new(seed: u64) -> Dataset {
        let mut rng = Rng::stream(seed, 0x5EED_0001);
        let mut train = Vec::new();
        let mut heldout = Vec::new();
        for &k in &LENGTHS {
            let mut all = all_prompts(k);
            rng.shuffle(&mut all);
            let n_held = (all.len() as f64 * HELDOUT_FRACTION).round() as usize;
            heldout.extend(all.drain(..n_held));
            train.push(all);
        }
        Dataset { train, heldout }
    }

    /// A training batch with the same number of prompts of each length, so that the short
    /// prompts (where a lucky rollout is likelier) are seen as often as the long ones.
    pub fn batch(&self, rng: &mut Rng, per_length: usize) -> Vec<Prompt> {
        let mut out = Vec::new();
        for pool in &self.train {
            for _ in 0..per_length {
                out.push(pool[rng.below(pool.len())].clone());
            }
        }
        out
    }
}

fn all_prompts(k: usize) -> Vec<Prompt> {
    let count = BASE.pow(k as u32);
    (0..count)
        .map(|mut n| {
            (0..k)
                .map(|_| {
                    let d = n % BASE;
                    n /= BASE;
                    d
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_is_the_chain_of_partial_sums() {
        assert_eq!(expert_response(&[3, 4, 1]), vec![3, 2, 3, EOS]);
        assert_eq!(reward(&[3, 4, 1], &[3, 2, 3, EOS]), 1.0);
        assert_eq!(reward(&[3, 4, 1], &[3, 2, 3]), 0.0);
    }
}
