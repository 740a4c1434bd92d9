//! The loss (SPEC §4) against the independent f64 reference in `tests/common/reference.rs`:
//! value, ∂L/∂ℓ, ∂L/∂H and metrics over random batches (packed / padded, masks, ragged and
//! empty rows, B ∈ {1, 3, 17}, f64 / f32 / bf16 inputs) for every mode of the configuration;
//! then central finite differences of every gradient (away from the kinks).

mod common;

use common::reference::{ref_loss, ref_value, METRIC_NAMES};
use common::*;

/// Every configuration the matrix runs (JSON overrides of the `paper` preset unless a preset is
/// named).
fn configs() -> Vec<String> {
    let mut v: Vec<String> = vec![
        r#"{"preset":"paper"}"#.into(),
        r#"{"preset":"reference"}"#.into(),
        r#"{"preset":"grpo"}"#.into(),
    ];
    for mode in ["sequence", "token_aligned"] {
        for act in ["leaky_relu", "relu", "tanh", "sigmoid", "huber"] {
            v.push(format!(r#"{{"delta_mode":"{mode}","activation":"{act}"}}"#));
            v.push(format!(
                r#"{{"delta_mode":"{mode}","activation":"{act}","baseline":"ref_policy"}}"#
            ));
        }
        for agg in [
            r#""agg":"token-mean""#,
            r#""agg":"seq-mean-token-sum""#,
            r#""agg":"seq-mean-token-mean""#,
            r#""agg":"seq-mean-token-sum-norm","t_norm":37.5"#,
            r#""agg":"token-sum""#,
        ] {
            v.push(format!(r#"{{"delta_mode":"{mode}",{agg}}}"#));
            v.push(format!(
                r#"{{"delta_mode":"{mode}",{agg},"baseline":"ref_policy","entropy_coef":0.02,"kl_coef":0.05}}"#
            ));
        }
        for extra in [
            r#""dual_clip":0.0"#,
            r#""dual_clip":1.0"#,
            r#""dual_clip":2.0"#,
            r#""clip_low":0.2,"clip_high":0.28"#,
            r#""clip_low":0.1,"clip_high":0.4,"dual_clip":5.0"#,
            r#""kl_coef":0.05,"kl_kind":"k1""#,
            r#""kl_coef":0.05,"kl_kind":"abs""#,
            r#""kl_coef":0.05,"kl_kind":"k2""#,
            r#""kl_coef":0.05,"kl_kind":"k3""#,
            r#""kl_coef":0.05,"kl_kind":"mse""#,
            r#""kl_coef":0.05,"kl_kind":"low_var_kl""#,
            r#""entropy_coef":0.01"#,
            r#""alpha":0.3,"lambda":0.5"#,
            r#""alpha":0.8,"lambda":0.01"#,
            r#""alpha":0.0"#,
        ] {
            v.push(format!(r#"{{"delta_mode":"{mode}",{extra}}}"#));
        }
    }
    for base in ["expert", "ref_policy"] {
        for agg in [
            r#""agg":"token-mean""#,
            r#""agg":"seq-mean-token-mean""#,
            r#""agg":"token-sum""#,
        ] {
            v.push(format!(
                r#"{{"delta_mode":"sequence","length_normalize":true,"baseline":"{base}",{agg}}}"#
            ));
        }
    }
    // SPEC §4.6 (bounds and ratios chosen so that the small test batches select tokens).
    for ec in [
        r#""entropy_control":"clip_cov","clip_cov_ratio":0.2,"clip_cov_lb":-0.3,"clip_cov_ub":0.4"#,
        r#""entropy_control":"clip_cov","clip_cov_ratio":0.5,"clip_cov_lb":-1.0,"clip_cov_ub":1.0,"cov_seed":7"#,
        r#""entropy_control":"kl_cov","kl_cov_ratio":0.2"#,
        r#""entropy_control":"kl_cov","kl_cov_ratio":0.3,"kl_cov_coef":0.5,"agg":"seq-mean-token-mean""#,
    ] {
        v.push(format!(r#"{{{ec}}}"#));
        v.push(format!(
            r#"{{"preset":"reference",{ec},"entropy_coef":0.01}}"#
        ));
        v.push(format!(r#"{{"preset":"grpo",{ec}}}"#));
    }
    for kind in ["luffy", "rlplus"] {
        v.push(format!(r#"{{"loss":"{kind}"}}"#));
        v.push(format!(
            r#"{{"loss":"{kind}","luffy_gamma":0.3,"agg":"seq-mean-token-mean"}}"#
        ));
        v.push(format!(
            r#"{{"loss":"{kind}","agg":"seq-mean-token-sum","kl_coef":0.1,"kl_kind":"k2","entropy_coef":0.01}}"#
        ));
        v.push(format!(
            r#"{{"loss":"{kind}","agg":"seq-mean-token-sum-norm","t_norm":50.0,"delta_mode":"token_aligned"}}"#
        ));
    }
    v
}

fn gen_for(json: &str, rng: &mut Rng, b: usize, layout: Layout) -> Gen {
    let trains_expert = json.contains("luffy") || json.contains("rlplus");
    let needs_expert = !(trains_expert || json.contains("grpo") || json.contains("ref_policy"));
    let expert_layout = if rng.bool(0.5) {
        Layout::Packed
    } else {
        Layout::Padded
    };
    Gen {
        b,
        layout,
        max_len: if b > 3 { 7 } else { 9 },
        // A masked calibrl/grpo run may also carry expert rows (docs/abi.md: masked out).
        expert_rows: trains_expert || rng.bool(0.3),
        // Expert data is required when λ > 0 with the expert baseline; elsewhere it may be
        // absent (the exploration metric is then 0).
        experts: if needs_expert || rng.bool(0.8) {
            1 + rng.int(0, 3)
        } else {
            0
        },
        expert_layout,
        old: rng.bool(0.85),
        ..Gen::default()
    }
}

fn tolerances(dt: Dt) -> (f64, f64) {
    match dt {
        Dt::F64 => (1e-10, 1e-12),
        // Inputs are rounded identically for the reference; what is left is the library's
        // arithmetic and the f32 output rounding.
        _ => (2e-5, 1e-7),
    }
}

fn check_against_reference(json: &str, case: &Case, o: &CallOpts, what: &str) {
    let cfg = config(json);
    let want = ref_loss(&cfg, &case.b);
    let got = lib_loss(json, case, o).unwrap_or_else(|e| panic!("{what}: library failed: {e:?}"));
    let (rtol, atol) = tolerances(o.dt);
    for (k, name) in METRIC_NAMES.iter().enumerate() {
        assert_close(
            &format!("{what}: metric {name}"),
            got.metrics[k],
            want.m.to_array()[k],
            rtol,
            atol,
        );
    }
    if let Some(mt) = &got.metrics_tensor {
        assert_vec_close(
            &format!("{what}: metrics tensor"),
            mt,
            &got.metrics,
            0.0,
            0.0,
        );
    }
    assert_vec_close(
        &format!("{what}: grad_logprobs"),
        &got.grad_l,
        &want.grad_l,
        rtol,
        atol,
    );
    if o.grad_h {
        assert_vec_close(
            &format!("{what}: grad_entropy"),
            &got.grad_h,
            &want.grad_h,
            rtol,
            atol,
        );
    }
}

#[test]
fn loss_matches_reference_every_mode_layout_and_dtype() {
    let mut n = 0;
    for (ci, json) in configs().iter().enumerate() {
        for layout in [Layout::Packed, Layout::Padded] {
            for &b in &[1usize, 3, 17] {
                for (di, dt) in [Dt::F64, Dt::F32, Dt::BF16].into_iter().enumerate() {
                    let mut seed = (ci * 1000 + b * 10 + di) as u64 * 7919 + layout as u64;
                    let (case, o) = loop {
                        let mut rng = Rng::new(seed);
                        let g = gen_for(json, &mut rng, b, layout);
                        let mut case = gen_case(&mut rng, &g);
                        let o = CallOpts {
                            dt,
                            row_dt: if dt == Dt::F64 { Dt::F64 } else { Dt::F32 },
                            grad_dt: if dt == Dt::F64 { Dt::F64 } else { Dt::F32 },
                            idx_dt: if rng.bool(0.5) { Dt::I64 } else { Dt::I32 },
                            mask_dt: [Dt::U8, Dt::Bool, Dt::F32, Dt::I32][rng.int(0, 4)],
                            grad_h: rng.bool(0.7),
                            metrics_tensor: rng.bool(0.5),
                            norm_all: None,
                        };
                        case.quantize(o.dt, o.row_dt);
                        let kink = ref_loss(&config(json), &case.b).kink;
                        // Reduced-precision arithmetic may decide a branch differently within
                        // rounding of a kink: keep such samples for f64 only.
                        if dt == Dt::F64 || kink > 1e-3 {
                            break (case, o);
                        }
                        seed += 1_000_003;
                    };
                    let what = format!("{json} {layout:?} B={b} {dt:?} seed={seed}");
                    check_against_reference(json, &case, &o, &what);
                    n += 1;
                }
            }
        }
    }
    eprintln!("{n} library calls matched the reference");
}

/// Global normalisers (SPEC §4.5) are used instead of the call's own counts.
#[test]
fn global_normalizers_are_used() {
    for (ci, json) in configs().iter().enumerate() {
        let mut rng = Rng::new(ci as u64 + 17);
        let g = gen_for(json, &mut rng, 6, Layout::Packed);
        let mut case = gen_case(&mut rng, &g);
        case.b.norm = Some((123.0, 11.0));
        check_against_reference(
            json,
            &case,
            &CallOpts::default(),
            &format!("{json} normalizers"),
        );
    }
}

/// A padded batch without a mask tensor: every position counts.
#[test]
fn padded_without_mask_counts_every_position() {
    for (ci, json) in configs().iter().enumerate().step_by(3) {
        let mut rng = Rng::new(ci as u64 + 99);
        let g = Gen {
            layout: Layout::Padded,
            holes: false,
            zero_len: false,
            ..gen_for(json, &mut rng, 4, Layout::Padded)
        };
        let mut case = gen_case(&mut rng, &g);
        case.mask_given = false;
        case.b.mask.iter_mut().for_each(|m| *m = 1.0);
        if let Some(e) = &mut case.b.expert {
            case.expert_mask_given = false;
            e.mask.iter_mut().for_each(|m| *m = 1.0);
        }
        check_against_reference(
            json,
            &case,
            &CallOpts::default(),
            &format!("{json} no mask"),
        );
    }
}

/// A case whose every sample lies at least `margin` from every kink of the loss.
fn smooth_case(json: &str, seed: u64, layout: Layout, margin: f64) -> Case {
    let cfg = config(json);
    let mut s = seed;
    for _ in 0..10_000 {
        let mut rng = Rng::new(s);
        let mut g = gen_for(json, &mut rng, 5, layout);
        g.old = true; // FD of the value needs ℓold held fixed.
        let case = gen_case(&mut rng, &g);
        if ref_loss(&cfg, &case.b).kink > margin {
            return case;
        }
        s += 7_777_777;
    }
    panic!("{json}: no sample away from the kinks");
}

/// Central differences (f64, h = 1e-6) of the library's own loss value and of the reference
/// value against the library's ∂L/∂ℓ and ∂L/∂H; the analytic reference gradient too.
#[test]
fn finite_differences_of_every_gradient() {
    let h = 1e-6;
    let (rtol, atol) = (1e-6, 1e-9);
    let mut checked = 0usize;
    for (ci, json) in configs().iter().enumerate() {
        let cfg = config(json);
        let rlplus = json.contains("rlplus");
        for layout in [Layout::Packed, Layout::Padded] {
            let case = smooth_case(json, 31 + ci as u64 * 101 + layout as u64, layout, 1e-4);
            let what = format!("{json} {layout:?}");
            let o = CallOpts::default();
            let lib = lib_loss(json, &case, &o).unwrap();
            let want = ref_loss(&cfg, &case.b);
            assert_vec_close(
                &format!("{what}: analytic grad"),
                &lib.grad_l,
                &want.grad_l,
                1e-10,
                1e-12,
            );
            let nt = case.b.logp.len();
            for t in 0..nt {
                // FD of the reference value, with RL-PLUS's stop-gradient factor held fixed.
                let mut b = case.b.clone();
                b.sg_logp = Some(case.b.logp.clone());
                let mut x = b.logp.clone();
                let fd_ref = central_diff(&mut x, t, h, |x| {
                    b.logp = x.to_vec();
                    ref_value(&cfg, &b)
                });
                assert_close(
                    &format!("{what}: FD(reference) vs library dL/dl[{t}]"),
                    lib.grad_l[t],
                    fd_ref,
                    rtol,
                    atol,
                );
                if !rlplus {
                    // FD of the library's own value (RL-PLUS's value is not the potential of
                    // its gradient: sg(1 − e^ℓ)^½ is detached by definition).
                    let mut c2 = case.clone();
                    let mut x = c2.b.logp.clone();
                    let fd_lib = central_diff(&mut x, t, h, |x| {
                        c2.b.logp = x.to_vec();
                        lib_loss(
                            json,
                            &c2,
                            &CallOpts {
                                grad_h: false,
                                metrics_tensor: false,
                                ..o
                            },
                        )
                        .unwrap()
                        .metrics[0]
                    });
                    assert_close(
                        &format!("{what}: FD(library) vs library dL/dl[{t}]"),
                        lib.grad_l[t],
                        fd_lib,
                        rtol,
                        atol,
                    );
                }
                if case.b.ent.is_some() {
                    let mut c2 = case.clone();
                    let mut x = c2.b.ent.clone().unwrap();
                    let fd_h = central_diff(&mut x, t, h, |x| {
                        c2.b.ent = Some(x.to_vec());
                        lib_loss(
                            json,
                            &c2,
                            &CallOpts {
                                grad_h: false,
                                metrics_tensor: false,
                                ..o
                            },
                        )
                        .unwrap()
                        .metrics[0]
                    });
                    assert_close(
                        &format!("{what}: FD vs library dL/dH[{t}]"),
                        lib.grad_h[t],
                        fd_h,
                        rtol,
                        atol,
                    );
                }
                checked += 1;
            }
        }
    }
    eprintln!("{checked} token gradients checked by finite differences");
}

/// `token_weights` ρ (verl's `rollout_is_weights`) against the reference in every mode and
/// layout, and central differences of the library's value against its gradient.
#[test]
fn token_weights_match_reference_and_finite_differences() {
    let mut checked = 0usize;
    for (ci, json) in configs().iter().enumerate() {
        for layout in [Layout::Packed, Layout::Padded] {
            let mut case = smooth_case(json, 977 + ci as u64 * 13 + layout as u64, layout, 1e-4);
            let mut rng = Rng::new(4242 + ci as u64);
            case.b.tw = Some(
                (0..case.b.logp.len())
                    .map(|_| rng.range(0.0, 2.0))
                    .collect(),
            );
            let what = format!("{json} {layout:?} token_weights");
            let o = CallOpts::default();
            check_against_reference(json, &case, &o, &what);
            if json.contains("rlplus") {
                continue; // its value is not the potential of its gradient (detached factor)
            }
            let lib = lib_loss(json, &case, &o).unwrap();
            for t in (0..case.b.logp.len()).step_by(3) {
                let mut c2 = case.clone();
                let mut x = c2.b.logp.clone();
                let fd = central_diff(&mut x, t, 1e-6, |x| {
                    c2.b.logp = x.to_vec();
                    lib_loss(json, &c2, &o).unwrap().metrics[0]
                });
                assert_close(
                    &format!("{what}: FD vs dL/dl[{t}]"),
                    lib.grad_l[t],
                    fd,
                    1e-6,
                    1e-9,
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "{checked} finite differences");
}

#[test]
fn negative_token_weights_are_refused_naming_the_argument() {
    let json = &configs()[0];
    let mut case = smooth_case(json, 5, Layout::Padded, 0.0);
    let mut tw = vec![1.0; case.b.logp.len()];
    let k = (0..tw.len()).find(|&k| case.b.mask[k] != 0.0).unwrap();
    tw[k] = -0.5;
    case.b.tw = Some(tw);
    let (status, msg) = lib_loss(json, &case, &CallOpts::default()).unwrap_err();
    assert_ne!(status, 0);
    assert!(msg.contains("token_weights"), "{msg}");
}

/// SPEC §4.5: a rollout with no counted token adds nothing to any term (also not through φ of
/// its length-normalised Δ = 0 − E/n*) and is not counted in N_seq.
#[test]
fn empty_rollouts_add_nothing_and_are_not_counted() {
    for json in [
        r#"{"length_normalize":true,"agg":"seq-mean-token-sum"}"#,
        r#"{"length_normalize":false,"agg":"seq-mean-token-mean"}"#,
        r#"{"baseline":"ref_policy","length_normalize":true,"agg":"token-sum"}"#,
    ] {
        for layout in [Layout::Packed, Layout::Padded] {
            let mut rng = Rng::new(4242);
            let g = Gen {
                zero_len: false,
                missing_expert: false,
                layout,
                ..Gen::default()
            };
            let mut case = gen_case(&mut rng, &g);
            case.mask_given = true;
            // Row 0 keeps its positions but none counts.
            for t in case.b.rows[0].clone() {
                case.b.mask[t] = 0.0;
            }
            let o = CallOpts::default();
            let with_w = lib_loss(json, &case, &o).unwrap();
            let mut zero = case.clone();
            zero.b.w[0] = 0.0;
            zero.b.adv[0] = 0.0;
            let without = lib_loss(json, &zero, &o).unwrap();
            let what = format!("{json} {layout:?}");
            assert!(case.b.w[0] > 0.0, "{what}: the row must carry a weight");
            assert_eq!(
                with_w.metrics[14],
                (case.b.rows.len() - 1) as f64,
                "{what}: N_seq"
            );
            // Every term and count (mean_rarity_weight, a per-rollout mean, sees w_0 change).
            for k in (0..12).chain(13..15) {
                assert_eq!(
                    with_w.metrics[k], without.metrics[k],
                    "{what}: {}",
                    METRIC_NAMES[k]
                );
            }
            assert_vec_close(&what, &with_w.grad_l, &without.grad_l, 0.0, 0.0);
            check_against_reference(json, &case, &o, &what);
        }
    }
}
