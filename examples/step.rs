//! One full CalibRL step on a synthetic batch through the C ABI, on the CPU backend:
//! logits → (fused) log-probs + entropy → group advantages → loss + gradients → d-logits.
//!
//! cargo run --release --example step

use calibrl::desc::metrics::{CalibrlMetrics, CalibrlNormalizers};
use calibrl::ffi::common::{calibrl_config_free, calibrl_config_new, calibrl_last_error_message};
use calibrl::ffi::logits::{calibrl_logits_backward, calibrl_logits_forward};
use calibrl::ffi::loss::{
    calibrl_group_advantages, calibrl_loss, CalibrlAdvantageArgs, CalibrlLossArgs,
};
use calibrl::tensor::HostTensor;
use calibrl::CalibrlStatus;
use std::ptr::{null, null_mut};

/// A small deterministic generator (splitmix64) so the example needs no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn check(status: CalibrlStatus) {
    if status != CalibrlStatus::Ok {
        let msg = unsafe { std::ffi::CStr::from_ptr(calibrl_last_error_message()) };
        panic!("calibrl: {status:?}: {}", msg.to_string_lossy());
    }
}

fn main() {
    let (prompts, group, vocab) = (4usize, 8usize, 512usize);
    let mut rng = Rng(7);

    // Rollouts (packed) and one expert response per prompt (packed after them in the same
    // logits buffer: the no-grad pass computes both; only rollouts are trained).
    let rollout_lens: Vec<usize> = (0..prompts * group)
        .map(|_| 4 + (rng.next() % 29) as usize)
        .collect();
    let expert_lens: Vec<usize> = (0..prompts)
        .map(|_| 8 + (rng.next() % 17) as usize)
        .collect();
    let (t_roll, t_exp) = (
        rollout_lens.iter().sum::<usize>(),
        expert_lens.iter().sum::<usize>(),
    );
    let rows = t_roll + t_exp;
    let mut logits: Vec<f32> = (0..rows * vocab)
        .map(|_| (rng.uniform() * 6.0 - 3.0) as f32)
        .collect();
    let mut labels: Vec<i64> = (0..rows)
        .map(|_| (rng.next() % vocab as u64) as i64)
        .collect();

    // 1. Fused logits forward: log-probs, entropy, log-sum-exp of every token.
    let (mut lp, mut ent, mut lse) = (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
    let t_logits = HostTensor::f32(&mut logits, &[rows, vocab]);
    let t_labels = HostTensor::i64(&mut labels, &[rows]);
    let mut t_lp = HostTensor::f32(&mut lp, &[rows]);
    let mut t_ent = HostTensor::f32(&mut ent, &[rows]);
    let mut t_lse = HostTensor::f32(&mut lse, &[rows]);
    unsafe {
        check(calibrl_logits_forward(
            t_logits.as_ptr(),
            t_labels.as_ptr(),
            1.0,
            t_lp.as_mut_ptr(),
            t_ent.as_mut_ptr(),
            t_lse.as_mut_ptr(),
            null_mut(),
        ));
    }

    // 2. Rewards (binary, rare successes) → group advantages, rarity weights, signs.
    let mut rewards: Vec<f64> = (0..prompts * group)
        .map(|_| (rng.uniform() < 0.3) as u8 as f64)
        .collect();
    let mut group_ids: Vec<i64> = (0..prompts * group).map(|i| (i / group) as i64).collect();
    let b = prompts * group;
    let (mut adv, mut w, mut sgn) = (vec![0f64; b], vec![0f64; b], vec![0f64; b]);
    let mut cfg = null_mut();
    unsafe {
        check(calibrl_config_new(
            c"{\"preset\": \"paper\"}".as_ptr(),
            &mut cfg,
        ))
    };
    let (t_r, t_g) = (
        HostTensor::f64(&mut rewards, &[b]),
        HostTensor::i64(&mut group_ids, &[b]),
    );
    let (mut t_a, mut t_w, mut t_s) = (
        HostTensor::f64(&mut adv, &[b]),
        HostTensor::f64(&mut w, &[b]),
        HostTensor::f64(&mut sgn, &[b]),
    );
    let adv_args = CalibrlAdvantageArgs {
        rewards: t_r.as_ptr(),
        group_ids: t_g.as_ptr(),
        num_groups: prompts as i64,
        correct: null(),
        is_expert: null(),
        advantages: t_a.as_mut_ptr(),
        weights: t_w.as_mut_ptr(),
        signs: t_s.as_mut_ptr(),
    };
    unsafe { check(calibrl_group_advantages(cfg, &adv_args, null_mut())) };

    // 3. The loss on the rollouts' log-probs, against the experts' log-probs.
    let mut offsets: Vec<i64> = std::iter::once(0)
        .chain(rollout_lens.iter().scan(0, |acc, &l| {
            *acc += l as i64;
            Some(*acc)
        }))
        .collect();
    let mut expert_offsets: Vec<i64> = std::iter::once(0)
        .chain(expert_lens.iter().scan(0, |acc, &l| {
            *acc += l as i64;
            Some(*acc)
        }))
        .collect();
    let mut expert_index: Vec<i64> = group_ids.clone();
    let (roll_lp, exp_lp) = lp.split_at_mut(t_roll);
    // Off-policy by a little, as after a few optimiser steps.
    let mut old: Vec<f32> = roll_lp
        .iter()
        .map(|&l| l + 0.05 * (rng.uniform() as f32 - 0.5))
        .collect();
    let mut grad = vec![0f32; t_roll];
    let t_roll_lp = HostTensor::f32(roll_lp, &[t_roll]);
    let t_exp_lp = HostTensor::f32(exp_lp, &[t_exp]);
    let t_off = HostTensor::i64(&mut offsets, &[b + 1]);
    let t_eoff = HostTensor::i64(&mut expert_offsets, &[prompts + 1]);
    let t_eidx = HostTensor::i64(&mut expert_index, &[b]);
    let t_old = HostTensor::f32(&mut old, &[t_roll]);
    let mut t_grad = HostTensor::f32(&mut grad, &[t_roll]);
    let normalizers = CalibrlNormalizers::new(t_roll as f64, b as f64);
    let loss_args = CalibrlLossArgs {
        logprobs: t_roll_lp.as_ptr(),
        seq_offsets: t_off.as_ptr(),
        mask: null(),
        old_logprobs: t_old.as_ptr(),
        ref_logprobs: null(),
        entropy: null(),
        advantages: t_a.as_ptr(),
        weights: t_w.as_ptr(),
        signs: t_s.as_ptr(),
        is_expert: null(),
        expert_logprobs: t_exp_lp.as_ptr(),
        expert_offsets: t_eoff.as_ptr(),
        expert_mask: null(),
        expert_index: t_eidx.as_ptr(),
        normalizers: &normalizers,
        grad_logprobs: t_grad.as_mut_ptr(),
        grad_entropy: null_mut(),
        metrics: null_mut(),
        token_weights: null(),
    };
    let mut metrics = CalibrlMetrics::default();
    unsafe { check(calibrl_loss(cfg, &loss_args, &mut metrics, null_mut())) };

    // 4. Fused backward over the rollout rows: d-logits written in place over the logits.
    let mut grad_full = grad.clone();
    grad_full.resize(rows, 0.0); // expert rows get no gradient
    let t_gfull = HostTensor::f32(&mut grad_full, &[rows]);
    let mut t_dlogits = HostTensor::f32(&mut logits, &[rows, vocab]);
    unsafe {
        check(calibrl_logits_backward(
            t_logits.as_ptr(),
            t_labels.as_ptr(),
            1.0,
            0,
            t_lse.as_ptr(),
            null(),
            t_gfull.as_ptr(),
            null(),
            t_dlogits.as_mut_ptr(),
            null_mut(),
        ));
        calibrl_config_free(cfg);
    }
    let dlogit_norm = logits[..t_roll * vocab]
        .iter()
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();

    println!(
        "calibrl {} — one CalibRL step (paper preset, CPU backend)",
        env!("CARGO_PKG_VERSION")
    );
    println!("batch: {prompts} prompts × G={group} rollouts ({t_roll} tokens) + {prompts} experts ({t_exp} tokens), V={vocab}");
    let m = metrics;
    for (name, v) in [
        ("loss", m.loss),
        ("pg_loss", m.pg_loss),
        ("explore_loss", m.explore_loss),
        ("clipfrac", m.clipfrac),
        ("ppo_kl", m.ppo_kl),
        ("mean_delta", m.mean_delta),
        ("mean_expert_logprob", m.mean_expert_logprob),
        ("mean_response_length", m.mean_response_length),
        ("frac_correct", m.frac_correct),
        ("mean_rarity_weight", m.mean_rarity_weight),
        (
            "mean_entropy",
            ent[..t_roll].iter().map(|&h| h as f64).sum::<f64>() / t_roll as f64,
        ),
        ("|dL/dlogits|", dlogit_norm),
    ] {
        println!("  {name:<22} {v:>12.6}");
    }
}
