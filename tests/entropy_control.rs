//! Clip-Cov and KL-Cov (SPEC §4.6) beyond the reference matrix of `reference_loss.rs`: the
//! seeded selection is reproducible and is the reference's (a function of the inputs, the
//! positions and the seed only, so no thread count enters); KL-Cov's ties go by position;
//! caller-provided global means and count; bad keys are refused by name.

mod common;

use common::reference::{ref_cov_selection, ref_loss};
use common::*;

fn case(seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let g = Gen {
        b: 12,
        max_len: 9,
        experts: 3,
        ..Gen::default()
    };
    gen_case(&mut rng, &g)
}

fn check(json: &str, c: &Case) -> LibLoss {
    let want = ref_loss(&config(json), &c.b);
    let got = lib_loss(json, c, &CallOpts::default()).unwrap();
    assert_close(
        &format!("{json}: loss"),
        got.metrics[0],
        want.m.loss,
        1e-12,
        1e-14,
    );
    assert_vec_close(
        &format!("{json}: grad"),
        &got.grad_l,
        &want.grad_l,
        1e-10,
        1e-12,
    );
    got
}

#[test]
fn clip_cov_selection_is_seeded_reproducible_and_the_references() {
    let c = case(3);
    // GRPO (λ = 0, no regularisers): a token's gradient is its policy-gradient term alone.
    let base = r#""preset":"grpo","entropy_control":"clip_cov","clip_cov_ratio":0.1,"clip_cov_lb":-0.5,"clip_cov_ub":0.5"#;
    let mut selections = vec![];
    for seed in [0u64, 1, 2, 12345] {
        let json = format!(r#"{{{base},"cov_seed":{seed}}}"#);
        let (sel, _) = ref_cov_selection(&config(&json), &c.b);
        let counted = (0..c.b.rows.len())
            .map(|i| c.b.rows[i].clone().filter(|&t| c.b.mask[t] != 0.0).count())
            .sum::<usize>();
        assert_eq!(
            sel.len(),
            ((0.1 * counted as f64).floor() as usize).max(1),
            "{json}"
        );
        let a = check(&json, &c);
        let b = lib_loss(&json, &c, &CallOpts::default()).unwrap();
        assert_eq!(
            a.grad_l, b.grad_l,
            "{json}: same inputs and seed, same bits"
        );
        // A selected token's gradient is 0; it was not before.
        let plain = lib_loss(r#"{"preset":"grpo"}"#, &c, &CallOpts::default()).unwrap();
        for &k in &sel {
            assert_eq!(a.grad_l[k], 0.0, "{json}: token {k}");
            assert!(plain.grad_l[k] != 0.0, "{json}: token {k} must matter");
        }
        selections.push(sel);
    }
    assert!(
        selections.windows(2).any(|w| w[0] != w[1]),
        "the seed changes the selection"
    );
}

#[test]
fn kl_cov_ties_are_broken_by_position() {
    let mut c = case(4);
    // Equal advantages: every covariance is 0 (a tie), so the first n counted positions win.
    // (0.5: its sums and their mean are exact, so A − mean A is exactly 0.)
    c.b.adv.iter_mut().for_each(|a| *a = 0.5);
    let json = r#"{"entropy_control":"kl_cov","kl_cov_ratio":0.15}"#;
    let (sel, _) = ref_cov_selection(&config(json), &c.b);
    let counted: Vec<usize> = (0..c.b.rows.len())
        .filter(|&i| !c.b.is_expert[i])
        .flat_map(|i| c.b.rows[i].clone())
        .filter(|&t| c.b.mask[t] != 0.0)
        .collect();
    let n = ((0.15 * counted.len() as f64).floor() as usize).max(1);
    assert_eq!(sel, counted[..n].to_vec());
    check(json, &c);
}

#[test]
fn caller_global_means_and_count() {
    let c = case(5);
    for ec in [
        r#""entropy_control":"clip_cov","clip_cov_ratio":0.1,"clip_cov_lb":-0.5,"clip_cov_ub":0.5"#,
        r#""entropy_control":"kl_cov","kl_cov_ratio":0.1"#,
    ] {
        let local = format!("{{{ec}}}");
        // This call's own means and count given explicitly: the same bits.
        let toks: Vec<(f64, f64)> = (0..c.b.rows.len())
            .filter(|&i| !c.b.is_expert[i])
            .flat_map(|i| c.b.rows[i].clone().map(move |t| (i, t)))
            .filter(|&(_, t)| c.b.mask[t] != 0.0)
            .map(|(i, t)| (c.b.adv[i], c.b.logp[t]))
            .collect();
        let n = toks.len() as f64;
        let am = toks.iter().map(|t| t.0).sum::<f64>() / n;
        let lm = toks.iter().map(|t| t.1).sum::<f64>() / n;
        let explicit = format!(
            r#"{{{ec},"cov_adv_mean":{am:?},"cov_logprob_mean":{lm:?},"cov_token_count":{n}}}"#
        );
        let a = lib_loss(&local, &c, &CallOpts::default()).unwrap();
        let b = lib_loss(&explicit, &c, &CallOpts::default()).unwrap();
        assert_eq!(a.grad_l, b.grad_l, "{explicit}");
        // Other global values change the selection as the reference says.
        let global = format!(
            r#"{{{ec},"cov_adv_mean":0.05,"cov_logprob_mean":-0.9,"cov_token_count":{}}}"#,
            4.0 * n
        );
        let g = check(&global, &c);
        assert!(g.grad_l != a.grad_l, "{global}");
    }
}

#[test]
fn bad_keys_are_refused_by_name() {
    for (json, key) in [
        (r#"{"clip_cov_ratio":0}"#, "clip_cov_ratio"),
        (r#"{"clip_cov_ratio":1.01}"#, "clip_cov_ratio"),
        (r#"{"kl_cov_ratio":-0.1}"#, "kl_cov_ratio"),
        (r#"{"clip_cov_lb":5,"clip_cov_ub":1}"#, "clip_cov_lb"),
        (
            r#"{"cov_adv_mean":0.0,"cov_logprob_mean":-1.0}"#,
            "cov_token_count",
        ),
        (r#"{"cov_logprob_mean":-1.0}"#, "cov_token_count"),
        (
            r#"{"cov_token_count":100,"cov_adv_mean":0.1}"#,
            "cov_token_count",
        ),
        (r#"{"cov_seed":-1}"#, "cov_seed"),
        (r#"{"cov_seed":1.5}"#, "cov_seed"),
        (r#"{"entropy_control":"cov"}"#, "entropy_control"),
    ] {
        let e = calibrl::Config::from_json(json).unwrap_err();
        assert!(
            e.message.contains(&format!("`{key}`")),
            "{json}: {}",
            e.message
        );
    }
}

#[test]
fn the_fixed_summation_order_is_the_cuda_kernels() {
    // Both backends add the covariance means in one order (desc::loss::COV_SUM_*); the CUDA
    // kernel's constants must be the same numbers.
    let src = include_str!("../cuda/loss.cu");
    let define = |name: &str| -> usize {
        let line = src
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("cuda/loss.cu has no #define {name}"));
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert_eq!(define("COV_THREADS"), calibrl::desc::loss::COV_SUM_THREADS);
    assert_eq!(
        define("COV_PER_THREAD"),
        calibrl::desc::loss::COV_SUM_PER_THREAD
    );
}

/// One packed batch of rollouts (no mask tensor, no expert rows) with the given rows.
fn rollouts(logp_rows: &[Vec<f64>], adv: &[f64], old: Option<Vec<f64>>) -> Case {
    let mut rows = vec![];
    let mut offsets = vec![0i64];
    let mut logp = vec![];
    for r in logp_rows {
        rows.push(logp.len()..logp.len() + r.len());
        logp.extend_from_slice(r);
        offsets.push(logp.len() as i64);
    }
    let n = logp.len();
    let b = adv.len();
    Case {
        b: common::reference::RefBatch {
            rows,
            logp,
            mask: vec![1.0; n],
            old,
            refl: None,
            ent: None,
            adv: adv.to_vec(),
            w: adv.iter().map(|a| a.abs()).collect(),
            c: adv
                .iter()
                .map(|&a| if a > 0.0 { 1.0 } else { -1.0 })
                .collect(),
            is_expert: vec![false; b],
            expert: None,
            norm: None,
            sg_logp: None,
            tw: None,
        },
        layout: Layout::Packed,
        seq_len: 0,
        offsets,
        expert_layout: Layout::Packed,
        expert_seq_len: 0,
        expert_offsets: vec![],
        mask_given: false,
        expert_mask_given: false,
        is_expert_given: false,
    }
}

/// KL-Cov's selected tokens, read off the library's gradient (GRPO, token-mean over N tokens):
/// an unselected token's ∂L/∂ℓ is −A·ρ/N, a selected one's adds β·sign(ℓ − ℓold)/N.
fn kl_cov_selected(c: &Case, got: &LibLoss, beta: f64) -> Vec<usize> {
    let n = c.b.logp.len() as f64;
    let old = c.b.old.as_ref().unwrap();
    let mut sel = vec![];
    for (i, r) in c.b.rows.iter().enumerate() {
        for k in r.clone() {
            let plain = -c.b.adv[i] * (c.b.logp[k] - old[k]).exp() / n;
            if (got.grad_l[k] - plain).abs() > 0.5 * beta / n {
                sel.push(k);
            }
        }
    }
    sel
}

#[test]
fn kl_cov_equal_advantages_tie_exactly_whatever_their_value() {
    // Issue 29: with one advantage for every token, the computed mean of A carried a rounding
    // residue (0.1, 0.3, 0.7 are not binary fractions) that ranked the tokens by ℓ. SPEC §4.6:
    // A − mean A is exactly 0, every covariance ties, the first n positions are selected.
    let mut rng = Rng::new(29);
    let beta = 0.1;
    for call in 0..200 {
        let len = rng.int(20, 200);
        let a = [0.1, 0.3, 0.7, -0.3, 1.1][call % 5];
        let logp: Vec<f64> = (0..len).map(|_| rng.range(-3.0, -0.01)).collect();
        // Every token moved away from ℓold, so a selected one shows in its gradient.
        let old: Vec<f64> = logp
            .iter()
            .map(|l| l - if rng.bool(0.5) { 0.05 } else { -0.05 })
            .collect();
        let c = rollouts(&[logp], &[a], Some(old));
        let json = r#"{"preset":"grpo","entropy_control":"kl_cov","kl_cov_ratio":0.05}"#;
        let got = lib_loss(json, &c, &CallOpts::default()).unwrap();
        let n = ((0.05 * len as f64).floor() as usize).max(1);
        assert_eq!(
            kl_cov_selected(&c, &got, beta),
            (0..n).collect::<Vec<_>>(),
            "call {call}: A = {a}, {len} tokens"
        );
    }
}

#[test]
fn no_dual_clip_under_either_entropy_control() {
    // Issue 29: one token with A = −1 and ratio e^1.5 = 4.4817: verl's Clip-Cov / KL-Cov give
    // p = 4.4817 (no dual clip), not the dual-clipped 3.0.
    let c = rollouts(&[vec![-0.5]], &[-1.0], Some(vec![-2.0]));
    for control in ["clip_cov", "kl_cov"] {
        // (The one token's covariance is 0: outside Clip-Cov's (1, 5); KL-Cov selects it, and
        // β·|ℓ − ℓold| is added.)
        let json = format!(r#"{{"preset":"grpo","entropy_control":"{control}"}}"#);
        let got = lib_loss(&json, &c, &CallOpts::default()).unwrap();
        let extra = if control == "kl_cov" { 0.1 * 1.5 } else { 0.0 };
        assert_close(
            &format!("{control}: pg_loss"),
            got.metrics[1],
            1.5f64.exp() + extra,
            1e-15,
            0.0,
        );
        assert_eq!(got.metrics[6], 0.0, "{control}: clipfrac_lower");
    }
    // Without entropy control the dual clip applies (SPEC §4.1).
    let got = lib_loss(r#"{"preset":"grpo"}"#, &c, &CallOpts::default()).unwrap();
    assert_eq!(got.metrics[1], 3.0);
}

/// Issue 30, item 1: covariances that overflow (finite inputs) made the KL-Cov sort panic or
/// select from a broken order. A non-finite covariance is never a candidate; the others are
/// ranked as usual (the reference, which also drops them).
#[test]
fn non_finite_covariances_are_never_selected() {
    let mut rng = Rng::new(30);
    for call in 0..300 {
        let rows = rng.int(1, 6);
        let mut logp_rows = vec![];
        let mut adv = vec![];
        for _ in 0..rows {
            let len = rng.int(1, 30);
            logp_rows.push(
                (0..len)
                    .map(|_| {
                        if rng.bool(0.3) {
                            if call % 2 == 0 {
                                -1e308
                            } else {
                                -f64::MAX
                            }
                        } else {
                            rng.range(-3.0, -0.01)
                        }
                    })
                    .collect::<Vec<_>>(),
            );
            adv.push(rng.range(-1.0, 1.0));
        }
        // Even calls: caller-given means (ℓ mean 1e308, so ℓ − mean reaches −2e308 = −inf);
        // odd calls: the call's own means (Σ ℓ of −DBL_MAX overflows to −inf).
        let json = if call % 2 == 0 {
            r#"{"preset":"grpo","entropy_control":"kl_cov","kl_cov_ratio":0.2,"cov_adv_mean":0.05,"cov_logprob_mean":1e308,"cov_token_count":40}"#
        } else {
            r#"{"preset":"grpo","entropy_control":"kl_cov","kl_cov_ratio":0.2}"#
        };
        let c = rollouts(&logp_rows, &adv, None);
        let got = lib_loss(json, &c, &CallOpts::default())
            .unwrap_or_else(|e| panic!("call {call}: status {} {}", e.0, e.1));
        let (want, _) = ref_cov_selection(&config(json), &c.b);
        let n = c.b.logp.len() as f64;
        // ℓold = ℓ: a selected token's β·|ℓ − ℓold| is 0 with derivative 0 (as |x| at 0), so
        // the selection shows in the selected fraction, not in the gradient.
        assert_eq!(
            got.metrics[15],
            want.len() as f64 / n,
            "call {call}: cov_selected_frac"
        );
        // Every selected token has a finite covariance.
        let cfg = config(json);
        let toks: Vec<(f64, f64)> = (0..rows)
            .flat_map(|i| c.b.rows[i].clone().map(move |k| (i, k)))
            .map(|(i, k)| (c.b.adv[i], c.b.logp[k]))
            .collect();
        let (am, lm) = match (cfg.cov_adv_mean, cfg.cov_logprob_mean) {
            (Some(a), Some(l)) => (a, l),
            _ => (
                toks.iter().map(|t| t.0).sum::<f64>() / n,
                toks.iter().map(|t| t.1).sum::<f64>() / n,
            ),
        };
        for &k in &want {
            let i = c.b.rows.iter().position(|r| r.contains(&k)).unwrap();
            assert!(((c.b.adv[i] - am) * (c.b.logp[k] - lm)).is_finite());
        }
    }
}

#[test]
fn non_finite_covariances_with_a_moved_policy_select_the_finite_top() {
    // As above, with ℓold ≠ ℓ so that the selection shows in the gradient: caller-given
    // means put half of the covariances at ±inf or NaN; the selection is the reference's.
    let mut rng = Rng::new(31);
    for call in 0..100 {
        let len = rng.int(5, 60);
        let logp: Vec<f64> = (0..len)
            .map(|_| {
                if rng.bool(0.5) {
                    -1e308
                } else {
                    rng.range(-3.0, -0.01)
                }
            })
            .collect();
        let old: Vec<f64> = logp.iter().map(|l| l - 0.05).collect();
        let a = [0.3, -0.7, 0.05][call % 3];
        let c = rollouts(&[logp], &[a], Some(old));
        let json = r#"{"preset":"grpo","entropy_control":"kl_cov","kl_cov_ratio":0.1,"cov_adv_mean":0.05,"cov_logprob_mean":1e308,"cov_token_count":50}"#;
        let got = lib_loss(json, &c, &CallOpts::default())
            .unwrap_or_else(|e| panic!("call {call}: status {} {}", e.0, e.1));
        let (want, _) = ref_cov_selection(&config(json), &c.b);
        assert_eq!(kl_cov_selected(&c, &got, 0.1), want, "call {call}");
    }
}
