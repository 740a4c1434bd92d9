//! The `authors` preset (SPEC §4.7) against a transcription, written here in f64, of the
//! authors' released arithmetic (CalibRL repository, `src/core_algos.py`
//! `compute_mix_policy_loss` with `mix_policy_loss = "expert-guided"`, and the actor's loss
//! assembly in `src/dp_actor.py`), on their padded layout: rollouts and expert ("pref") rows in
//! one `[R, S]` batch, expert rows flagged. Transcribed step by step:
//!
//! - `ppo_kl`, `pg_clipfrac`, `pg_clipfrac_lower`: masked means over every row;
//! - `pg_losses = where(A < 0, min(−A·c, max(pg1, pg2)), max(pg1, pg2))` at any c (no switch);
//! - `pg_losses[~pref_mask]`, `guided_losses[~pref_mask]` with `response_mask[~pref_mask]`: the
//!   policy-gradient and the guided (exploration) terms aggregated over the rollout rows only;
//! - `guided = |A| · leaky_relu(−(2·pass − 1)·(ℓ − pref_log_prob), 0.5)`, `pref_log_prob` the
//!   group's expert row at the start of the step (0 past its length, 0 without a selected
//!   expert), weighted 0.1 in the loss;
//! - entropy and KL: `agg_loss(·, response_mask)` over every row;
//! - `agg_loss`: token-mean `Σ m·v / Σ m`; seq-mean-token-sum `mean_rows Σ_t m·v`;
//!   seq-mean-token-mean `mean_rows (Σ_t m·v / Σ_t m)`; seq-mean-token-sum-norm
//!   `Σ m·v / S` (S the padded length).
//!
//! Not transcribed: their masked mean's ε, if their verl adds one to the denominator; rows with
//! no token (their seq-mean divides by the row count including them, or by 0; the library
//! counts non-empty rows only, SPEC §4.5): every row here has at least one token. Gradients:
//! central differences of the transcription.

mod common;

use calibrl::desc::metrics::CalibrlNormalizers;
use common::reference::{RefBatch, RefExpert, METRIC_NAMES};
use common::*;
use std::f64::consts::FRAC_1_SQRT_2;

/// One random batch in their layout.
struct Theirs {
    s: usize,
    /// Per row: group, expert ("pref") row or rollout, advantage (broadcast over the row as in
    /// their `advantages`), `pass_sample_mask` (correct).
    group: Vec<usize>,
    pref: Vec<bool>,
    adv: Vec<f64>,
    pass: Vec<bool>,
    /// The row holding each group's selected expert, if any.
    expert_row_of_group: Vec<Option<usize>>,
    mask: Vec<f64>,
    logp: Vec<f64>,
    old: Vec<f64>,
    refl: Vec<f64>,
    ent: Vec<f64>,
}

fn random_batch(seed: u64) -> Theirs {
    let mut rng = Rng::new(seed);
    let s = rng.int(3, 9);
    let groups = rng.int(2, 5);
    // (group, is expert) in a shuffled order: the expert rows anywhere in the batch.
    let mut rows: Vec<(usize, bool)> = vec![];
    let mut with_expert = vec![false; groups];
    for (g, e) in with_expert.iter_mut().enumerate() {
        for _ in 0..rng.int(2, 5) {
            rows.push((g, false));
        }
        // Most groups have their expert selected; at least one group has none.
        *e = g > 0 && rng.bool(0.75);
        if *e {
            rows.push((g, true));
        }
    }
    for i in (1..rows.len()).rev() {
        let j = rng.int(0, i + 1);
        rows.swap(i, j);
    }
    let r = rows.len();
    let mut expert_row_of_group = vec![None; groups];
    for (i, &(g, e)) in rows.iter().enumerate() {
        if e {
            expert_row_of_group[g] = Some(i);
        }
    }
    let mut mask = vec![0.0; r * s];
    for i in 0..r {
        let len = rng.int(1, s + 1);
        for t in 0..len {
            mask[i * s + t] = 1.0;
        }
        // Some holes inside the response (a multi-turn loss mask).
        if len > 2 && rng.bool(0.3) {
            mask[i * s + 1] = 0.0;
        }
    }
    let logp: Vec<f64> = (0..r * s).map(|_| rng.range(-2.5, -0.05)).collect();
    // Log-ratios up to ±1.2: ratios past both clip bounds and past c = 3 (for A < 0).
    let old: Vec<f64> = logp.iter().map(|l| l - rng.range(-1.2, 1.2)).collect();
    let refl: Vec<f64> = logp.iter().map(|l| l + 0.3 * rng.normal()).collect();
    let ent: Vec<f64> = (0..r * s).map(|_| rng.range(0.0, 2.0)).collect();
    let adv: Vec<f64> = (0..r).map(|_| rng.range(-1.5, 1.5)).collect();
    let pass: Vec<bool> = (0..r).map(|_| rng.bool(0.5)).collect();
    Theirs {
        s,
        group: rows.iter().map(|r| r.0).collect(),
        pref: rows.iter().map(|r| r.1).collect(),
        adv,
        pass,
        expert_row_of_group,
        mask,
        logp,
        old,
        refl,
        ent,
    }
}

