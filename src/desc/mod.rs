//! Operation descriptors: the validated arguments of every operation, and the results and
//! normalisers the backends share. Validation here is device-independent (NULL, dtype, shape,
//! layout, device agreement); a backend receives a descriptor and may assume what its
//! `validate` checked. This layer imports only the foundation (`error`, `tensor`, `config`).

pub mod expert;
pub mod linear;
pub mod logits;
pub mod loss;
pub mod metrics;

use std::ffi::c_void;

/// The caller's CUDA stream (`CUstream`); NULL is the legacy default stream. Ignored on CPU.
pub type Stream = *mut c_void;
