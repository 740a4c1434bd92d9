//! A tensor without elements has no layout: its strides do not matter (issue 29: NumPy reports
//! strides (0, 0) for a (0, 5) array, which was refused as "not contiguous"). Every entry point
//! reads its tensors through `Tensor::from_raw`; these calls give every tensor argument of the
//! loss, the group advantages and the fused logits path zero strides with zero elements.

use calibrl::desc::metrics::CalibrlMetrics;
use calibrl::ffi::common::{calibrl_config_free, calibrl_config_new, calibrl_last_error_message};
use calibrl::ffi::logits::{
    calibrl_logits_backward, calibrl_logits_forward, calibrl_logits_forward_backward,
};
use calibrl::ffi::loss::{
    calibrl_group_advantages, calibrl_loss, CalibrlAdvantageArgs, CalibrlLossArgs,
};
use calibrl::tensor::HostTensor;
use calibrl::CalibrlStatus;
use std::ptr::{null, null_mut};

#[derive(Clone, Copy)]
enum Kind {
    F32,
    F64,
    I64,
    U8,
}

/// A descriptor over owned data; with no element, its strides are all 0.
struct Desc {
    t: Box<HostTensor>,
    _strides: Vec<i64>,
    _f: Vec<f64>,
    _f32: Vec<f32>,
    _i: Vec<i64>,
    _u: Vec<u8>,
}

/// `shape` of `kind` filled with `value` (1.0 / −1 / 0 for the row tensors of a non-empty
/// batch); zero strides when the shape has no element.
fn desc(shape: &[usize], kind: Kind, value: f64) -> Desc {
    let n: usize = shape.iter().product();
    let (mut f, mut i, mut u) = (
        vec![value; n.max(1)],
        vec![value as i64; n.max(1)],
        vec![value as u8; n.max(1)],
    );
    let mut f32s = vec![value as f32; n.max(1)];
    let mut t = match kind {
        Kind::F32 => HostTensor::f32(&mut f32s, shape),
        Kind::F64 => HostTensor::f64(&mut f, shape),
        Kind::I64 => HostTensor::i64(&mut i, shape),
        Kind::U8 => HostTensor::u8(&mut u, shape),
    };
    let mut strides = vec![0i64; shape.len()];
    if n == 0 {
        t.desc.strides = strides.as_mut_ptr();
    }
    Desc {
        t,
        _strides: strides,
        _f: f,
        _f32: f32s,
        _i: i,
        _u: u,
    }
}

fn empty(shape: &[usize], int: bool) -> Desc {
    assert!(shape.contains(&0));
    desc(shape, if int { Kind::I64 } else { Kind::F64 }, 0.0)
}

fn check(status: CalibrlStatus, what: &str) {
    let msg = unsafe { std::ffi::CStr::from_ptr(calibrl_last_error_message()) };
    assert_eq!(status, CalibrlStatus::Ok, "{what}: {msg:?}");
}

fn config(json: &std::ffi::CStr) -> *mut calibrl::ffi::common::CalibrlConfig {
    let mut cfg = null_mut();
    check(
        unsafe { calibrl_config_new(json.as_ptr(), &mut cfg) },
        "config",
    );
    cfg
}

