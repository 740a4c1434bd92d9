//! The plan's values: sequences, micro-batches, passes, mini-batches and the [`Plan`] of a
//! step, with the lookups on them.

use super::input::SchedulerConfig;
use crate::desc::metrics::CalibrlNormalizers;
use crate::error::{CalibrlStatus, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum SeqKind {
    Rollout = 0,
    Expert = 1,
}

/// One sequence in a micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqRef {
    pub kind: SeqKind,
    /// The prompt it belongs to.
    pub prompt: u32,
    /// Rollout index (global, `0..R`) or expert slot (`0..P*`).
    pub index: u32,
    /// Prompt + response tokens.
    pub tokens: u32,
    /// Response tokens.
    pub response_len: u32,
}

impl SeqRef {
    /// The sequence id (see the module docs): `index` for rollouts, `num_rollouts + index`
    /// for expert slots.
    pub fn id(&self, num_rollouts: usize) -> i64 {
        match self.kind {
            SeqKind::Rollout => self.index as i64,
            SeqKind::Expert => (num_rollouts + self.index as usize) as i64,
        }
    }
}

/// A micro-batch: the sequences one forward (and backward) call processes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MicroBatch {
    pub seqs: Vec<SeqRef>,
}

impl MicroBatch {
    pub fn tokens(&self) -> u64 {
        self.seqs.iter().map(|s| s.tokens as u64).sum()
    }
    pub fn response_tokens(&self) -> u64 {
        self.seqs.iter().map(|s| s.response_len as u64).sum()
    }
}

/// One pass over a set of sequences. Every rank runs the same number of micro-batches,
/// `microbatches` (collectives stay in step); `ranks[r]` holds rank `r`'s micro-batches that
/// have sequences, ordered by decreasing workload (so that the heavy ones of all ranks run at
/// the same time), and the rank runs the remaining ones of the count empty (zero-token steps).
/// Empty micro-batches are not stored, so a plan's memory follows its sequences, not
/// ranks × the busiest rank's count (docs/abi.md states the bound).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassPlan {
    pub ranks: Vec<Vec<MicroBatch>>,
    /// Micro-batches per rank (the same on every rank).
    pub microbatches: usize,
    /// Sequences longer than the pass's budget; each sits alone in a micro-batch.
    pub oversize: Vec<SeqRef>,
}

impl PassPlan {
    /// Micro-batches per rank (the same on every rank).
    pub fn microbatches_per_rank(&self) -> usize {
        self.microbatches
    }
    /// The sequences of micro-batch `mb` of rank `rank` (empty past the stored ones).
    /// Panics when `rank` or `mb` is out of range.
    pub fn microbatch(&self, rank: usize, mb: usize) -> &[SeqRef] {
        assert!(
            mb < self.microbatches,
            "micro-batch {mb} of {}",
            self.microbatches
        );
        self.ranks[rank].get(mb).map_or(&[], |m| &m.seqs)
    }
    /// Rank `rank`'s micro-batches, all `microbatches` of them (the empty ones included).
    pub fn rank_microbatches(&self, rank: usize) -> impl Iterator<Item = &[SeqRef]> {
        (0..self.microbatches).map(move |mb| self.microbatch(rank, mb))
    }
    /// Token load (prompt + response) of each rank.
    pub fn rank_tokens(&self) -> Vec<u64> {
        self.ranks
            .iter()
            .map(|r| r.iter().map(MicroBatch::tokens).sum())
            .collect()
    }
    pub fn seqs(&self) -> impl Iterator<Item = &SeqRef> {
        self.ranks.iter().flatten().flat_map(|mb| mb.seqs.iter())
    }
}

/// One mini-batch of the training pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Minibatch {
    /// Its prompts: `first_prompt .. first_prompt + num_prompts`.
    pub first_prompt: usize,
    pub num_prompts: usize,
    pub pass: PassPlan,
    pub normalizers: CalibrlNormalizers,
}

/// Which pass a query is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassKind {
    NoGrad,
    Train,
}

/// The schedule of one training step. Fields are public and read-only by convention: the plan
/// is a value computed once by [`plan`](super::plan()).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub config: SchedulerConfig,
    /// Per prompt: the id of its first rollout (`[P+1]`, the last entry is `R`).
    pub rollout_offsets: Vec<usize>,
    /// Per prompt: its prompt length.
    pub prompt_lens: Vec<u32>,
    /// Per rollout: its response length.
    pub rollout_lens: Vec<u32>,
    /// Per rollout: its prompt.
    pub rollout_prompt: Vec<u32>,
    /// Per expert slot: its prompt.
    pub expert_prompts: Vec<u32>,
    /// Per expert slot: its response length.
    pub expert_lens: Vec<u32>,
    /// Per expert slot: start of its tokens in the packed expert tensor (`[P*+1]`).
    pub expert_offsets: Vec<i64>,
    /// Per rollout: its prompt's expert slot, or −1 (`expert_index` of the loss).
    pub gather: Vec<i64>,
    /// Prompts left out by dynamic sampling (all-equal rewards), increasing; their rollouts are
    /// in neither pass (the trainer may sample this many more prompts).
    pub dropped_prompts: Vec<u32>,
    pub nograd: PassPlan,
    pub minibatches: Vec<Minibatch>,
}

impl Plan {
    pub fn num_prompts(&self) -> usize {
        self.prompt_lens.len()
    }
    pub fn num_rollouts(&self) -> usize {
        self.rollout_lens.len()
    }
    pub fn num_expert_slots(&self) -> usize {
        self.expert_prompts.len()
    }
    /// Number of sequence ids (`R + P*`).
    pub fn num_seqs(&self) -> usize {
        self.num_rollouts() + self.num_expert_slots()
    }

    /// The sequence with the given id (see the module docs).
    pub fn seq(&self, id: i64) -> Option<SeqRef> {
        let r = self.num_rollouts();
        let id = usize::try_from(id).ok()?;
        if id < r {
            let prompt = self.rollout_prompt[id];
            let len = self.rollout_lens[id];
            Some(SeqRef {
                kind: SeqKind::Rollout,
                prompt,
                index: id as u32,
                tokens: self.prompt_lens[prompt as usize] + len,
                response_len: len,
            })
        } else if id < r + self.num_expert_slots() {
            let slot = id - r;
            let prompt = self.expert_prompts[slot];
            let len = self.expert_lens[slot];
            Some(SeqRef {
                kind: SeqKind::Expert,
                prompt,
                index: slot as u32,
                tokens: self.prompt_lens[prompt as usize] + len,
                response_len: len,
            })
        } else {
            None
        }
    }

    /// The oversize sequences of a pass (for `Train`, over all mini-batches in order).
    pub fn oversize(&self, pass: PassKind) -> Vec<SeqRef> {
        match pass {
            PassKind::NoGrad => self.nograd.oversize.clone(),
            PassKind::Train => self
                .minibatches
                .iter()
                .flat_map(|m| m.pass.oversize.iter().copied())
                .collect(),
        }
    }
}

/// Fails with `CALIBRL_STATUS_INVALID_ARGUMENT` naming `arg` when `value >= bound`.
pub(crate) fn check_index(arg: &str, value: usize, bound: usize) -> Result<()> {
    if value >= bound {
        return Err(Error::new(
            CalibrlStatus::InvalidArgument,
            format!("`{arg}`: {value} is out of range (must be < {bound})"),
        ));
    }
    Ok(())
}
