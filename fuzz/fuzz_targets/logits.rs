//! calibrl_logits_forward, calibrl_logits_backward and calibrl_logits_forward_backward (out of
//! place and in place).
#![no_main]

use calibrl::ffi::logits::{
    calibrl_logits_backward, calibrl_logits_forward, calibrl_logits_forward_backward,
};
use calibrl_fuzz::*;
use libfuzzer_sys::fuzz_target;

const LOGITS: [(u8, u8); 3] = [F32, BF16, F16];

fn temperature(b: &mut Bytes) -> f64 {
    if b.rare(6) {
        b.float()
    } else {
        [1.0, 0.7, 0.5, 2.0, 1e-3][b.below(5)]
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let n = b.below(6);
    let v = 1 + b.below(40);
    let labels: Vec<f64> = (0..n)
        .map(|_| match b.u8() % 8 {
            0 => -1.0,
            1 => b.count(2 * v) as f64,
            _ => b.below(v) as f64,
        })
        .collect();
    let Some(mut logits) = FTensor::build(&mut b, &Want::input(&LOGITS, &[n, v]), false) else {
        return;
    };
    let Some(label_t) = FTensor::build(&mut b, &Want::input(&[I64, I32], &[n]).with(&labels), true)
    else {
        return;
    };
    let t = temperature(&mut b);
    if std::env::var_os("CALIBRL_FUZZ_DEBUG").is_some() {
        eprintln!("temperature {t}");
    }
    let backward = b.rare(2);
    if !backward {
        let Some((mut lp, mut ent, mut lse)) = row_outputs(&mut b, n) else {
            return;
        };
        let tensors = [
            Some(&logits),
            Some(&label_t),
            Some(&lp),
            ent.as_ref(),
            Some(&lse),
        ];
        let before = snapshot(&tensors);
        let st = unsafe {
            calibrl_logits_forward(
                logits.ptr(),
                label_t.ptr(),
                t,
                lp.mptr(),
                mptr_of(&mut ent),
                lse.mptr(),
                std::ptr::null_mut(),
            )
        } as i32;
        let tensors = [
            Some(&logits),
            Some(&label_t),
            Some(&lp),
            ent.as_ref(),
            Some(&lse),
        ];
        check("logits_forward", st, &tensors, &before, None);
        if st == OK {
            // log p <= 0 up to rounding; entropy >= 0 up to rounding.
            for x in lp.values() {
                assert!(x <= 1e-2 * (1.0 + x.abs()), "log-prob {x} > 0");
            }
        }
        return;
    }
    // Backward: saved lse / entropy, upstream gradients, out of place or in place.
    let vocab_start = if b.rare(8) { b.count(v) } else { 0 };
    let Some(lse) = FTensor::build(&mut b, &Want::input(&FLOATS, &[n]), true) else {
        return;
    };
    let Some(ent) = optional(&mut b, &Want::input(&FLOATS, &[n]), true) else {
        return;
    };
    let Some(g) = FTensor::build(&mut b, &Want::input(&FLOATS, &[n]), true) else {
        return;
    };
    let Some(h) = optional(&mut b, &Want::input(&FLOATS, &[n]), true) else {
        return;
    };
    let in_place = b.rare(3);
    let mut grad = if in_place {
        None
    } else {
        let Some(t) = FTensor::build(&mut b, &Want::output(&LOGITS, &[n, v]), true) else {
            return;
        };
        Some(t)
    };
    // Read last, so that the committed seeds keep their meaning (false once the bytes run out).
    if b.rare(3) {
        forward_backward(&mut b, n, logits, label_t, t, g, h, grad);
        return;
    }
    let logits_ptr = logits.ptr();
    let out = match grad.as_mut() {
        Some(t) => t.mptr(),
        None => logits.mptr(),
    };
    let tensors = [
        Some(&logits),
        Some(&label_t),
        Some(&lse),
        ent.as_ref(),
        Some(&g),
        h.as_ref(),
        grad.as_ref(),
    ];
    let before = snapshot(&tensors);
    let st = unsafe {
        calibrl_logits_backward(
            logits_ptr,
            label_t.ptr(),
            t,
            vocab_start,
            lse.ptr(),
            ptr_of(&ent),
            g.ptr(),
            ptr_of(&h),
            out,
            std::ptr::null_mut(),
        )
    } as i32;
    check(
        "logits_backward",
        st,
        &tensors,
        &before,
        in_place.then_some(0),
    );
});

/// calibrl_logits_forward_backward with the backward's upstream gradients and `grad_logits`
/// (None: in place), fresh row outputs of any float dtype (float16 / bfloat16 are refused), and
/// sometimes `lse` passed as a second descriptor of `grad_logprobs` or `entropy` of `lse`.
#[allow(clippy::too_many_arguments)]
fn forward_backward(
    b: &mut Bytes,
    n: usize,
    mut logits: FTensor,
    labels: FTensor,
    temperature: f64,
    g: FTensor,
    h: Option<FTensor>,
    mut grad: Option<FTensor>,
) {
    let Some((mut lp, mut ent, mut lse)) = row_outputs(b, n) else {
        return;
    };
    match b.u8() % 16 {
        0 => lse = FTensor::alias_of(&g, true),
        1 => ent = Some(FTensor::alias_of(&lse, true)),
        _ => {}
    }
    let in_place = grad.is_none();
    let logits_ptr = logits.ptr();
    let out = match grad.as_mut() {
        Some(t) => t.mptr(),
        None => logits.mptr(),
    };
    let tensors = [
        Some(&logits),
        Some(&labels),
        Some(&g),
        h.as_ref(),
        Some(&lp),
        ent.as_ref(),
        Some(&lse),
        grad.as_ref(),
    ];
    let before = snapshot(&tensors);
    let st = unsafe {
        calibrl_logits_forward_backward(
            logits_ptr,
            labels.ptr(),
            temperature,
            g.ptr(),
            ptr_of(&h),
            lp.mptr(),
            mptr_of(&mut ent),
            lse.mptr(),
            out,
            std::ptr::null_mut(),
        )
    } as i32;
    let tensors = [
        Some(&logits),
        Some(&labels),
        Some(&g),
        h.as_ref(),
        Some(&lp),
        ent.as_ref(),
        Some(&lse),
        grad.as_ref(),
    ];
    check(
        "logits_forward_backward",
        st,
        &tensors,
        &before,
        in_place.then_some(0),
    );
}