#[test]
fn loss_takes_empty_tensors_with_zero_strides() {
    let cfg = config(c"{\"preset\":\"reference\",\"entropy_coef\":0.01,\"kl_coef\":0.1}");
    // (B, S) = (0, 5) and (3, 0): every token tensor empty; row tensors [B] (empty when B = 0).
    for (b, s) in [(0usize, 5usize), (3, 0)] {
        let tok = || empty(&[b, s], false);
        let (lp, mask, old, refl, ent, tw) = (tok(), tok(), tok(), tok(), tok(), tok());
        // Row tensors [B]: empty with zero strides when B = 0.
        let (adv, w, sg) = (
            desc(&[b], Kind::F64, 0.5),
            desc(&[b], Kind::F64, 0.5),
            desc(&[b], Kind::F64, 1.0),
        );
        let (is_exp, idx) = (desc(&[b], Kind::U8, 0.0), desc(&[b], Kind::I64, -1.0));
        let elp = empty(&[0, 5], false);
        let (mut gl, mut gh) = (tok(), tok());
        let mut metrics_data = vec![f64::NAN; 16];
        let mut metrics = HostTensor::f64(&mut metrics_data, &[16]);
        let args = CalibrlLossArgs {
            logprobs: lp.t.as_ptr(),
            seq_offsets: null(),
            mask: mask.t.as_ptr(),
            old_logprobs: old.t.as_ptr(),
            ref_logprobs: refl.t.as_ptr(),
            entropy: ent.t.as_ptr(),
            advantages: adv.t.as_ptr(),
            weights: w.t.as_ptr(),
            signs: sg.t.as_ptr(),
            is_expert: is_exp.t.as_ptr(),
            expert_logprobs: elp.t.as_ptr(),
            expert_offsets: null(),
            expert_mask: null(),
            expert_index: idx.t.as_ptr(),
            normalizers: null(),
            grad_logprobs: gl.t.as_mut_ptr(),
            grad_entropy: gh.t.as_mut_ptr(),
            metrics: metrics.as_mut_ptr(),
            token_weights: tw.t.as_ptr(),
        };
        let mut m = CalibrlMetrics::default();
        check(
            unsafe { calibrl_loss(cfg, &args, &mut m, null_mut()) },
            &format!("loss ({b}, {s})"),
        );
        assert_eq!(m.loss, 0.0);
        assert_eq!(m.num_tokens, 0.0);
        drop(metrics);
        assert_eq!(metrics_data[0], 0.0, "the metrics tensor is written");
    }
    unsafe { calibrl_config_free(cfg) };
}

#[test]
fn group_advantages_take_empty_tensors_with_zero_strides() {
    let cfg = config(c"{\"preset\":\"paper\"}");
    let (r, g, c, e) = (
        empty(&[0], false),
        empty(&[0], true),
        desc(&[0], Kind::U8, 0.0),
        desc(&[0], Kind::U8, 0.0),
    );
    let (mut a, mut w, mut s) = (empty(&[0], false), empty(&[0], false), empty(&[0], false));
    let args = CalibrlAdvantageArgs {
        rewards: r.t.as_ptr(),
        group_ids: g.t.as_ptr(),
        num_groups: 0,
        correct: c.t.as_ptr(),
        is_expert: e.t.as_ptr(),
        advantages: a.t.as_mut_ptr(),
        weights: w.t.as_mut_ptr(),
        signs: s.t.as_mut_ptr(),
    };
    check(
        unsafe { calibrl_group_advantages(cfg, &args, null_mut()) },
        "group_advantages",
    );
    unsafe { calibrl_config_free(cfg) };
}

#[test]
fn logits_take_empty_tensors_with_zero_strides() {
    let logits = desc(&[0, 7], Kind::F32, 0.0);
    let labels = empty(&[0], true);
    let (mut lp, mut ent, mut lse) = (
        desc(&[0], Kind::F32, 0.0),
        desc(&[0], Kind::F32, 0.0),
        desc(&[0], Kind::F32, 0.0),
    );
    check(
        unsafe {
            calibrl_logits_forward(
                logits.t.as_ptr(),
                labels.t.as_ptr(),
                1.0,
                lp.t.as_mut_ptr(),
                ent.t.as_mut_ptr(),
                lse.t.as_mut_ptr(),
                null_mut(),
            )
        },
        "logits_forward",
    );
    let (g, gh) = (desc(&[0], Kind::F32, 0.0), desc(&[0], Kind::F32, 0.0));
    let mut dz = desc(&[0, 7], Kind::F32, 0.0);
    check(
        unsafe {
            calibrl_logits_backward(
                logits.t.as_ptr(),
                labels.t.as_ptr(),
                1.0,
                0,
                lse.t.as_ptr(),
                ent.t.as_ptr(),
                g.t.as_ptr(),
                gh.t.as_ptr(),
                dz.t.as_mut_ptr(),
                null_mut(),
            )
        },
        "logits_backward",
    );
    check(
        unsafe {
            calibrl_logits_forward_backward(
                logits.t.as_ptr(),
                labels.t.as_ptr(),
                1.0,
                g.t.as_ptr(),
                gh.t.as_ptr(),
                lp.t.as_mut_ptr(),
                ent.t.as_mut_ptr(),
                lse.t.as_mut_ptr(),
                dz.t.as_mut_ptr(),
                null_mut(),
            )
        },
        "logits_forward_backward",
    );
}
