//! The `authors` preset (SPEC §4.7) on the authors' padded layout — rollouts and expert rows in
//! one `[R, S]` batch, expert rows flagged — against a transcription of their released trainer's
//! arithmetic written here from SPEC §4.2, §4.3 and §4.7 (not from the library): one token-mean
//! over every row's response mask; the policy-gradient and exploration terms zeroed on expert
//! rows; entropy and KL over every row; ℓ*[g, t] the expert row's start-of-step log-probs
//! (0 past its length), and 0 for a group whose expert was not selected. (Their masked mean's ε
//! in the denominator aside.) Gradients: central differences of the transcription.

mod common;

use common::reference::{activation, clipped_pg, kl, RefBatch, RefExpert};
use common::*;

const S: usize = 7;

struct Layout2 {
    case: Case,
    /// Group of each row; the expert row of each group (if selected).
    group: Vec<usize>,
    expert_row_of_group: Vec<Option<usize>>,
}

/// Three groups of three rollouts; groups 0 and 2 have their expert row in the batch, group 1's
/// expert was not selected. Row lengths vary (one rollout is empty).
fn layout(seed: u64) -> Layout2 {
    let mut rng = Rng::new(seed);
    let group = vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 2];
    let is_expert: Vec<bool> = (0..group.len()).map(|i| i >= 9).collect();
    let lens = [7, 3, 5, 6, 0, 4, 2, 7, 5, 6, 3];
    let r = group.len();
    let rows: Vec<_> = (0..r).map(|i| i * S..(i + 1) * S).collect();
    let mut mask = vec![0.0; r * S];
    for i in 0..r {
        for t in 0..lens[i] {
            mask[i * S + t] = 1.0;
        }
    }
    let logp: Vec<f64> = (0..r * S).map(|_| rng.range(-2.5, -0.05)).collect();
    let old: Vec<f64> = logp.iter().map(|l| l + 0.35 * rng.normal()).collect();
    let refl: Vec<f64> = logp.iter().map(|l| l + 0.3 * rng.normal()).collect();
    let ent: Vec<f64> = (0..r * S).map(|_| rng.range(0.0, 2.0)).collect();
    let rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0];
    let cfg = config(r#"{"preset":"authors"}"#);
    let groups: Vec<i64> = group.iter().map(|&g| g as i64).collect();
    let adv = calibrl::rarity::group_advantages(&cfg, &rewards, &groups, 3, None, Some(&is_expert))
        .unwrap();
    let expert_row_of_group = vec![Some(9), None, Some(10)];
    // The expert baseline the library takes: each selected expert row's start-of-step
    // log-probs (its old_logprobs), in expert slots 0 (group 0) and 1 (group 2).
    let slot_of_group = [0i64, -1, 1];
    let mut elogp = vec![0.0; 2 * S];
    let mut emask = vec![0.0; 2 * S];
    for (slot, row) in [9usize, 10].into_iter().enumerate() {
        for t in 0..S {
            elogp[slot * S + t] = old[row * S + t];
            emask[slot * S + t] = mask[row * S + t];
        }
    }
    let b = RefBatch {
        rows,
        logp,
        mask,
        old: Some(old),
        refl: Some(refl),
        ent: Some(ent),
        adv: adv.advantages,
        w: adv.weights,
        c: adv.signs,
        is_expert,
        expert: Some(RefExpert {
            rows: vec![0..S, S..2 * S],
            logp: elogp,
            mask: emask,
            index: group.iter().map(|&g| slot_of_group[g]).collect(),
        }),
        norm: None,
        sg_logp: None,
        tw: None,
    };
    Layout2 {
        case: Case {
            b,
            layout: Layout::Padded,
            seq_len: S,
            offsets: vec![],
            expert_layout: Layout::Padded,
            expert_seq_len: S,
            expert_offsets: vec![],
            mask_given: true,
            expert_mask_given: true,
            is_expert_given: true,
        },
        group,
        expert_row_of_group,
    }
}

