//! The training demo's engine (examples/train): a verifiable task, a log-linear policy, and a
//! trainer that runs GRPO, SFT-then-GRPO, LUFFY, RL-PLUS and CalibRL through the library.
//! Shared with `tests/train_demo.rs`, which runs a shortened version.

pub mod fused;
pub mod plan;
pub mod policy;
pub mod report;
pub mod rng;
pub mod task;
pub mod trainer;
