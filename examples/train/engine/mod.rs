//! The training demo's engine (examples/train): two verifiable tasks, a log-linear policy, and a
//! trainer that runs GRPO, GRPO with an entropy bonus, SFT-then-GRPO, LUFFY, RL-PLUS and
//! CalibRL through the library. Shared with `tests/train_demo.rs`, which runs a shortened
//! version.

pub mod fused;
pub mod plan;
pub mod policy;
pub mod reach;
pub mod report;
pub mod rng;
pub mod stats;
pub mod sums;
pub mod task;
pub mod trainer;
