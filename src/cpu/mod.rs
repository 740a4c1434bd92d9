//! The CPU backend: the reference semantics of SPEC.md, and the embedded default on any
//! machine. Loss arithmetic runs in f64; the logits path computes exponentials in f32 and
//! accumulates in f64.

pub mod advantages;
pub mod cov;
pub mod expert;
pub mod fastmath;
pub mod linear;
pub mod logits;
pub mod loss;
pub mod parallel;
