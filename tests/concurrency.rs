//! 16 threads calling the C ABI at once, good and bad calls mixed: every result must be bitwise
//! the single-threaded one, and every thread must read its own last-error message.

mod common;

use calibrl::ffi::loss::{calibrl_group_advantages, CalibrlAdvantageArgs};
use common::{
    cfg_new, gen_case, last_error, lib_logits_forward_dt, lib_loss, CallOpts, Dt, Gen, Layout, Rng,
    Tensor,
};
use std::sync::Barrier;

/// What one call gave: status, its outputs' bits, the thread's last-error message right after.
type Outcome = (i32, Vec<u64>, String);

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn loss_call(seed: u64, cfg: &'static str, entropy: bool) -> Outcome {
    let case = gen_case(
        &mut Rng::new(seed),
        &Gen {
            layout: if seed % 2 == 0 {
                Layout::Packed
            } else {
                Layout::Padded
            },
            ent: entropy,
            ..Gen::default()
        },
    );
    match lib_loss(cfg, &case, &CallOpts::default()) {
        Ok(r) => (
            0,
            bits(&[r.grad_l, r.grad_h, r.metrics.to_vec()].concat()),
            last_error(),
        ),
        Err((st, _)) => (st, vec![], last_error()),
    }
}

fn forward_call(seed: u64, n: usize, v: usize, temperature: f64) -> Outcome {
    let mut rng = Rng::new(seed);
    let vals: Vec<f64> = (0..n * v).map(|_| rng.normal() * 2.0).collect();
    let logits = Tensor::new(&vals, &[n, v], Dt::BF16);
    let labels: Vec<i64> = (0..n).map(|_| rng.int(0, v) as i64).collect();
    let labels = Tensor::ints(&labels, &[n], Dt::I64);
    match lib_logits_forward_dt(&logits, &labels, temperature, Dt::F32) {
        Ok(f) => (0, bits(&[f.logp, f.ent, f.lse].concat()), last_error()),
        Err((st, _)) => (st, vec![], last_error()),
    }
}

fn advantages_call(num_groups: i64) -> Outcome {
    let cfg = cfg_new("{}");
    let rewards = Tensor::new(&[1.0, 0.0, 0.5, 1.0, 0.0, 0.0], &[6], Dt::F32);
    let ids = Tensor::ints(&[0, 0, 1, 1, 2, 2], &[6], Dt::I32);
    let mut out: Vec<Tensor> = (0..3).map(|_| Tensor::filled(0.0, &[6], Dt::F64)).collect();
    let (a, rest) = out.split_at_mut(1);
    let (w, c) = rest.split_at_mut(1);
    let args = CalibrlAdvantageArgs {
        rewards: rewards.lib(),
        group_ids: ids.lib(),
        num_groups,
        correct: std::ptr::null(),
        is_expert: std::ptr::null(),
        advantages: a[0].lib_mut(),
        weights: w[0].lib_mut(),
        signs: c[0].lib_mut(),
    };
    let st = unsafe { calibrl_group_advantages(cfg.0, &args, std::ptr::null_mut()) } as i32;
    let msg = last_error();
    let values: Vec<f64> = out.iter().flat_map(|t| t.to_vec()).collect();
    (st, bits(&values), msg)
}

fn config_call(json: &'static str) -> Outcome {
    let c = std::ffi::CString::new(json).unwrap();
    let mut out = std::ptr::null_mut();
    let st = unsafe { calibrl::ffi::common::calibrl_config_new(c.as_ptr(), &mut out) } as i32;
    let msg = last_error();
    unsafe { calibrl::ffi::common::calibrl_config_free(out) };
    (st, vec![], msg)
}

#[allow(clippy::type_complexity)]
fn calls() -> Vec<(&'static str, Box<dyn Fn() -> Outcome + Sync>)> {
    vec![
        ("loss paper", Box::new(|| loss_call(1, r#"{}"#, true))),
        (
            "loss token-aligned",
            Box::new(|| loss_call(2, r#"{"delta_mode":"token_aligned","lambda":0.4}"#, true)),
        ),
        (
            "loss ref baseline",
            Box::new(|| loss_call(3, r#"{"baseline":"ref_policy","kl_coef":0.05}"#, true)),
        ),
        (
            "loss missing entropy (bad)",
            Box::new(|| loss_call(4, r#"{"entropy_coef":0.01}"#, false)),
        ),
        (
            "loss bad config",
            Box::new(|| config_call(r#"{"lambda":0.2,"no_such_key":1}"#)),
        ),
        (
            "config bad value",
            Box::new(|| config_call(r#"{"clip_low":"wide"}"#)),
        ),
        ("forward small", Box::new(|| forward_call(5, 7, 33, 1.0))),
        // 64 × 4096 logits: the CPU backend splits these rows over its own threads too.
        ("forward large", Box::new(|| forward_call(6, 64, 4096, 0.7))),
        (
            "forward bad temperature",
            Box::new(|| forward_call(7, 3, 10, -1.0)),
        ),
        ("advantages", Box::new(|| advantages_call(3))),
        ("advantages bad ids", Box::new(|| advantages_call(2))),
    ]
}

#[test]
fn sixteen_threads_get_single_threaded_results_and_their_own_errors() {
    let calls = calls();
    let reference: Vec<Outcome> = calls.iter().map(|(_, f)| f()).collect();
    // The mix really has both kinds, with messages naming what was wrong.
    assert!(reference.iter().filter(|r| r.0 == 0).count() >= 5);
    assert!(reference.iter().filter(|r| r.0 != 0).count() >= 4);
    for ((name, _), r) in calls.iter().zip(&reference) {
        assert_eq!(
            r.0 == 0,
            r.2.is_empty(),
            "{name}: status {} message {:?}",
            r.0,
            r.2
        );
    }
    const THREADS: usize = 16;
    const ROUNDS: usize = 6;
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (calls, reference, barrier) = (&calls, &reference, &barrier);
            s.spawn(move || {
                barrier.wait();
                for round in 0..ROUNDS {
                    // Every thread runs the calls in its own order, so good and bad calls of
                    // different threads interleave.
                    for j in 0..calls.len() {
                        let k = (j + 3 * t + round) % calls.len();
                        let i = if t % 2 == 0 { k } else { calls.len() - 1 - k };
                        let (name, f) = &calls[i];
                        let got = f();
                        assert_eq!(got.0, reference[i].0, "thread {t} {name}: status");
                        assert!(got.1 == reference[i].1, "thread {t} {name}: outputs differ");
                        assert_eq!(got.2, reference[i].2, "thread {t} {name}: last error");
                    }
                }
            });
        }
    });
}
