//! calibrl_loss: packed and padded rows (up to 64 rows of up to 300 tokens), every optional
//! input, expert baselines, normalisers, outputs aliasing another tensor, and the
//! masked-position invariant (padding of every token input may hold anything, NaN included).
#![no_main]

use calibrl::desc::metrics::{CalibrlMetrics, CalibrlNormalizers, METRICS_LEN};
use calibrl::ffi::loss::{calibrl_loss, CalibrlLossArgs};
use calibrl_fuzz::*;
use libfuzzer_sys::fuzz_target;

const MASKS: [(u8, u8); 5] = [U8, BOOL, F32, I32, I64];

/// Token rows: (shape of the token tensor, offsets for the packed layout).
fn rows(b: &mut Bytes, count: usize) -> (Vec<usize>, Option<Vec<f64>>) {
    let long = b.rare(4);
    let lens: Vec<usize> = (0..count)
        .map(|_| if long { b.below(300) } else { b.below(6) })
        .collect();
    if b.rare(2) {
        let mut off = vec![0.0];
        for &l in &lens {
            off.push(off.last().unwrap() + l as f64);
        }
        if b.rare(10) {
            let k = b.below(off.len());
            off[k] = b.count(8) as f64;
        }
        let total = lens.iter().sum();
        (vec![total], Some(off))
    } else {
        let s = lens.iter().copied().max().unwrap_or(0) + b.below(2);
        (vec![count, s], None)
    }
}

struct Call {
    tensors: Vec<Option<FTensor>>,
    normalizers: Option<CalibrlNormalizers>,
    metrics_ptr_null: bool,
}

// Indices of `Call::tensors`, in `CalibrlLossArgs` order.
const LOGPROBS: usize = 0;
const MASK: usize = 2;
const EXPERT_LOGPROBS: usize = 10;
const EXPERT_MASK: usize = 12;
const OUTPUTS: [usize; 3] = [14, 15, 16];
/// Token-shaped inputs (old, ref, entropy, token weights) besides the log-probs.
const TOKEN_INPUTS: [usize; 4] = [3, 4, 5, 17];

fn build(b: &mut Bytes) -> Option<Call> {
    let nrows = if b.rare(4) { b.below(64) } else { b.below(6) };
    let (shape, offsets) = rows(b, nrows);
    let numel: usize = shape.iter().product();
    let mask_vals: Vec<f64> = (0..numel).map(|_| (b.u8() % 3 != 0) as u8 as f64).collect();
    let signs: Vec<f64> = (0..nrows)
        .map(|_| {
            if b.rare(12) {
                b.float()
            } else {
                [1.0, -1.0][b.below(2)]
            }
        })
        .collect();
    let flags: Vec<f64> = (0..nrows).map(|_| b.rare(4) as u8 as f64).collect();
    let slots = b.below(4);
    let (eshape, eoffsets) = rows(b, slots);
    let enumel: usize = eshape.iter().product();
    let emask_vals: Vec<f64> = (0..enumel)
        .map(|_| (b.u8() % 3 != 0) as u8 as f64)
        .collect();
    let eindex: Vec<f64> = (0..nrows)
        .map(|_| {
            if b.rare(16) {
                b.count(4) as f64
            } else {
                b.below(slots + 1) as f64 - 1.0
            }
        })
        .collect();
    let mut t: Vec<Option<FTensor>> = Vec::new();
    let tok = |b: &mut Bytes, out: bool| {
        let w = if out {
            Want::output(&FLOATS, &shape)
        } else {
            Want::input(&FLOATS, &shape)
        };
        if b.rare(3) {
            Some(None)
        } else {
            FTensor::build(b, &w, true).map(Some)
        }
    };
    // logprobs (required; the first tensor is always host memory)
    t.push(Some(FTensor::build(
        b,
        &Want::input(&FLOATS, &shape),
        false,
    )?));
    // seq_offsets
    t.push(match &offsets {
        Some(o) => Some(FTensor::build(
            b,
            &Want::input(&[I64, I32], &[o.len()]).with(o),
            true,
        )?),
        None if b.rare(16) => Some(FTensor::build(b, &Want::input(&[I64], &[nrows + 1]), true)?),
        None => None,
    });
    // mask
    t.push(optional(
        b,
        &Want::input(&MASKS, &shape).with(&mask_vals),
        true,
    )?);
    // old_logprobs, ref_logprobs, entropy
    for _ in 0..3 {
        t.push(tok(b, false)?);
    }
    // advantages, weights, signs
    t.push(Some(FTensor::build(
        b,
        &Want::input(&FLOATS, &[nrows]),
        true,
    )?));
    t.push(Some(FTensor::build(
        b,
        &Want::input(&FLOATS, &[nrows]),
        true,
    )?));
    t.push(Some(FTensor::build(
        b,
        &Want::input(&FLOATS, &[nrows]).with(&signs),
        true,
    )?));
    // is_expert
    t.push(optional(
        b,
        &Want::input(&[BOOL, U8, I32], &[nrows]).with(&flags),
        true,
    )?);
    // expert_logprobs, expert_offsets, expert_mask, expert_index
    if b.rare(3) {
        t.extend((0..4).map(|_| None));
    } else {
        t.push(Some(FTensor::build(
            b,
            &Want::input(&FLOATS, &eshape),
            true,
        )?));
        t.push(match &eoffsets {
            Some(o) => Some(FTensor::build(
                b,
                &Want::input(&[I64, I32], &[o.len()]).with(o),
                true,
            )?),
            None => None,
        });
        t.push(optional(
            b,
            &Want::input(&MASKS, &eshape).with(&emask_vals),
            true,
        )?);
        t.push(Some(FTensor::build(
            b,
            &Want::input(&[I64, I32], &[nrows]).with(&eindex),
            true,
        )?));
    }
    let normalizers = b.rare(3).then(|| CalibrlNormalizers {
        token_count: if b.rare(4) {
            b.float()
        } else {
            b.below(40) as f64
        },
        seq_count: if b.rare(4) {
            b.float()
        } else {
            b.below(8) as f64
        },
        // 0 (the same as the rollout-row counts) or a count that may include expert rows.
        all_token_count: if b.rare(2) { 0.0 } else { b.below(60) as f64 },
        all_seq_count: if b.rare(2) { 0.0 } else { b.below(12) as f64 },
    });
    // grad_logprobs, grad_entropy (shape of logprobs), metrics [METRICS_LEN], then token_weights
    t.push(tok(b, true)?);
    t.push(tok(b, true)?);
    t.push(optional(b, &Want::output(&FLOATS, &[METRICS_LEN]), true)?);
    t.push(tok(b, false)?);
    if b.rare(6) {
        // An output passed over another tensor's memory (an input, or another output): the
        // library must refuse it, whatever the shapes.
        let out = OUTPUTS[b.below(OUTPUTS.len())];
        let owner = b.below(t.len());
        if owner != out {
            if let Some(o) = &t[owner] {
                let alias = FTensor::alias_of(o, true);
                t[out] = Some(alias);
            }
        }
    }
    Some(Call {
        tensors: t,
        normalizers,
        metrics_ptr_null: b.rare(4),
    })
}

