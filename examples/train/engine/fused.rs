//! The library's fused logits path (SPEC §6) through its C ABI, on host tensors: the forward
//! gives each token's log-prob ℓ, entropy H and log-sum-exp; the backward turns ∂L/∂ℓ and
//! ∂L/∂H into ∂L/∂logits, in place.

use calibrl::ffi::common::calibrl_last_error_message;
use calibrl::ffi::logits::{calibrl_logits_backward, calibrl_logits_forward};
use calibrl::tensor::HostTensor;
use calibrl::CalibrlStatus;
use std::ffi::CStr;

/// Per-token outputs of the forward, in f64 (the loss reads f64).
pub struct Forward {
    pub logprobs: Vec<f64>,
    pub entropy: Vec<f64>,
    pub lse: Vec<f64>,
}

fn check(status: CalibrlStatus, what: &str) {
    if status != CalibrlStatus::Ok {
        // SAFETY: the library returns a NUL-terminated string valid until its next call.
        let msg = unsafe { CStr::from_ptr(calibrl_last_error_message()) };
        panic!("{what} failed: {status:?}: {}", msg.to_string_lossy());
    }
}

/// Forward over `logits [N, vocab]` (f32) with `labels [N]` at temperature 1.
pub fn forward(logits: &mut [f32], labels: &mut [i64], vocab: usize) -> Forward {
    let n = labels.len();
    let mut out = Forward {
        logprobs: vec![0.0; n],
        entropy: vec![0.0; n],
        lse: vec![0.0; n],
    };
    let z = HostTensor::f32(logits, &[n, vocab]);
    let y = HostTensor::i64(labels, &[n]);
    let mut lp = HostTensor::f64(&mut out.logprobs, &[n]);
    let mut h = HostTensor::f64(&mut out.entropy, &[n]);
    let mut lse = HostTensor::f64(&mut out.lse, &[n]);
    // SAFETY: every descriptor points to a live host buffer of the stated shape.
    let status = unsafe {
        calibrl_logits_forward(
            z.as_ptr(),
            y.as_ptr(),
            1.0,
            lp.as_mut_ptr(),
            h.as_mut_ptr(),
            lse.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    check(status, "calibrl_logits_forward");
    out
}

/// Backward: overwrites `logits` with ∂L/∂logits given ∂L/∂ℓ and ∂L/∂H per token.
pub fn backward(
    logits: &mut [f32],
    labels: &mut [i64],
    vocab: usize,
    saved: &mut Forward,
    grad_logprobs: &mut [f64],
    grad_entropy: &mut [f64],
) {
    let n = labels.len();
    let mut z = HostTensor::f32(logits, &[n, vocab]);
    let y = HostTensor::i64(labels, &[n]);
    let lse = HostTensor::f64(&mut saved.lse, &[n]);
    let h = HostTensor::f64(&mut saved.entropy, &[n]);
    let g = HostTensor::f64(grad_logprobs, &[n]);
    let gh = HostTensor::f64(grad_entropy, &[n]);
    let zp = z.as_mut_ptr();
    // SAFETY: as in `forward`; `grad_logits` is the logits tensor itself (in place, allowed).
    let status = unsafe {
        calibrl_logits_backward(
            zp,
            y.as_ptr(),
            1.0,
            0,
            lse.as_ptr(),
            h.as_ptr(),
            g.as_ptr(),
            gh.as_ptr(),
            zp,
            std::ptr::null_mut(),
        )
    };
    check(status, "calibrl_logits_backward");
}
