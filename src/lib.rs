//! calibrl: the CalibRL objective (hybrid-policy RLVR with controllable exploration), its
//! fused kernels and a C ABI. See SPEC.md for the mathematics and `include/calibrl.h` for the
//! ABI.

pub mod config;
pub mod cpu;
pub mod cuda;
pub mod desc;
pub mod error;
pub mod ffi;
pub mod ops;
pub mod rarity;
pub mod scheduler;
pub mod tensor;

pub use config::Config;
pub use error::{CalibrlStatus, Error, Result};