/// What their trainer is configured with (the library's config says the same in JSON).
#[derive(Clone, Copy)]
struct Knobs {
    agg: &'static str,
    c: f64,
    entropy_coeff: f64,
    kl_coef: f64,
    kl_type: &'static str,
}

impl Knobs {
    fn json(&self, s: usize) -> String {
        let kl = match self.kl_type {
            "mse" => "k2",
            "low_var_kl" => "k3",
            "abs" => "abs",
            _ => "k1",
        };
        format!(
            r#"{{"preset":"authors","agg":"{}","dual_clip":{},"entropy_coef":{},"kl_coef":{},"kl_kind":"{kl}","t_norm":{s}}}"#,
            self.agg, self.c, self.entropy_coeff, self.kl_coef
        )
    }
}

/// Their outputs: loss, pg_loss, guided_loss, entropy_loss, kl_loss, clipfrac,
/// clipfrac_lower, ppo_kl.
type Out = [f64; 8];

/// `agg_loss(loss_mat, loss_mask, mode)` over the rows `rows` of an `[R, S]` matrix.
fn agg_loss(v: &[f64], m: &[f64], rows: &[usize], s: usize, mode: &str) -> f64 {
    let row_sum = |i: usize| (0..s).map(|t| v[i * s + t] * m[i * s + t]).sum::<f64>();
    let row_n = |i: usize| (0..s).map(|t| m[i * s + t]).sum::<f64>();
    let n_rows = rows.len() as f64;
    match mode {
        "token-mean" => {
            rows.iter().map(|&i| row_sum(i)).sum::<f64>()
                / rows.iter().map(|&i| row_n(i)).sum::<f64>()
        }
        "seq-mean-token-sum" => rows.iter().map(|&i| row_sum(i)).sum::<f64>() / n_rows,
        "seq-mean-token-mean" => rows.iter().map(|&i| row_sum(i) / row_n(i)).sum::<f64>() / n_rows,
        "seq-mean-token-sum-norm" => rows.iter().map(|&i| row_sum(i)).sum::<f64>() / s as f64,
        other => panic!("their agg_loss has no mode {other}"),
    }
}

/// verl's `kl_penalty(logprob, ref_logprob, type)`.
fn kl_penalty(kind: &str, l: f64, r: f64) -> f64 {
    let d = l - r;
    match kind {
        "kl" => d,
        "abs" => d.abs(),
        "mse" => 0.5 * d * d,
        "low_var_kl" => {
            let k = r - l;
            (k.exp() - k - 1.0).clamp(-10.0, 10.0)
        }
        other => panic!("kl type {other}"),
    }
}

