//! calibrl: the CalibRL objective (hybrid-policy RLVR with controllable exploration), its
//! fused kernels and a C ABI. See SPEC.md for the mathematics and `include/calibrl.h` for the
//! ABI.

// Index loops over parallel arrays read more clearly than zipped iterators in numeric code.
#![allow(clippy::needless_range_loop)]

pub mod config;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod ffi;
pub mod ops;
pub mod rarity;
pub mod tensor;

pub use config::Config;
pub use error::{CalibrlStatus, Error, Result};
