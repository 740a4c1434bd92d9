//! The previous main job's task (`--task sums`): running sums modulo 5, written out step by
//! step. It has exactly one correct response per prompt, and the expert shows it, so it is the
//! setting in which imitating the expert must win (docs/training.md).
//!
//! A prompt is K digits `d1..dK` (K = 2, 3 or 4, digits 0–4). The answer is the chain of
//! partial sums `s1 = d1, s2 = s1 + d2, …, sK` (mod 5) followed by EOS: each token is one
//! arithmetic step and the last one is the final answer. The reward is 1 iff the whole response
//! is exactly right, else 0 (binary and verifiable). The expert response of a prompt is that
//! correct chain. Longer prompts make correct answers rarer for an untrained policy, and the
//! held-out prompts are combinations never seen in training, so passing them needs the rule,
//! not a memorised table of prompts.

use super::rng::Rng;
use super::task::{Dataset, Prompt};

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

// Policy features of this task (indices into φ; see `policy.rs`).
const BIAS: usize = 0;
/// On once every prompt digit has been consumed (t ≥ K): where EOS belongs.
const EXHAUSTED: usize = 1;
/// The prompt digit at the current step, d_t.
const DIGIT: usize = 2;
/// The previous token (BOS or a digit).
const PREV: usize = DIGIT + BASE;
/// The pair (previous token, d_t): enough to express s_t = s_{t-1} + d_t as a lookup.
const PAIR: usize = PREV + BASE + 1;
/// The previous token once the prompt is consumed (lets EOS depend on what came before).
const PREV_EXHAUSTED: usize = PAIR + (BASE + 1) * BASE;
const POSITION: usize = PREV_EXHAUSTED + BASE + 1;
pub const NUM_FEATURES: usize = POSITION + MAX_RESPONSE;
const BOS: usize = BASE;

/// Active features of the state "prompt, `prefix` generated so far".
pub fn features(prompt: &[usize], prefix: &[usize]) -> [usize; 5] {
    let t = prefix.len();
    let prev = prefix.last().copied().unwrap_or(BOS);
    let (digit, pair) = match prompt.get(t) {
        Some(&d) => (DIGIT + d, PAIR + prev * BASE + d),
        None => (EXHAUSTED, PREV_EXHAUSTED + prev),
    };
    [BIAS, digit, PREV + prev, pair, POSITION + t]
}

/// The base policy: uniform over digits, and a format prior (like a base model that knows to
/// stop after the last step, but not the arithmetic): EOS is unlikely while prompt digits
/// remain (≈1%) and likely once they are consumed (≈80%).
pub fn base_weights() -> Vec<f64> {
    let mut w = vec![0.0; NUM_FEATURES * VOCAB];
    w[BIAS * VOCAB + EOS] = -3.0;
    w[EXHAUSTED * VOCAB + EOS] = 6.0;
    w
}

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

/// Every prompt of every length, shuffled with `seed` and split per length into training
/// prompts and held-out ones (new combinations of the same rule: in distribution).
pub fn dataset(seed: u64) -> Dataset {
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
    Dataset {
        train,
        id_eval: heldout,
        ood_eval: Vec::new(),
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