/// Calls the loss; returns the status and the host metrics.
fn call(cfg: &Config, c: &mut Call, what: &str) -> (i32, CalibrlMetrics) {
    let p = |c: &Call, i: usize| ptr_of(&c.tensors[i]);
    let mp = |c: &mut Call, i: usize| mptr_of(&mut c.tensors[i]);
    let args = CalibrlLossArgs {
        logprobs: p(c, 0),
        seq_offsets: p(c, 1),
        mask: p(c, 2),
        old_logprobs: p(c, 3),
        ref_logprobs: p(c, 4),
        entropy: p(c, 5),
        advantages: p(c, 6),
        weights: p(c, 7),
        signs: p(c, 8),
        is_expert: p(c, 9),
        expert_logprobs: p(c, 10),
        expert_offsets: p(c, 11),
        expert_mask: p(c, 12),
        expert_index: p(c, 13),
        normalizers: c
            .normalizers
            .as_ref()
            .map_or(std::ptr::null(), |n| n as *const _),
        grad_logprobs: mp(c, 14),
        grad_entropy: mp(c, 15),
        metrics: mp(c, 16),
        token_weights: p(c, 17),
    };
    let sentinel = CalibrlMetrics {
        loss: 777.0,
        ..Default::default()
    };
    let mut host = sentinel;
    let host_ptr = if c.metrics_ptr_null {
        std::ptr::null_mut()
    } else {
        &mut host as *mut _
    };
    let tensors: Vec<Option<&FTensor>> = c.tensors.iter().map(|t| t.as_ref()).collect();
    if std::env::var_os("CALIBRL_FUZZ_DEBUG").is_some() {
        for (i, t) in tensors.iter().enumerate() {
            eprintln!(
                "  before {what}: tensor {i}: {}",
                t.map_or("NULL".into(), |t| t.describe())
            );
        }
    }
    let before = snapshot(&tensors);
    let st = unsafe { calibrl_loss(cfg.0, &args, host_ptr, std::ptr::null_mut()) } as i32;
    check(what, st, &tensors, &before, None);
    if st == OK {
        for (k, v) in host.to_array().iter().enumerate() {
            assert!(
                c.metrics_ptr_null || v.is_finite(),
                "{what}: metric {k} is {v}"
            );
        }
    } else {
        assert!(host == sentinel, "{what}: host metrics written on error");
    }
    (st, host)
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let json = config_json(&mut b);
    let (_, Some(cfg)) = Config::new(&json) else {
        return;
    };
    let Some(mut c) = build(&mut b) else { return };
    let (st, host) = call(&cfg, &mut c, "loss");
    if st != OK {
        return;
    }
    // Masked positions must not matter: NaN or ±inf there gives the very same result, in every
    // token input.
    let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][b.below(3)];
    let mut changed = false;
    let pairs = std::iter::once((LOGPROBS, MASK))
        .chain(TOKEN_INPUTS.iter().map(|&i| (i, MASK)))
        .chain([(EXPERT_LOGPROBS, EXPERT_MASK)]);
    for (values, mask) in pairs {
        let Some(m) = c.tensors[mask].as_ref().map(|m| m.values()) else {
            continue;
        };
        let Some(v) = c.tensors[values].as_mut() else {
            continue;
        };
        for (k, &mv) in m.iter().enumerate() {
            if mv == 0.0 && k < v.numel() {
                v.set(k, bad);
                changed = true;
            }
        }
    }
    if !changed {
        return;
    }
    let outputs: Vec<Vec<f64>> = OUTPUTS
        .iter()
        .map(|&i| c.tensors[i].as_ref().map_or(vec![], |t| t.values()))
        .collect();
    let (st2, host2) = call(&cfg, &mut c, "loss with NaN padding");
    assert_eq!(st2, OK, "{bad} at masked positions: {}", last_error());
    if !c.metrics_ptr_null {
        assert!(
            host2 == host,
            "masked positions changed the metrics: {host:?} vs {host2:?}"
        );
    }
    for (j, &i) in OUTPUTS.iter().enumerate() {
        let now = c.tensors[i].as_ref().map_or(vec![], |t| t.values());
        assert!(now == outputs[j], "masked positions changed output {i}");
    }
});
