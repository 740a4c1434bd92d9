//! The CalibRL loss on host data, in f64: the reference semantics of SPEC §4 (value, gradient
//! with respect to ℓ and H, metrics). [`run`] turns a loss descriptor's tensors into a
//! [`LossBatch`]; Rust callers (the training demo, the scheduler tests) may build one directly.
//!
//! `batch` holds the inputs and outputs, `terms` the per-token terms, `compute` the
//! aggregation, `baseline` the exploration baseline, and `run` the descriptor side.

mod baseline;
mod batch;
mod compute;
mod run;
mod terms;

pub use batch::{ExpertBaseline, LossBatch, LossOutput};
pub use compute::compute;
pub use run::run;
pub use terms::{activation, clipped_pg, kl_cov_pg, kl_term, off_policy};
