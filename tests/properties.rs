//! SPEC properties through the C ABI: the worked example of §3 and the group statistics, λ = 0
//! is exactly GRPO, all-equal rewards give no exploration, the sign behaviour of §4.2, and
//! slices with global normalisers add up to the whole batch (§4.5). Also: the Rust API
//! (`cpu::loss::compute`, `rarity::group_advantages`) agrees with the C ABI.

mod common;

use calibrl::ffi::loss::CalibrlAdvantageArgs;
use common::reference::{ref_group_advantages, ref_loss, RefExpert};
use common::*;

struct Adv {
    a: Vec<f64>,
    w: Vec<f64>,
    c: Vec<f64>,
}

fn lib_adv(
    json: &str,
    rewards: &[f64],
    groups: &[i64],
    num_groups: i64,
    correct: Option<&[bool]>,
    is_expert: Option<&[bool]>,
    out_dt: Dt,
) -> Result<Adv, (i32, String)> {
    let cfg = cfg_new(json);
    let b = rewards.len();
    let r = Tensor::new(rewards, &[b], Dt::F64);
    let g = Tensor::ints(groups, &[b], Dt::I64);
    let flags = |v: &[bool]| {
        let f: Vec<f64> = v.iter().map(|&x| x as u8 as f64).collect();
        Tensor::new(&f, &[b], Dt::U8)
    };
    let corr = correct.map(flags);
    let exp = is_expert.map(flags);
    let mut a = Tensor::filled(f64::NAN, &[b], out_dt);
    let mut w = Tensor::filled(f64::NAN, &[b], out_dt);
    let mut c = Tensor::filled(f64::NAN, &[b], out_dt);
    let args = CalibrlAdvantageArgs {
        rewards: r.lib(),
        group_ids: g.lib(),
        num_groups,
        correct: opt_lib(&corr),
        is_expert: opt_lib(&exp),
        advantages: a.lib_mut(),
        weights: w.lib_mut(),
        signs: c.lib_mut(),
    };
    let st =
        unsafe { calibrl::ffi::loss::calibrl_group_advantages(cfg.0, &args, std::ptr::null_mut()) };
    if st as i32 != 0 {
        return Err((st as i32, last_error()));
    }
    Ok(Adv {
        a: a.to_vec(),
        w: w.to_vec(),
        c: c.to_vec(),
    })
}

#[test]
fn worked_example_of_spec_section_3() {
    // Appendix E: [0,1,1,1] → |A| = [0.75, 0.25, 0.25, 0.25]; [1,0,0,0] gives the same weights.
    for rewards in [[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]] {
        let out = lib_adv("{}", &rewards, &[0, 0, 0, 0], 1, None, None, Dt::F64).unwrap();
        assert_vec_close("|A|", &out.w, &[0.75, 0.25, 0.25, 0.25], 0.0, 1e-15);
        let mu = rewards.iter().sum::<f64>() / 4.0;
        let a: Vec<f64> = rewards.iter().map(|r| r - mu).collect();
        assert_vec_close("A", &out.a, &a, 0.0, 1e-15);
        let c: Vec<f64> = rewards
            .iter()
            .map(|&r| if r > 0.1 { 1.0 } else { -1.0 })
            .collect();
        assert_eq!(out.c, c);
    }
    // With std normalisation: σ = 0.5 (unbiased), A = (r − μ)/(σ + ε).
    let out = lib_adv(
        r#"{"norm_by_std":true}"#,
        &[0.0, 1.0, 1.0, 1.0],
        &[0; 4],
        1,
        None,
        None,
        Dt::F64,
    )
    .unwrap();
    let s = 0.5 + 1e-6;
    assert_vec_close(
        "A/σ",
        &out.a,
        &[-0.75 / s, 0.25 / s, 0.25 / s, 0.25 / s],
        1e-14,
        0.0,
    );
}

