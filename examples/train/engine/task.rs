//! The task a run trains on: `reach` (the default: many correct answers, the expert shows one
//! style, an out-of-distribution split) or `sums` (the previous main job: one correct answer,
//! which the expert shows). Everything task-specific the trainer needs goes through `Task`.

use super::{reach, sums};

pub type Prompt = Vec<usize>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Reach,
    Sums,
}

/// Training prompts (in pools drawn equally often) and the evaluation splits.
pub struct Dataset {
    pub train: Vec<Vec<Prompt>>,
    /// In-distribution evaluation prompts.
    pub id_eval: Vec<Prompt>,
    /// Out-of-distribution evaluation prompts (empty for `sums`).
    pub ood_eval: Vec<Prompt>,
}

impl Dataset {
    /// A training batch with `per_pool` prompts from each pool.
    pub fn batch(&self, rng: &mut super::rng::Rng, per_pool: usize) -> Vec<Prompt> {
        let mut out = Vec::new();
        for pool in &self.train {
            for _ in 0..per_pool {
                out.push(pool[rng.below(pool.len())].clone());
            }
        }
        out
    }
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Reach => "reach",
            Task::Sums => "sums",
        }
    }

    pub fn parse(s: &str) -> Option<Task> {
        [Task::Reach, Task::Sums]
            .into_iter()
            .find(|t| t.name() == s)
    }

    pub fn vocab(self) -> usize {
        match self {
            Task::Reach => reach::VOCAB,
            Task::Sums => sums::VOCAB,
        }
    }

    pub fn eos(self) -> usize {
        match self {
            Task::Reach => reach::EOS,
            Task::Sums => sums::EOS,
        }
    }

    pub fn max_response(self) -> usize {
        match self {
            Task::Reach => reach::MAX_RESPONSE,
            Task::Sums => sums::MAX_RESPONSE,
        }
    }

    pub fn num_features(self) -> usize {
        match self {
            Task::Reach => reach::NUM_FEATURES,
            Task::Sums => sums::NUM_FEATURES,
        }
    }

    pub fn features(self, prompt: &[usize], prefix: &[usize]) -> [usize; 5] {
        match self {
            Task::Reach => reach::features(prompt, prefix),
            Task::Sums => sums::features(prompt, prefix),
        }
    }

    pub fn expert(self, prompt: &[usize]) -> Vec<usize> {
        match self {
            Task::Reach => reach::expert_response(prompt),
            Task::Sums => sums::expert_response(prompt),
        }
    }

    pub fn reward(self, prompt: &[usize], response: &[usize]) -> f64 {
        match self {
            Task::Reach => reach::reward(prompt, response),
            Task::Sums => sums::reward(prompt, response),
        }
    }

    pub fn base_weights(self) -> Vec<f64> {
        match self {
            Task::Reach => reach::base_weights(),
            Task::Sums => sums::base_weights(),
        }
    }

    /// The prompts; `sums` splits its prompts per seed, `reach` has one fixed split.
    pub fn dataset(self, seed: u64) -> Dataset {
        match self {
            Task::Reach => reach::dataset(),
            Task::Sums => sums::dataset(seed),
        }
    }

    /// One line for the run's header.
    pub fn describe(self) -> &'static str {
        match self {
            Task::Reach => {
                "task reach: write steps of +1..+4 that sum to the target N, then EOS, within 12 \
                 tokens; in distribution N = 2..11 (the expert writes N × (+1)), out of \
                 distribution N = 12..24 (the expert's style cannot fit)"
            }
            Task::Sums => {
                "task sums: running sums mod 5 written step by step, prompts of 2–4 digits; one \
                 correct answer per prompt; 80/20 train / held-out split per seed (no OOD split)"
            }
        }
    }
}
