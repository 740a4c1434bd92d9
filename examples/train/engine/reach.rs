//! The default task, "reach the target": a task with many correct answers of which the expert
//! shows one.
//!
//! A prompt is a target N. A response is a sequence of steps, each token adding 1, 2, 3 or 4,
//! ended by EOS; it is correct (reward 1) iff the steps sum to exactly N and EOS comes within
//! `MAX_RESPONSE` tokens, else 0. Every composition of N into parts 1–4 is a correct answer
//! (773 of them for N = 11). The expert always writes the same verbose style: N steps of +1,
//! then EOS (N + 1 tokens).
//!
//! In-distribution prompts are N = 2..=11, where the expert's style fits the budget of 12
//! tokens. Out-of-distribution prompts are N = 12..=24: the expert's style cannot finish
//! within the budget (N + 1 > 12 tokens), while larger steps can (24 = 6 × 4 needs 7 tokens).
//! No method ever trains on them.

use super::task::{Dataset, Prompt};

/// Tokens 0..4 are the steps +1..+4; EOS is token 4.
pub const STEPS: usize = 4;
pub const EOS: usize = STEPS;
pub const VOCAB: usize = STEPS + 1;
pub const MAX_RESPONSE: usize = 12;
pub const ID_TARGETS: std::ops::RangeInclusive<usize> = 2..=11;
pub const OOD_TARGETS: std::ops::RangeInclusive<usize> = 12..=24;

// Feature layout (indices into φ).
const BIAS: usize = 0;
/// What is left to reach, r = N − (sum so far): overshot (r < 0), r = 0, 1, 2, 3, or "far"
/// (r ≥ 4, where every step is safe). Six states.
const STATE: usize = 1;
const NUM_STATES: usize = 6;
/// The previous token (BOS or a step).
const PREV: usize = STATE + NUM_STATES;
const NUM_PREV: usize = STEPS + 1;
/// The pair (state, previous token): lets the style depend on the step just taken.
const PAIR: usize = PREV + NUM_PREV;
/// How far: r < 4, 4–7, 8–11, ≥ 12 (the last bucket is reached only out of distribution).
const DIST: usize = PAIR + NUM_STATES * NUM_PREV;
pub const NUM_FEATURES: usize = DIST + 4;

/// N steps of +1, then EOS.
pub fn expert_response(prompt: &[usize]) -> Vec<usize> {
    let mut out = vec![0; prompt[0]];
    out.push(EOS);
    out
}

/// 1 iff the steps sum to the target and the response ends with EOS.
pub fn reward(prompt: &[usize], response: &[usize]) -> f64 {
    let Some((&last, steps)) = response.split_last() else {
        return 0.0;
    };
    let ok = last == EOS
        && steps.iter().all(|&t| t < STEPS)
        && steps.iter().map(|&t| t + 1).sum::<usize>() == prompt[0];
    ok as u8 as f64
}

/// Active features of the state "prompt, `prefix` generated so far".
pub fn features(prompt: &[usize], prefix: &[usize]) -> [usize; 5] {
    let r = prompt[0] as i64 - prefix.iter().map(|&t| t as i64 + 1).sum::<i64>();
    let state = if r < 0 { 0 } else { (r.min(4) + 1) as usize };
    let prev = prefix.last().map_or(0, |&t| t + 1);
    let dist = (r.max(0) as usize / 4).min(3);
    [
        BIAS,
        STATE + state,
        PREV + prev,
        PAIR + state * NUM_PREV + prev,
        DIST + dist,
    ]
}

/// The base policy: uniform over the four steps, and EOS unlikely everywhere (≈3% per
/// token): it knows the format but not when the target is reached.
pub fn base_weights() -> Vec<f64> {
    let mut w = vec![0.0; NUM_FEATURES * VOCAB];
    w[BIAS * VOCAB + EOS] = -2.0;
    w
}

/// Training prompts in two pools (N = 2–6 and 7–11, drawn equally often); evaluation on every
/// in-distribution target and every out-of-distribution one. The same for every seed.
pub fn dataset() -> Dataset {
    let p = |n: usize| -> Prompt { vec![n] };
    Dataset {
        train: vec![(2..=6).map(p).collect(), (7..=11).map(p).collect()],
        id_eval: ID_TARGETS.map(p).collect(),
        ood_eval: OOD_TARGETS.map(p).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_answers_are_correct_and_the_expert_is_one_of_them() {
        assert_eq!(expert_response(&[3]), vec![0, 0, 0, EOS]);
        assert_eq!(reward(&[3], &[0, 0, 0, EOS]), 1.0);
        assert_eq!(reward(&[3], &[2, EOS]), 1.0);
        assert_eq!(reward(&[3], &[1, 0, EOS]), 1.0);
        assert_eq!(reward(&[3], &[1, 1, EOS]), 0.0);
        assert_eq!(reward(&[3], &[2]), 0.0);
    }
}
