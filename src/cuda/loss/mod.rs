//! Group advantages and the loss on CUDA (kernels in `cuda/loss.cu`).
//!
//! Same semantics as the CPU backend (`crate::cpu::loss`, computed in double on the device),
//! with these CUDA-specific rules:
//! - Values are not copied back to be checked: NaN inputs propagate, an out-of-range group id or
//!   expert slot yields NaN in the affected outputs, instead of an error status.
//! - Every tensor must be contiguous.
//! - Workspace: each (device, stream) pair gets a cached device buffer, grown on demand and
//!   never freed while the process lives (a captured CUDA graph may still point at it). Make one
//!   call outside stream capture before capturing, so the allocation happens then.
//! - `host_metrics` synchronises the stream; otherwise nothing synchronises.

mod advantages;
mod args;
mod params;
mod run;
mod source;

pub use advantages::group_advantages;
pub use run::loss;
pub use source::LOSS;