#[test]
fn groups_of_one_use_mu_zero_sigma_one() {
    for norm in [false, true] {
        let json = format!(r#"{{"norm_by_std":{norm}}}"#);
        let rewards = [0.7, 0.0, 1.3, -0.4];
        let out = lib_adv(&json, &rewards, &[0, 1, 2, 3], 4, None, None, Dt::F64).unwrap();
        let want: Vec<f64> = rewards
            .iter()
            .map(|&r| if norm { r / (1.0 + 1e-6) } else { r })
            .collect();
        assert_vec_close(&format!("G=1 A {json}"), &out.a, &want, 1e-15, 0.0);
        let abs: Vec<f64> = want.iter().map(|a| a.abs()).collect();
        assert_vec_close("G=1 |A|", &out.w, &abs, 1e-15, 0.0);
    }
}

#[test]
fn advantages_match_reference_randomly() {
    for seed in 0..200u64 {
        let mut rng = Rng::new(seed);
        let b = rng.int(1, 30);
        let ng = rng.int(1, 6);
        let groups: Vec<i64> = (0..b).map(|_| rng.int(0, ng) as i64).collect();
        // Rewards in {0, 1} plus a format bonus, sometimes exactly τ.
        let rewards: Vec<f64> = (0..b)
            .map(|_| match rng.int(0, 4) {
                0 => 0.1,
                1 => rng.range(-0.5, 1.5),
                _ => rng.int(0, 2) as f64,
            })
            .collect();
        let correct: Option<Vec<bool>> = rng
            .bool(0.3)
            .then(|| (0..b).map(|_| rng.bool(0.5)).collect());
        let is_expert: Option<Vec<bool>> = rng
            .bool(0.5)
            .then(|| (0..b).map(|_| rng.bool(0.2)).collect());
        let json = format!(
            r#"{{"norm_by_std":{},"rarity_weighting":{},"correct_threshold":{},"adv_eps":{}}}"#,
            rng.bool(0.5),
            rng.bool(0.7),
            [0.1, 0.5, 0.0][rng.int(0, 3)],
            [1e-6, 1e-3][rng.int(0, 2)]
        );
        let cfg = config(&json);
        // An expert row whose group has no rollout has nothing to be compared with: the
        // library refuses it (docs: status INVALID_ARGUMENT naming `is_expert`).
        if let Some(e) = &is_expert {
            let orphan = (0..b).any(|i| e[i] && !(0..b).any(|j| !e[j] && groups[j] == groups[i]));
            if orphan {
                let err = lib_adv(
                    &json,
                    &rewards,
                    &groups,
                    ng as i64,
                    correct.as_deref(),
                    Some(e),
                    Dt::F64,
                )
                .err()
                .expect("an expert row without rollouts in its group is refused");
                assert_eq!(err.0, 2, "{err:?}");
                assert!(err.1.contains("`is_expert`"), "{err:?}");
                continue;
            }
        }
        let want = ref_group_advantages(
            &cfg,
            &rewards,
            &groups,
            ng,
            correct.as_deref(),
            is_expert.as_deref(),
        );
        for dt in [Dt::F64, Dt::F32] {
            let got = lib_adv(
                &json,
                &rewards,
                &groups,
                ng as i64,
                correct.as_deref(),
                is_expert.as_deref(),
                dt,
            )
            .unwrap();
            let (rtol, atol) = if dt == Dt::F64 {
                (1e-12, 1e-14)
            } else {
                (1e-6, 1e-7)
            };
            let what = format!("seed {seed} {json} {dt:?}");
            assert_vec_close(&format!("{what} A"), &got.a, &want.advantages, rtol, atol);
            assert_vec_close(&format!("{what} w"), &got.w, &want.weights, rtol, atol);
            assert_vec_close(&format!("{what} c"), &got.c, &want.signs, 0.0, 0.0);
        }
        // The Rust API gives the same.
        let rust = calibrl::rarity::group_advantages(
            &cfg,
            &rewards,
            &groups,
            ng,
            correct.as_deref(),
            is_expert.as_deref(),
        )
        .unwrap();
        assert_vec_close("rust A", &rust.advantages, &want.advantages, 1e-12, 1e-14);
        assert_vec_close("rust w", &rust.weights, &want.weights, 1e-12, 1e-14);
        assert_eq!(rust.signs, want.signs);
    }
}

#[test]
fn expert_rows_are_excluded_from_group_statistics() {
    // Group 0: rollouts [0, 1, 1] plus an expert row with reward 1; group 1: [1, 0] + expert 1.
    let rewards = [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0];
    let groups = [0, 0, 0, 0, 1, 1, 1];
    let expert = [false, false, false, true, false, false, true];
    let out = lib_adv("{}", &rewards, &groups, 2, None, Some(&expert), Dt::F64).unwrap();
    let mu0 = 2.0 / 3.0;
    let want = [-mu0, 1.0 - mu0, 1.0 - mu0, 1.0 - mu0, 0.5, -0.5, 0.5];
    assert_vec_close("A with expert rows", &out.a, &want, 1e-14, 1e-15);
    // Without the flag the expert row would shift the statistics: the test can tell.
    let plain = lib_adv("{}", &rewards, &groups, 2, None, None, Dt::F64).unwrap();
    assert!((plain.a[0] - want[0]).abs() > 0.05);
}

#[test]
fn groups_with_all_equal_rewards_get_exact_zeros() {
    // SPEC §3: A = 0 exactly, whatever the reward values (1.2155·8 / 8 rounds away from 1.2155).
    let mut rewards = vec![1.2155; 8];
    rewards.extend([0.3, 0.3, 0.3, 1.0]); // group 1: not all equal
    rewards.extend([-7.1e3; 3]); // group 2
    let mut groups = vec![0i64; 8];
    groups.extend([1, 1, 1, 1, 2, 2, 2]);
    for json in [r#"{"norm_by_std":true}"#, r#"{"norm_by_std":false}"#] {
        let out = lib_adv(json, &rewards, &groups, 3, None, None, Dt::F64).unwrap();
        let want = ref_group_advantages(&config(json), &rewards, &groups, 3, None, None);
        for i in (0..8).chain(12..15) {
            assert_eq!(
                out.a[i].to_bits(),
                0f64.to_bits(),
                "{json} row {i}: {}",
                out.a[i]
            );
            assert_eq!(out.w[i], 0.0);
            assert_eq!(want.advantages[i], 0.0);
        }
        assert!(out.a[8] != 0.0 && out.a[11] != 0.0);
        assert_vec_close(json, &out.a, &want.advantages, 1e-12, 1e-14);
    }
}

#[test]
fn explicit_correctness_overrides_the_threshold() {
    let rewards = [0.05, 0.1, 0.11, 0.9];
    // Threshold: c = +1 iff r > τ (strict).
    let out = lib_adv("{}", &rewards, &[0; 4], 1, None, None, Dt::F64).unwrap();
    assert_eq!(out.c, vec![-1.0, -1.0, 1.0, 1.0]);
    let out = lib_adv(
        r#"{"correct_threshold":0.5}"#,
        &rewards,
        &[0; 4],
        1,
        None,
        None,
        Dt::F64,
    )
    .unwrap();
    assert_eq!(out.c, vec![-1.0, -1.0, -1.0, 1.0]);
    let corr = [true, false, false, true];
    let out = lib_adv("{}", &rewards, &[0; 4], 1, Some(&corr), None, Dt::F64).unwrap();
    assert_eq!(out.c, vec![1.0, -1.0, -1.0, 1.0]);
    // Rarity weighting off: w = 1.
    let out = lib_adv(
        r#"{"rarity_weighting":false}"#,
        &rewards,
        &[0; 4],
        1,
        None,
        None,
        Dt::F64,
    )
    .unwrap();
    assert_eq!(out.w, vec![1.0; 4]);
}

fn case_for(seed: u64, layout: Layout, experts: usize) -> Case {
    let mut rng = Rng::new(seed);
    gen_case(
        &mut rng,
        &Gen {
            b: 9,
            layout,
            experts,
            expert_layout: if seed % 2 == 0 {
                Layout::Packed
            } else {
                Layout::Padded
            },
            ..Gen::default()
        },
    )
}

#[test]
fn lambda_zero_is_exactly_grpo() {
    for seed in 0..20u64 {
        for layout in [Layout::Packed, Layout::Padded] {
            let case = case_for(seed, layout, 2);
            for extra in [
                "",
                r#","delta_mode":"token_aligned""#,
                r#","kl_coef":0.1,"entropy_coef":0.01"#,
            ] {
                let cal = lib_loss(
                    &format!(r#"{{"lambda":0.0{extra}}}"#),
                    &case,
                    &CallOpts::default(),
                )
                .unwrap();
                let grpo = lib_loss(
                    &format!(r#"{{"preset":"grpo"{extra}}}"#),
                    &case,
                    &CallOpts::default(),
                )
                .unwrap();
                assert_eq!(cal.grad_l, grpo.grad_l, "seed {seed} {extra}: gradient");
                assert_eq!(
                    cal.grad_h, grpo.grad_h,
                    "seed {seed} {extra}: entropy gradient"
                );
                assert_eq!(cal.metrics[0], grpo.metrics[0], "seed {seed} {extra}: loss");
                assert_eq!(
                    cal.metrics[1], grpo.metrics[1],
                    "seed {seed} {extra}: pg_loss"
                );
                // And λ > 0 does change it (the test can fail).
                let lam = lib_loss(
                    &format!(r#"{{"lambda":0.3{extra}}}"#),
                    &case,
                    &CallOpts::default(),
                )
                .unwrap();
                assert_ne!(lam.grad_l, grpo.grad_l, "seed {seed}: λ has no effect");
            }
        }
    }
}

#[test]
fn all_equal_rewards_give_zero_exploration() {
    for seed in 0..20u64 {
        let mut case = case_for(seed, Layout::Packed, 2);
        let b = case.b.rows.len();
        // Two groups whose rewards are all equal (one all-correct, one all-wrong).
        let groups: Vec<i64> = (0..b).map(|i| (i % 2) as i64).collect();
        let rewards: Vec<f64> = (0..b).map(|i| if i % 2 == 0 { 1.0 } else { 0.0 }).collect();
        for mode in ["sequence", "token_aligned"] {
            for norm in [false, true] {
                let json =
                    format!(r#"{{"delta_mode":"{mode}","norm_by_std":{norm},"lambda":0.5}}"#);
                let adv = lib_adv(&json, &rewards, &groups, 2, None, None, Dt::F64).unwrap();
                assert!(adv.a.iter().all(|&a| a == 0.0), "A = 0: {:?}", adv.a);
                assert!(adv.w.iter().all(|&w| w == 0.0));
                case.b.adv = adv.a.clone();
                case.b.w = adv.w.clone();
                case.b.c = adv.c.clone();
                let out = lib_loss(&json, &case, &CallOpts::default()).unwrap();
                assert_eq!(out.metrics[2], 0.0, "explore_loss");
                assert_eq!(out.metrics[1], 0.0, "pg_loss");
                assert!(
                    out.grad_l.iter().all(|&g| g == 0.0),
                    "gradient {:?}",
                    out.grad_l
                );
            }
        }
    }
}

/// One rollout, one expert, on-policy, A = 0 (no PG gradient), w = 1: the gradient is the
/// exploration term's alone.
fn sign_case(c: f64, delta_per_token: f64, n: usize) -> Case {
    let logp: Vec<f64> = (0..n).map(|t| -1.0 - 0.1 * t as f64).collect();
    let elogp: Vec<f64> = logp.iter().map(|l| l - delta_per_token).collect();
    let mut rng = Rng::new(1);
    let mut case = gen_case(
        &mut rng,
        &Gen {
            b: 1,
            zero_len: false,
            holes: false,
            old: false,
            refl: false,
            ent: false,
            experts: 1,
            missing_expert: false,
            max_len: n,
            ..Gen::default()
        },
    );
    let b = &mut case.b;
    b.rows = std::iter::once(0..n).collect();
    case.offsets = vec![0, n as i64];
    b.logp = logp;
    b.mask = vec![1.0; n];
    case.mask_given = false;
    b.adv = vec![0.0];
    b.w = vec![1.0];
    b.c = vec![c];
    b.expert = Some(RefExpert {
        rows: std::iter::once(0..n).collect(),
        logp: elogp,
        mask: vec![1.0; n],
        index: vec![0],
    });
    case.expert_layout = Layout::Packed;
    case.expert_offsets = vec![0, n as i64];
    case.expert_mask_given = false;
    case
}

#[test]
fn sign_behaviour_of_spec_4_2() {
    let (lam, alpha, n) = (0.2, 0.3, 4);
    // (c, Δ per token, expected ∂L/∂ℓ per token / (λ·scale))
    let cases = [
        (1.0, -0.5, -1.0),   // correct, policy prefers the expert: pushed up at full slope
        (1.0, 0.5, -alpha),  // correct, past the expert: pushed up at slope α
        (-1.0, 0.5, 1.0),    // wrong, over-rated: pushed down at slope 1
        (-1.0, -0.5, alpha), // wrong, below the expert: pushed down at slope α
    ];
    for mode in ["sequence", "token_aligned"] {
        let json = format!(r#"{{"delta_mode":"{mode}","lambda":{lam},"alpha":{alpha}}}"#);
        for (c, d, slope) in cases {
            let case = sign_case(c, d, n);
            let out = lib_loss(&json, &case, &CallOpts::default()).unwrap();
            // Sequence: 1/N_seq = 1; token-aligned with token-mean: 1/N_tok.
            let scale = if mode == "sequence" {
                1.0
            } else {
                1.0 / n as f64
            };
            for &g in &out.grad_l {
                assert_close(
                    &format!("{mode} c={c} Δ={d}: dL/dl"),
                    g,
                    lam * slope * scale,
                    1e-14,
                    0.0,
                );
            }
            let delta = if mode == "sequence" { d * n as f64 } else { d };
            assert_close("mean_delta", out.metrics[8], delta, 1e-12, 1e-14);
        }
    }
}

/// Rows `lo..hi` of `case` as their own call (expert data shared, indices sliced).
fn slice_case(case: &Case, lo: usize, hi: usize) -> Case {
    let mut s = case.clone();
    let b = &case.b;
    let (t0, t1) = match case.layout {
        Layout::Packed if hi > lo => (b.rows[lo].start, b.rows[hi - 1].end),
        Layout::Packed => (0, 0),
        Layout::Padded => (lo * case.seq_len, hi * case.seq_len),
    };
    let take = |v: &Vec<f64>| v[t0..t1].to_vec();
    s.b.rows = b.rows[lo..hi]
        .iter()
        .map(|r| r.start - t0..r.end - t0)
        .collect();
    s.b.logp = take(&b.logp);
    s.b.mask = take(&b.mask);
    s.b.old = b.old.as_ref().map(take);
    s.b.refl = b.refl.as_ref().map(take);
    s.b.ent = b.ent.as_ref().map(take);
    s.b.adv = b.adv[lo..hi].to_vec();
    s.b.w = b.w[lo..hi].to_vec();
    s.b.c = b.c[lo..hi].to_vec();
    s.b.is_expert = b.is_expert[lo..hi].to_vec();
    if let Some(e) = &mut s.b.expert {
        e.index = e.index[lo..hi].to_vec();
    }
    s.offsets = std::iter::once(0)
        .chain(s.b.rows.iter().map(|r| r.end as i64))
        .collect();
    s
}

#[test]
fn slices_with_global_normalizers_add_up_to_the_whole() {
    let aggs = [
        r#""agg":"token-mean""#,
        r#""agg":"seq-mean-token-sum""#,
        r#""agg":"seq-mean-token-mean""#,
        r#""agg":"seq-mean-token-sum-norm","t_norm":40.0"#,
    ];
    for (k, agg) in aggs.iter().enumerate() {
        for mode in ["sequence", "token_aligned"] {
            for base in ["expert", "ref_policy"] {
                for loss in ["calibrl", "luffy"] {
                    let json = format!(
                        r#"{{"loss":"{loss}","delta_mode":"{mode}","baseline":"{base}",{agg},"kl_coef":0.05,"entropy_coef":0.01,"lambda":0.3}}"#
                    );
                    for layout in [Layout::Packed, Layout::Padded] {
                        let seed = 500 + k as u64 * 10 + layout as u64;
                        let mut rng = Rng::new(seed);
                        let mut whole = gen_case(
                            &mut rng,
                            &Gen {
                                b: 11,
                                layout,
                                expert_rows: loss == "luffy",
                                ..Gen::default()
                            },
                        );
                        let full = lib_loss(&json, &whole, &CallOpts::default()).unwrap();
                        let (tok, seq) = (full.metrics[13], full.metrics[14]);
                        whole.b.norm = Some((tok, seq));
                        // Uneven slices, one of them empty.
                        let cuts = [0usize, 3, 3, 4, 8, 11];
                        let mut sum = [0.0f64; 5];
                        let mut grad = vec![];
                        let mut gradh = vec![];
                        for w in cuts.windows(2) {
                            let part = slice_case(&whole, w[0], w[1]);
                            let out = lib_loss(&json, &part, &CallOpts::default()).unwrap();
                            for (s, v) in sum.iter_mut().zip(&out.metrics[..5]) {
                                *s += v;
                            }
                            grad.extend(out.grad_l);
                            gradh.extend(out.grad_h);
                        }
                        let what = format!("{json} {layout:?}");
                        for (i, name) in
                            ["loss", "pg_loss", "explore_loss", "entropy_loss", "kl_loss"]
                                .iter()
                                .enumerate()
                        {
                            assert_close(
                                &format!("{what}: Σ slices {name}"),
                                sum[i],
                                full.metrics[i],
                                1e-12,
                                1e-14,
                            );
                        }
                        assert_vec_close(
                            &format!("{what}: slice gradients"),
                            &grad,
                            &full.grad_l,
                            1e-12,
                            1e-15,
                        );
                        assert_vec_close(
                            &format!("{what}: slice entropy gradients"),
                            &gradh,
                            &full.grad_h,
                            1e-12,
                            1e-15,
                        );
                        // Without the global normalisers the slices do not add up (the test can
                        // tell) — except for the constant-denominator mode.
                        if !agg.contains("t_norm") {
                            whole.b.norm = None;
                            let part = slice_case(&whole, 0, 3);
                            let local = lib_loss(&json, &part, &CallOpts::default()).unwrap();
                            let n = slice_case(
                                &{
                                    let mut c = whole.clone();
                                    c.b.norm = Some((tok, seq));
                                    c
                                },
                                0,
                                3,
                            );
                            let global = lib_loss(&json, &n, &CallOpts::default()).unwrap();
                            assert_ne!(
                                local.metrics[0], global.metrics[0],
                                "{what}: normalisers ignored"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The Rust entry point `cpu::loss::compute` agrees with the C ABI and the reference.
#[test]
fn rust_api_matches_c_abi() {
    for seed in 0..10u64 {
        let case = case_for(seed, Layout::Packed, 2);
        for json in [
            r#"{"preset":"paper"}"#,
            r#"{"preset":"reference","kl_coef":0.1}"#,
        ] {
            let cfg = config(json);
            let b = &case.b;
            let batch = calibrl::cpu::loss::LossBatch {
                rows: b.rows.clone(),
                logprobs: b.logp.clone(),
                mask: b.mask.clone(),
                old_logprobs: b.old.clone(),
                ref_logprobs: b.refl.clone(),
                entropy: b.ent.clone(),
                token_weights: b.tw.clone(),
                advantages: b.adv.clone(),
                weights: b.w.clone(),
                signs: b.c.clone(),
                is_expert: Some(b.is_expert.clone()),
                expert: b
                    .expert
                    .as_ref()
                    .map(|e| calibrl::cpu::loss::ExpertBaseline {
                        rows: e.rows.clone(),
                        logprobs: e.logp.clone(),
                        mask: e.mask.clone(),
                        index: e.index.clone(),
                    }),
                normalizers: None,
            };
            let rust = calibrl::cpu::loss::compute(&cfg, &batch).unwrap();
            let abi = lib_loss(json, &case, &CallOpts::default()).unwrap();
            let want = ref_loss(&cfg, b);
            assert_vec_close(
                "rust vs abi grad",
                &rust.grad_logprobs,
                &abi.grad_l,
                0.0,
                0.0,
            );
            assert_vec_close(
                "rust vs abi metrics",
                &rust.metrics.to_array(),
                &abi.metrics,
                0.0,
                0.0,
            );
            assert_vec_close(
                "rust vs reference grad",
                &rust.grad_logprobs,
                &want.grad_l,
                1e-10,
                1e-12,
            );
        }
    }
}
