//! CPU fused logits path. Per row: one online-softmax pass for the forward (max, Σe^(u−m),
//! Σe^(u−m)·(u−m), target), one pass for the backward. Entropy uses the (u − m) form so that
//! large logits (±1e4) do not cancel catastrophically.
//!
//! `rows` holds the element types and row-parallel plumbing, `stats` the per-row statistics,
//! `forward` and `backward` the operations.

mod backward;
mod forward;
mod rows;
mod stats;

pub use backward::backward;
pub use forward::{forward, shard_finish, shard_stats};
pub use stats::{combine, RowStats};
pub(crate) use stats::{row_stats_f32, stats_rows};
