//! calibrl_logits_shard_stats and calibrl_logits_shard_finish (the vocabulary-parallel forward).
#![no_main]

use calibrl::ffi::logits::{calibrl_logits_shard_finish, calibrl_logits_shard_stats};
use calibrl_fuzz::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let n = b.below(6);
    let shards = 1 + b.below(4);
    let v_local = 1 + b.below(24);
    let labels: Vec<f64> = (0..n)
        .map(|_| match b.u8() % 8 {
            0 => -1.0,
            1 => b.count(shards * v_local) as f64,
            _ => b.below(shards * v_local) as f64,
        })
        .collect();
    let Some(label_t) = FTensor::build(&mut b, &Want::input(&[I64, I32], &[n]).with(&labels), true)
    else {
        return;
    };
    let t = if b.rare(6) { b.float() } else { 1.0 };
    // Phase 1 on every shard into one [R, N, 4] gathered tensor (or fuzzed statistics).
    let mut gathered = Vec::with_capacity(shards * n * 4);
    for r in 0..shards {
        let Some(logits) = FTensor::build(
            &mut b,
            &Want::input(&[F32, BF16, F16], &[n, v_local]),
            false,
        ) else {
            return;
        };
        let Some(mut stats) = FTensor::build(&mut b, &Want::output(&[F32], &[n, 4]), true) else {
            return;
        };
        let vocab_start = if b.rare(10) {
            b.count(64)
        } else {
            (r * v_local) as i64
        };
        let stats_ptr = stats.mptr();
        let tensors = [Some(&logits), Some(&label_t), Some(&stats)];
        let before = snapshot(&tensors);
        let st = unsafe {
            calibrl_logits_shard_stats(
                logits.ptr(),
                label_t.ptr(),
                t,
                vocab_start,
                stats_ptr,
                std::ptr::null_mut(),
            )
        } as i32;
        check("shard_stats", st, &tensors, &before, None);
        let vals = stats.values();
        if st == OK && vals.len() == n * 4 {
            gathered.extend(vals);
        } else {
            gathered.extend((0..n * 4).map(|_| b.float()));
        }
    }
    if b.rare(8) {
        for x in gathered.iter_mut() {
            if b.rare(6) {
                *x = b.float();
            }
        }
    }
    let Some(stats) = FTensor::build(
        &mut b,
        &Want::input(&[F32], &[shards, n, 4]).with(&gathered),
        true,
    ) else {
        return;
    };
    let Some((mut lp, mut ent, mut lse)) = row_outputs(&mut b, n) else {
        return;
    };
    let tensors = [
        Some(&stats),
        Some(&label_t),
        Some(&lp),
        ent.as_ref(),
        Some(&lse),
    ];
    let before = snapshot(&tensors);
    let st = unsafe {
        calibrl_logits_shard_finish(
            stats.ptr(),
            label_t.ptr(),
            lp.mptr(),
            mptr_of(&mut ent),
            lse.mptr(),
            std::ptr::null_mut(),
        )
    } as i32;
    let tensors = [
        Some(&stats),
        Some(&label_t),
        Some(&lp),
        ent.as_ref(),
        Some(&lse),
    ];
    check("shard_finish", st, &tensors, &before, None);
});
