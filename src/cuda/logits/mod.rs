//! The fused logits path on CUDA (kernels in `cuda/logits.cu`).
//!
//! Same conventions as the CPU backend (`crate::cpu::logits`; the descriptors are in
//! `crate::desc::logits`), with these CUDA-specific rules:
//! - The `[N]` tensors (`logprobs`, `entropy`, `lse`, `grad_logprobs`, `grad_entropy`) may be
//!   float32, float64, bfloat16 or float16; the kernels compute in f32 whatever the dtype.
//! - Input checks that need the data (NaN / +inf logits, a row entirely −inf, labels past the
//!   vocabulary in the full-vocabulary forward, NaN saved statistics) cannot be reported without
//!   a host synchronisation: the affected rows' outputs are NaN instead of an error status.
//! - `logits` and `grad_logits` must be aligned to their element size (any framework tensor is).
//! - Nothing is allocated and nothing synchronises: every call is one kernel launch on `stream`
//!   (`forward_backward` on the three-pass path: two).
//! - `forward_backward` (token-local losses, full vocabulary) takes the single-pass kernel where
//!   [`plan`] says it applies: sm_90+ and a row that fits the shared memory of a thread-block
//!   cluster of at most 8 CTAs. Otherwise it runs `forward` then `backward` (three passes over
//!   the logits).

mod args;
mod geometry;
mod passes;
mod shard;
mod source;

pub use geometry::{forward_backward_path, plan, LogitsPath};
pub use passes::{backward, forward, forward_backward};
pub use shard::{shard_finish, shard_stats};
pub use source::LOGITS;