/// Their arithmetic: (loss, clipfrac, num_tokens, num_seqs, mean_response_length).
fn transcription(json: &str, l: &Layout2, logp: &[f64]) -> (f64, f64, f64, f64, f64) {
    let cfg = config(json);
    let b = &l.case.b;
    let old = b.old.as_ref().unwrap();
    let refl = b.refl.as_ref().unwrap();
    let ent = b.ent.as_ref().unwrap();
    let r = b.rows.len();
    let total_mask: f64 = b.mask.iter().sum();
    let (mut pg, mut ex, mut h, mut k, mut clipped) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for i in 0..r {
        let rollout = if b.is_expert[i] { 0.0 } else { 1.0 };
        for t in 0..S {
            let j = i * S + t;
            let m = b.mask[j];
            if m == 0.0 {
                continue;
            }
            let (p, _, clip, _, _) = clipped_pg(&cfg, b.adv[i], logp[j], old[j]);
            clipped += clip as u8 as f64;
            pg += m * rollout * p;
            // ℓ*: the group's expert row at start of step, masked (0 past its length); 0 when
            // the group's expert was not selected.
            let star = match l.expert_row_of_group[l.group[i]] {
                Some(e) => b.mask[e * S + t] * old[e * S + t],
                None => 0.0,
            };
            let (phi, _, _) = activation(&cfg, -b.c[i] * (logp[j] - star));
            ex += m * rollout * b.w[i] * phi;
            h += m * ent[j];
            k += m * kl(cfg.kl_kind, logp[j], refl[j]).0;
        }
    }
    let loss = (pg + cfg.lambda * ex) / total_mask - cfg.entropy_coef * h / total_mask
        + cfg.kl_coef * k / total_mask;
    let n_rows = (0..r)
        .filter(|&i| b.rows[i].clone().any(|j| b.mask[j] > 0.0))
        .count() as f64;
    (
        loss,
        clipped / total_mask,
        total_mask,
        n_rows,
        total_mask / r as f64,
    )
}

#[test]
fn authors_preset_equals_their_arithmetic_on_their_padded_layout() {
    for json in [
        r#"{"preset":"authors"}"#,
        r#"{"preset":"authors","entropy_coef":0.01,"kl_coef":0.05,"kl_kind":"k2"}"#,
        r#"{"preset":"authors","kl_coef":0.1,"kl_kind":"k3","alpha":0.3,"lambda":0.5}"#,
    ] {
        for seed in [1u64, 2, 3] {
            let l = layout(seed);
            let got = lib_loss(json, &l.case, &CallOpts::default()).unwrap();
            let (want, clipfrac, ntok, nseq, mlen) = transcription(json, &l, &l.case.b.logp);
            let what = format!("{json} seed {seed}");
            assert_close(&format!("{what}: loss"), got.metrics[0], want, 1e-12, 1e-14);
            assert_close(
                &format!("{what}: clipfrac"),
                got.metrics[5],
                clipfrac,
                1e-12,
                0.0,
            );
            assert_eq!(got.metrics[13], ntok, "{what}: num_tokens");
            assert_eq!(got.metrics[14], nseq, "{what}: num_seqs");
            assert_close(
                &format!("{what}: mean_response_length"),
                got.metrics[10],
                mlen,
                1e-12,
                0.0,
            );
            // ∂L/∂ℓ against central differences of the transcription.
            let h = 1e-6;
            let mut x = l.case.b.logp.clone();
            for j in 0..x.len() {
                let fd = central_diff(&mut x, j, h, |x| transcription(json, &l, x).0);
                assert_close(
                    &format!("{what}: dL/dl[{j}]"),
                    got.grad_l[j],
                    fd,
                    1e-6,
                    1e-9,
                );
            }
            // The preset differs from `reference` on this data (the test can tell them apart).
            let refp =
                lib_loss(r#"{"preset":"reference"}"#, &l.case, &CallOpts::default()).unwrap();
            assert!((refp.metrics[0] - got.metrics[0]).abs() > 1e-6, "{what}");
        }
    }
}

#[test]
fn authors_preset_without_any_selected_expert_explores_against_zero() {
    let mut l = layout(5);
    l.case.b.expert = None;
    l.expert_row_of_group = vec![None, None, None];
    let json = r#"{"preset":"authors"}"#;
    let got = lib_loss(json, &l.case, &CallOpts::default()).unwrap();
    assert_close(
        "loss",
        got.metrics[0],
        transcription(json, &l, &l.case.b.logp).0,
        1e-12,
        1e-14,
    );
}