/// Their arithmetic on the log-probs `logp` (the only input the gradient flows through).
fn transcription(b: &Theirs, k: Knobs, logp: &[f64]) -> Out {
    let (r, s) = (b.group.len(), b.s);
    let m = &b.mask;
    let all: Vec<usize> = (0..r).collect();
    let (low, high) = (0.2, 0.2);
    let mut neg_kl = vec![0.0; r * s];
    let mut pg = vec![0.0; r * s];
    let mut gt = vec![0.0; r * s];
    let mut lower = vec![0.0; r * s];
    let mut guided = vec![0.0; r * s];
    let mut kld = vec![0.0; r * s];
    for i in 0..r {
        let a = b.adv[i];
        for t in 0..s {
            let j = i * s + t;
            let nk = logp[j] - b.old[j];
            neg_kl[j] = -nk;
            let ratio = nk.exp();
            let pg1 = -a * ratio;
            let pg2 = -a * ratio.clamp(1.0 - low, 1.0 + high);
            let clip1 = pg1.max(pg2);
            gt[j] = (pg2 > pg1) as u8 as f64;
            let pg3 = -a * k.c;
            let clip2 = pg3.min(clip1);
            lower[j] = ((clip1 > pg3) && a < 0.0) as u8 as f64;
            pg[j] = if a < 0.0 { clip2 } else { clip1 };
            // pref_log_prob: the group's expert row at the start of the step, 0 past its
            // response (masked) and 0 for a group without a selected expert.
            let pref = match b.expert_row_of_group[b.group[i]] {
                Some(e) => b.mask[e * s + t] * b.old[e * s + t],
                None => 0.0,
            };
            let sign = if b.pass[i] { 1.0 } else { -1.0 };
            let x = -sign * (logp[j] - pref);
            guided[j] = a.abs() * if x > 0.0 { x } else { 0.5 * x };
            kld[j] = kl_penalty(k.kl_type, logp[j], b.refl[j]);
        }
    }
    let masked_mean =
        |v: &[f64]| v.iter().zip(m).map(|(x, y)| x * y).sum::<f64>() / m.iter().sum::<f64>();
    let ppo_kl = masked_mean(&neg_kl);
    let clipfrac = masked_mean(&gt);
    let clipfrac_lower = masked_mean(&lower);
    let rollouts: Vec<usize> = (0..r).filter(|&i| !b.pref[i]).collect();
    let pg_loss = agg_loss(&pg, m, &rollouts, s, k.agg);
    let guided_loss = agg_loss(&guided, m, &rollouts, s, k.agg);
    let entropy_loss = agg_loss(&b.ent, m, &all, s, k.agg);
    let kl_loss = agg_loss(&kld, m, &all, s, k.agg);
    let loss = pg_loss - entropy_loss * k.entropy_coeff + 0.1 * guided_loss + kl_loss * k.kl_coef;
    [
        loss,
        pg_loss,
        guided_loss,
        entropy_loss,
        kl_loss,
        clipfrac,
        clipfrac_lower,
        ppo_kl,
    ]
}

/// The same batch as the library takes it, for rows `rows` of the batch (a micro-batch): the
/// expert baseline is each selected expert row's start-of-step log-probs, one expert slot per
/// group that has one.
fn library_case(b: &Theirs, rows: &[usize], norm: Option<CalibrlNormalizers>) -> (Case, CallOpts) {
    let s = b.s;
    let pick = |v: &[f64]| -> Vec<f64> {
        rows.iter()
            .flat_map(|&i| v[i * s..(i + 1) * s].iter().copied())
            .collect()
    };
    let groups = b.expert_row_of_group.len();
    let mut slot_of_group = vec![-1i64; groups];
    let (mut elogp, mut emask) = (vec![], vec![]);
    for g in 0..groups {
        if let Some(e) = b.expert_row_of_group[g] {
            slot_of_group[g] = (elogp.len() / s) as i64;
            elogp.extend_from_slice(&b.old[e * s..(e + 1) * s]);
            emask.extend_from_slice(&b.mask[e * s..(e + 1) * s]);
        }
    }
    let slots = elogp.len() / s;
    let rb = RefBatch {
        rows: (0..rows.len()).map(|i| i * s..(i + 1) * s).collect(),
        logp: pick(&b.logp),
        mask: pick(&b.mask),
        old: Some(pick(&b.old)),
        refl: Some(pick(&b.refl)),
        ent: Some(pick(&b.ent)),
        adv: rows.iter().map(|&i| b.adv[i]).collect(),
        w: rows.iter().map(|&i| b.adv[i].abs()).collect(),
        c: rows
            .iter()
            .map(|&i| if b.pass[i] { 1.0 } else { -1.0 })
            .collect(),
        is_expert: rows.iter().map(|&i| b.pref[i]).collect(),
        expert: (slots > 0).then(|| RefExpert {
            rows: (0..slots).map(|j| j * s..(j + 1) * s).collect(),
            logp: elogp,
            mask: emask,
            index: rows.iter().map(|&i| slot_of_group[b.group[i]]).collect(),
        }),
        norm: norm.map(|n| (n.token_count, n.seq_count)),
        sg_logp: None,
        tw: None,
    };
    let case = Case {
        b: rb,
        layout: Layout::Padded,
        seq_len: s,
        offsets: vec![],
        expert_layout: Layout::Padded,
        expert_seq_len: s,
        expert_offsets: vec![],
        mask_given: true,
        expert_mask_given: true,
        is_expert_given: true,
    };
    let opts = CallOpts {
        norm_all: norm.map(|n| (n.all_token_count, n.all_seq_count)),
        ..CallOpts::default()
    };
    (case, opts)
}

