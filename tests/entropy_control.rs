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