const AGGS: [&str; 4] = [
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
];

#[test]
fn authors_preset_equals_their_arithmetic_on_random_batches() {
    let mut cases = 0;
    for seed in 0..12u64 {
        let b = random_batch(seed);
        let all: Vec<usize> = (0..b.group.len()).collect();
        for agg in AGGS {
            for c in [0.5, 1.0, 3.0] {
                let k = Knobs {
                    agg,
                    c,
                    entropy_coeff: 0.01,
                    kl_coef: 0.05,
                    kl_type: if seed % 2 == 0 { "low_var_kl" } else { "mse" },
                };
                let what = format!("seed {seed} agg {agg} c {c}");
                let (case, opts) = library_case(&b, &all, None);
                let got = lib_loss(&k.json(b.s), &case, &opts).unwrap();
                let want = transcription(&b, k, &b.logp);
                // The first eight metrics: loss, pg_loss, explore_loss, entropy_loss, kl_loss,
                // clipfrac, clipfrac_lower, ppo_kl.
                for (j, name) in METRIC_NAMES[..8].iter().enumerate() {
                    assert_close(
                        &format!("{what}: {name}"),
                        got.metrics[j],
                        want[j],
                        1e-12,
                        1e-14,
                    );
                }
                let h = 1e-6;
                let mut x = b.logp.clone();
                for j in 0..x.len() {
                    let fd = central_diff(&mut x, j, h, |x| transcription(&b, k, x)[0]);
                    assert_close(
                        &format!("{what}: dL/dl[{j}]"),
                        got.grad_l[j],
                        fd,
                        1e-6,
                        1e-9,
                    );
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 12 * 4 * 3);
}

#[test]
fn authors_terms_have_two_denominators() {
    // Issue 29's example: one prompt, two rollouts of 2 tokens and the expert row of 2 tokens.
    // Their PG / exploration token-mean divides by the 4 rollout tokens (not 6).
    let b = Theirs {
        s: 2,
        group: vec![0, 0, 0],
        pref: vec![false, false, true],
        adv: vec![FRAC_1_SQRT_2, -FRAC_1_SQRT_2, 0.0],
        pass: vec![true, false, true],
        expert_row_of_group: vec![Some(2)],
        mask: vec![1.0; 6],
        logp: vec![-0.4, -1.1, -0.7, -0.2, -0.9, -0.6],
        old: vec![-0.5, -1.0, -0.8, -0.3, -0.9, -0.6],
        refl: vec![-0.4; 6],
        ent: vec![1.0; 6],
    };
    let k = Knobs {
        agg: "token-mean",
        c: 3.0,
        entropy_coeff: 0.0,
        kl_coef: 0.0,
        kl_type: "kl",
    };
    let (case, opts) = library_case(&b, &[0, 1, 2], None);
    let got = lib_loss(&k.json(2), &case, &opts).unwrap();
    let want = transcription(&b, k, &b.logp);
    assert_close("loss", got.metrics[0], want[0], 1e-13, 0.0);
    // The rollout-only denominator: the terms over 4 tokens, not 6.
    let pg_sum: f64 = want[1] * 4.0;
    assert_close("pg over 4 tokens", got.metrics[1], pg_sum / 4.0, 1e-13, 0.0);
    assert_eq!(got.metrics[13], 4.0, "num_tokens: the rollout rows' tokens");
    assert_eq!(got.metrics[14], 2.0, "num_seqs: the rollout rows");
}

/// Micro-batches (or data-parallel ranks) with the global normalisers add up to the whole
/// batch, value and gradient, for every aggregation.
#[test]
fn authors_micro_batches_add_up_with_both_token_counts() {
    for seed in 20..26u64 {
        let b = random_batch(seed);
        let r = b.group.len();
        let n_row = |i: usize| (0..b.s).map(|t| b.mask[i * b.s + t]).sum::<f64>();
        let rollouts: Vec<usize> = (0..r).filter(|&i| !b.pref[i]).collect();
        let norm = CalibrlNormalizers {
            token_count: rollouts.iter().map(|&i| n_row(i)).sum(),
            seq_count: rollouts.len() as f64,
            all_token_count: (0..r).map(n_row).sum(),
            all_seq_count: r as f64,
        };
        // Three slices of consecutive rows.
        let cut1 = r / 3;
        let cut2 = 2 * r / 3;
        let slices: Vec<Vec<usize>> = vec![
            (0..cut1).collect(),
            (cut1..cut2).collect(),
            (cut2..r).collect(),
        ];
        for agg in AGGS {
            let k = Knobs {
                agg,
                c: 0.5,
                entropy_coeff: 0.02,
                kl_coef: 0.1,
                kl_type: "low_var_kl",
            };
            let json = k.json(b.s);
            let all: Vec<usize> = (0..r).collect();
            let (case, opts) = library_case(&b, &all, None);
            let whole = lib_loss(&json, &case, &opts).unwrap();
            let (mut loss, mut grad) = (0.0, vec![0.0; r * b.s]);
            for rows in &slices {
                let (case, opts) = library_case(&b, rows, Some(norm));
                let part = lib_loss(&json, &case, &opts).unwrap();
                loss += part.metrics[0];
                for (q, &i) in rows.iter().enumerate() {
                    for t in 0..b.s {
                        grad[i * b.s + t] += part.grad_l[q * b.s + t];
                    }
                }
            }
            let what = format!("seed {seed} agg {agg}");
            assert_close(
                &format!("{what}: loss"),
                loss,
                whole.metrics[0],
                1e-12,
                1e-14,
            );
            assert_vec_close(&format!("{what}: grad"), &grad, &whole.grad_l, 1e-12, 1e-14);
        }
    }
}

#[test]
fn authors_normalisers_must_count_the_expert_rows() {
    let b = random_batch(3);
    let r = b.group.len();
    let all: Vec<usize> = (0..r).collect();
    let n_row = |i: usize| (0..b.s).map(|t| b.mask[i * b.s + t]).sum::<f64>();
    let rollout_tokens: f64 = (0..r).filter(|&i| !b.pref[i]).map(n_row).sum();
    let rollout_seqs = (0..r).filter(|&i| !b.pref[i]).count() as f64;
    assert!(b.pref.iter().any(|&p| p), "the batch has expert rows");
    // All-row counts left 0 ("the same as the rollout rows'") while this call counts expert
    // tokens: rejected, naming the field.
    let (case, opts) = library_case(
        &b,
        &all,
        Some(CalibrlNormalizers::new(rollout_tokens, rollout_seqs)),
    );
    let err = lib_loss(r#"{"preset":"authors"}"#, &case, &opts).unwrap_err();
    assert!(
        err.1.contains("normalizers.all_token_count"),
        "error names the field: {}",
        err.1
    );
    // The `reference` preset ignores the all-row counts (expert rows are not counted there).
    assert!(lib_loss(r#"{"preset":"reference"}"#, &case, &opts).is_ok());
}
