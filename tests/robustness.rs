//! Regression tests of the defects found by fuzzing the C ABI (issue #15): every one of them
//! returned OK with a wrong or out-of-bounds result, PANICked or aborted the process. Each
//! test calls the exports with tensors in buffers exactly the size their descriptors claim
//! and checks the status, the argument named, and that outputs are untouched on error.

mod common;

use calibrl::ffi::loss::{calibrl_group_advantages, CalibrlAdvantageArgs};
use calibrl::ffi::scheduler::{
    calibrl_plan_free, calibrl_scheduler_config_default, CalibrlPromptDesc, CalibrlSchedulerConfig,
};
use common::{
    cfg_new, gen_case, last_error, lib_loss, plan_new, CallOpts, Dt, Gen, Layout, Rng, Tensor,
};

const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 2;
const SHAPE_MISMATCH: i32 = 3;
const DTYPE_MISMATCH: i32 = 4;
const NON_FINITE: i32 = 6;
const PANIC: i32 = 10;
const LAYOUT_UNSUPPORTED: i32 = 12;

/// Asserts `status` is `want` with a message naming `arg`.
fn expect(status: i32, want: i32, arg: &str, what: &str) {
    let msg = last_error();
    assert_eq!(status, want, "{what}: status {status}, message {msg:?}");
    assert!(
        msg.contains(&format!("`{arg}")),
        "{what}: message {msg:?} does not name `{arg}`"
    );
}

/// Bit patterns of a tensor's bytes (to show an output was not touched).
fn bits(t: &Tensor) -> Vec<u8> {
    t.bytes().to_vec()
}

fn forward(logits: &Tensor, labels: &Tensor, temperature: f64, out: &mut [Tensor; 3]) -> i32 {
    let [lp, en, ls] = out;
    unsafe {
        calibrl::ffi::logits::calibrl_logits_forward(
            logits.lib(),
            labels.lib(),
            temperature,
            lp.lib_mut(),
            en.lib_mut(),
            ls.lib_mut(),
            std::ptr::null_mut(),
        ) as i32
    }
}

/// Out-of-place backward into `grad`; `ent_h`: saved entropy and ∂L/∂H.
fn backward(
    logits: &Tensor,
    labels: &Tensor,
    temperature: f64,
    lse: &Tensor,
    ent_h: Option<(&Tensor, &Tensor)>,
    g: &Tensor,
    grad: &mut Tensor,
) -> i32 {
    unsafe {
        calibrl::ffi::logits::calibrl_logits_backward(
            logits.lib(),
            labels.lib(),
            temperature,
            0,
            lse.lib(),
            ent_h.map_or(std::ptr::null(), |(e, _)| e.lib()),
            g.lib(),
            ent_h.map_or(std::ptr::null(), |(_, h)| h.lib()),
            grad.lib_mut(),
            std::ptr::null_mut(),
        ) as i32
    }
}

fn outputs(n: usize, dt: Dt) -> [Tensor; 3] {
    [
        Tensor::filled(-7.0, &[n], dt),
        Tensor::filled(-7.0, &[n], dt),
        Tensor::filled(-7.0, &[n], dt),
    ]
}

fn random_logits(rng: &mut Rng, n: usize, v: usize, dt: Dt) -> Tensor {
    let vals: Vec<f64> = (0..n * v).map(|_| rng.normal() * 3.0).collect();
    Tensor::new(&vals, &[n, v], dt)
}

// 1. An out-of-place grad_logits of another dtype than the logits got f32 rows: twice its size.
#[test]
fn backward_out_of_place_grad_logits_must_have_the_logits_dtype() {
    let mut rng = Rng::new(1);
    let (n, v) = (2, 8);
    let logits = random_logits(&mut rng, n, v, Dt::F32);
    let labels = Tensor::ints(&[1, 5], &[n], Dt::I64);
    let lse = Tensor::new(&[3.0, 3.0], &[n], Dt::F32);
    let g = Tensor::new(&[0.5, -0.25], &[n], Dt::F32);
    for dt in [Dt::BF16, Dt::F16] {
        // Exactly n·v two-byte elements: an f32 write would run past it.
        let mut grad = Tensor::filled(1.5, &[n, v], dt);
        let before = bits(&grad);
        let st = backward(&logits, &labels, 1.0, &lse, None, &g, &mut grad);
        expect(
            st,
            DTYPE_MISMATCH,
            "grad_logits",
            &format!("{dt:?} grad_logits"),
        );
        assert_eq!(bits(&grad), before, "{dt:?}: grad_logits was written");
    }
}

fn advantages_call(num_groups: i64) -> (i32, Vec<f64>) {
    let cfg = cfg_new("{}");
    let rewards = Tensor::new(&[1.0, 0.0, 0.0, 1.0], &[4], Dt::F32);
    let ids = Tensor::ints(&[0, 0, 1, 1], &[4], Dt::I64);
    let mut adv = Tensor::filled(9.0, &[4], Dt::F64);
    let mut w = Tensor::filled(9.0, &[4], Dt::F64);
    let mut c = Tensor::filled(9.0, &[4], Dt::F64);
    let args = CalibrlAdvantageArgs {
        rewards: rewards.lib(),
        group_ids: ids.lib(),
        num_groups,
        correct: std::ptr::null(),
        is_expert: std::ptr::null(),
        advantages: adv.lib_mut(),
        weights: w.lib_mut(),
        signs: c.lib_mut(),
    };
    let st = unsafe { calibrl_group_advantages(cfg.0, &args, std::ptr::null_mut()) as i32 };
    (st, [adv.to_vec(), w.to_vec(), c.to_vec()].concat())
}

// 2. num_groups sized an allocation: 2^40 aborted the process, i64::MAX PANICked.
#[test]
fn num_groups_never_sizes_an_allocation() {
    let (st, small) = advantages_call(2);
    assert_eq!(st, OK, "{}", last_error());
    // Group statistics only exist for the ids present: a huge bound gives the same result.
    for num_groups in [1i64 << 40, 1 << 58] {
        let (st, got) = advantages_call(num_groups);
        assert_eq!(st, OK, "num_groups {num_groups}: {}", last_error());
        assert_eq!(got, small, "num_groups {num_groups}");
    }
    let (st, got) = advantages_call(i64::MAX);
    expect(st, INVALID_ARGUMENT, "num_groups", "num_groups = i64::MAX");
    assert!(got.iter().all(|&x| x == 9.0), "outputs written on error");
}

fn plan_status(dp_ranks: u32, minibatch_prompts: u32, prompts: usize) -> i32 {
    let mut cfg: CalibrlSchedulerConfig = unsafe { std::mem::zeroed() };
    unsafe { calibrl_scheduler_config_default(&mut cfg) };
    cfg.dp_ranks = dp_ranks;
    cfg.minibatch_prompts = minibatch_prompts;
    let descs: Vec<CalibrlPromptDesc> = (0..prompts)
        .map(|_| CalibrlPromptDesc {
            prompt_len: 10,
            num_rollouts: 2,
            expert_len: -1,
        })
        .collect();
    let lens = vec![20u32; 2 * prompts];
    let (st, plan) = plan_new(&cfg, &descs, &lens);
    if st == OK {
        assert!(!plan.is_null());
        unsafe { calibrl_plan_free(plan) };
    } else {
        assert!(plan.is_null(), "plan written on error");
    }
    st
}

// 3. dp_ranks = 2^32 − 1 aborted the process (a 96 GiB allocation).
#[test]
fn dp_ranks_is_bounded_before_anything_is_allocated() {
    assert_eq!(plan_status(64, 2, 5), OK, "{}", last_error());
    expect(
        plan_status(u32::MAX, 2, 5),
        INVALID_ARGUMENT,
        "config.dp_ranks",
        "dp_ranks = 2^32 - 1",
    );
    // Ranks × passes (one per mini-batch + the no-grad pass) is bounded too.
    expect(
        plan_status(1 << 20, 1, 8),
        INVALID_ARGUMENT,
        "config.dp_ranks",
        "2^20 ranks x 9 passes",
    );
}

/// True when the kernel promises every allocation (then a failed one cannot be observed).
fn overcommit_always() -> bool {
    std::fs::read_to_string("/proc/sys/vm/overcommit_memory").is_ok_and(|s| s.trim() == "1")
}

// 4. Shapes too large to exist were accepted, then PANICked or aborted.
#[test]
fn shapes_too_large_to_exist_are_refused() {
    let labels = Tensor::ints(&[0, 1], &[2], Dt::I64);
    // [2, 2^61] f32: 2^64 bytes, more than the address space.
    let mut logits = Tensor::filled(0.0, &[2, 4], Dt::F32);
    logits.set_shape(&[2, 1 << 61]);
    let mut out = outputs(2, Dt::F32);
    let before: Vec<_> = out.iter().map(bits).collect();
    let st = forward(&logits, &labels, 1.0, &mut out);
    expect(st, SHAPE_MISMATCH, "logits", "logits [2, 2^61]");
    assert_eq!(out.iter().map(bits).collect::<Vec<_>>(), before);

    // Padded loss [1, 2^63 − 1] f64.
    let mut case = gen_case(
        &mut Rng::new(4),
        &Gen {
            b: 1,
            layout: Layout::Padded,
            experts: 0,
            old: false,
            refl: false,
            ent: false,
            ..Gen::default()
        },
    );
    case.mask_given = false;
    let huge = call_loss_with_logprobs_shape(&case, &[1, i64::MAX as usize]);
    assert_eq!(huge.0, SHAPE_MISMATCH, "loss [1, 2^63-1]: {}", huge.1);
    assert!(huge.1.contains("`logprobs"), "{}", huge.1);

    // A 3-D empty shape whose row-major strides overflow.
    let mut t = Tensor::filled(0.0, &[1], Dt::F32);
    t.set_shape(&[0, 1 << 62, 1 << 62]);
    let r = unsafe { calibrl::tensor::Tensor::from_raw(t.lib(), "x") };
    let e = r.expect_err("[0, 2^62, 2^62] accepted");
    assert_eq!(e.status as i32, SHAPE_MISMATCH, "{}", e.message);

    if overcommit_always() {
        eprintln!("vm.overcommit_memory = 1: skipping the 2^40-element cases");
        return;
    }
    // [2, 2^40] f32 (8 TiB): representable, but its 4 TiB working row cannot be had.
    logits.set_shape(&[2, 1 << 40]);
    let st = forward(&logits, &labels, 1.0, &mut out);
    assert!(st != OK && st != PANIC, "logits [2, 2^40]: status {st}");
    assert_eq!(out.iter().map(bits).collect::<Vec<_>>(), before);
    // Padded loss [1, 2^40] f64: its values cannot be read into memory.
    let big = call_loss_with_logprobs_shape(&case, &[1, 1 << 40]);
    assert!(big.0 != OK && big.0 != PANIC, "loss [1, 2^40]: {big:?}");
}

/// Loss arguments with only the required tensors; every optional one NULL.
fn required_loss_args(
    logp: &Tensor,
    adv: &Tensor,
    w: &Tensor,
    c: &Tensor,
) -> calibrl::ffi::loss::CalibrlLossArgs {
    calibrl::ffi::loss::CalibrlLossArgs {
        logprobs: logp.lib(),
        seq_offsets: std::ptr::null(),
        mask: std::ptr::null(),
        old_logprobs: std::ptr::null(),
        ref_logprobs: std::ptr::null(),
        entropy: std::ptr::null(),
        advantages: adv.lib(),
        weights: w.lib(),
        signs: c.lib(),
        is_expert: std::ptr::null(),
        expert_logprobs: std::ptr::null(),
        expert_offsets: std::ptr::null(),
        expert_mask: std::ptr::null(),
        expert_index: std::ptr::null(),
        normalizers: std::ptr::null(),
        grad_logprobs: std::ptr::null_mut(),
        grad_entropy: std::ptr::null_mut(),
        metrics: std::ptr::null_mut(),
        token_weights: std::ptr::null(),
    }
}

/// Calls the loss of `case` with the logprobs descriptor's shape replaced (its buffer stays
/// the case's own: only a call that validates before reading is safe).
fn call_loss_with_logprobs_shape(case: &common::Case, shape: &[usize]) -> (i32, String) {
    let cfg = cfg_new(r#"{"lambda":0.0}"#);
    let b = &case.b;
    let n = b.rows.len();
    let mut logp = Tensor::new(&b.logp, &case.token_shape(), Dt::F64);
    logp.set_shape(shape);
    let adv = Tensor::new(&b.adv, &[n], Dt::F64);
    let w = Tensor::new(&b.w, &[n], Dt::F64);
    let c = Tensor::new(&b.c, &[n], Dt::F64);
    let args = required_loss_args(&logp, &adv, &w, &c);
    let st = unsafe {
        calibrl::ffi::loss::calibrl_loss(cfg.0, &args, std::ptr::null_mut(), std::ptr::null_mut())
            as i32
    };
    (st, last_error())
}

/// An empty tensor whose data pointer is NULL (as PyTorch hands out for zero elements).
fn null_empty(shape: &[usize], dt: Dt) -> Tensor {
    let mut t = Tensor::filled(0.0, &[0], dt);
    t.set_shape(shape);
    t.desc.data = std::ptr::null_mut();
    t
}

fn empty_batch_metrics() -> (i32, calibrl::desc::metrics::CalibrlMetrics) {
    let cfg = cfg_new(r#"{"lambda":0.0}"#);
    let logp = null_empty(&[0, 5], Dt::F32);
    let mask = null_empty(&[0, 5], Dt::U8);
    let adv = null_empty(&[0], Dt::F32);
    let w = null_empty(&[0], Dt::F32);
    let c = null_empty(&[0], Dt::F32);
    let mut grad = null_empty(&[0, 5], Dt::F32);
    let args = calibrl::ffi::loss::CalibrlLossArgs {
        mask: mask.lib(),
        grad_logprobs: grad.lib_mut(),
        ..required_loss_args(&logp, &adv, &w, &c)
    };
    let mut m = calibrl::desc::metrics::CalibrlMetrics::default();
    let st = unsafe {
        calibrl::ffi::loss::calibrl_loss(cfg.0, &args, &mut m, std::ptr::null_mut()) as i32
    };
    (st, m)
}

// 5. Empty tensors with data = NULL built slices from a NULL pointer (undefined behaviour; a
// debug build aborts: run this file with `cargo test --test robustness` to see it).
#[test]
fn empty_tensors_with_null_data_are_never_dereferenced() {
    let (st, m) = empty_batch_metrics();
    assert_eq!(st, OK, "{}", last_error());
    assert!(m.to_array().iter().all(|v| v.is_finite()));
    // Logits: no rows at all.
    let logits = null_empty(&[0, 7], Dt::BF16);
    let labels = null_empty(&[0], Dt::I32);
    let mut out = [
        null_empty(&[0], Dt::F32),
        null_empty(&[0], Dt::F32),
        null_empty(&[0], Dt::F32),
    ];
    assert_eq!(
        forward(&logits, &labels, 1.0, &mut out),
        OK,
        "{}",
        last_error()
    );
}

// Minor: a batch of 0 rows reported num_tokens as −0.
#[test]
fn empty_batch_counts_are_positive_zero() {
    let (st, m) = empty_batch_metrics();
    assert_eq!(st, OK, "{}", last_error());
    for (name, v) in [
        ("num_tokens", m.num_tokens),
        ("num_seqs", m.num_seqs),
        ("loss", m.loss),
        ("mean_response_length", m.mean_response_length),
    ] {
        assert_eq!(v.to_bits(), 0f64.to_bits(), "{name} is {v:?}, not +0");
    }
}

// 6. A misaligned byte_offset (1 on f32) was accepted (undefined behaviour).
#[test]
fn misaligned_byte_offset_is_refused() {
    let mut rng = Rng::new(6);
    let logits = random_logits(&mut rng, 2, 8, Dt::F32);
    let labels = Tensor::ints(&[1, 2], &[2], Dt::I64);
    // The logits' element 0 starts one byte in: give it a buffer one element longer.
    let mut shifted = Tensor::filled(0.0, &[17], Dt::F32);
    shifted.bytes_mut()[1..65].copy_from_slice(&logits.bytes()[..64]);
    shifted.set_shape(&[2, 8]);
    shifted.desc.byte_offset = 1;
    let mut out = outputs(2, Dt::F32);
    let before: Vec<_> = out.iter().map(bits).collect();
    let st = forward(&shifted, &labels, 1.0, &mut out);
    expect(
        st,
        LAYOUT_UNSUPPORTED,
        "logits",
        "byte_offset 1 on f32 logits",
    );
    assert_eq!(out.iter().map(bits).collect::<Vec<_>>(), before);
    // An aligned offset is fine and reads the elements it points at.
    let mut aligned = Tensor::filled(0.0, &[18], Dt::F32);
    aligned.bytes_mut()[8..72].copy_from_slice(&logits.bytes()[..64]);
    aligned.set_shape(&[2, 8]);
    aligned.desc.byte_offset = 8;
    let mut a = outputs(2, Dt::F32);
    let mut b = outputs(2, Dt::F32);
    assert_eq!(
        forward(&aligned, &labels, 1.0, &mut a),
        OK,
        "{}",
        last_error()
    );
    assert_eq!(forward(&logits, &labels, 1.0, &mut b), OK);
    assert_eq!(
        a.iter().map(bits).collect::<Vec<_>>(),
        b.iter().map(bits).collect::<Vec<_>>()
    );
}

// 7. A finite, positive but tiny temperature (1e-40) returned OK with NaN results.
#[test]
fn temperature_whose_reciprocal_overflows_is_refused() {
    let mut rng = Rng::new(7);
    let logits = random_logits(&mut rng, 3, 16, Dt::F32);
    let labels = Tensor::ints(&[1, 2, 3], &[3], Dt::I64);
    for t in [1e-40, 1e-39, f64::MIN_POSITIVE] {
        let mut out = outputs(3, Dt::F32);
        let before: Vec<_> = out.iter().map(bits).collect();
        let st = forward(&logits, &labels, t, &mut out);
        expect(
            st,
            INVALID_ARGUMENT,
            "temperature",
            &format!("temperature {t:e}"),
        );
        assert_eq!(out.iter().map(bits).collect::<Vec<_>>(), before);
    }
    // A reciprocal that is finite but overflows once it scales the logits: refused too,
    // never NaN.
    let big = Tensor::new(&[1e10, 0.0, -1e10, 2.0], &[1, 4], Dt::F32);
    let one = Tensor::ints(&[3], &[1], Dt::I64);
    let mut out = outputs(1, Dt::F32);
    let st = forward(&big, &one, 1e-30, &mut out);
    expect(st, NON_FINITE, "logits", "logits 1e10 at temperature 1e-30");
    // A small temperature that works gives finite values.
    let mut out = outputs(3, Dt::F32);
    assert_eq!(
        forward(&logits, &labels, 1e-3, &mut out),
        OK,
        "{}",
        last_error()
    );
    assert!(out.iter().all(|t| t.to_vec().iter().all(|v| v.is_finite())));
}

// 8. NaN or −inf at a masked-out position of logprobs / expert_logprobs gave a NaN loss,
// explore loss and mean Δ. Masked positions must not matter at all.
#[test]
fn masked_positions_never_reach_any_value() {
    let configs = [
        r#"{"lambda":0.3}"#,
        r#"{"lambda":0.3,"delta_mode":"token_aligned"}"#,
        r#"{"lambda":0.3,"length_normalize":false}"#,
        r#"{"lambda":0.3,"baseline":"ref_policy","kl_coef":0.1,"entropy_coef":0.01}"#,
    ];
    let mut tested = 0;
    for seed in 0..24u64 {
        for layout in [Layout::Padded, Layout::Packed] {
            let mut case = gen_case(
                &mut Rng::new(seed),
                &Gen {
                    b: 4,
                    layout,
                    expert_layout: layout,
                    holes: true,
                    ..Gen::default()
                },
            );
            case.mask_given = true;
            case.expert_mask_given = case.b.expert.is_some();
            let masked: Vec<usize> = (0..case.b.mask.len())
                .filter(|&k| case.b.mask[k] == 0.0)
                .collect();
            let emasked: Vec<usize> = case
                .b
                .expert
                .as_ref()
                .map(|e| (0..e.mask.len()).filter(|&k| e.mask[k] == 0.0).collect())
                .unwrap_or_default();
            if masked.is_empty() && emasked.is_empty() {
                continue;
            }
            let with = |v: f64| {
                let mut c = case.clone();
                for &k in &masked {
                    c.b.logp[k] = v;
                    for arr in [&mut c.b.old, &mut c.b.refl, &mut c.b.ent]
                        .into_iter()
                        .flatten()
                    {
                        arr[k] = v;
                    }
                }
                if let Some(e) = &mut c.b.expert {
                    for &k in &emasked {
                        e.logp[k] = v;
                    }
                }
                c
            };
            for cfg in configs {
                let finite = lib_loss(cfg, &with(-3.5), &CallOpts::default())
                    .unwrap_or_else(|e| panic!("seed {seed} {cfg}: {e:?}"));
                assert!(finite.metrics.iter().all(|v| v.is_finite()));
                for bad in [f64::NAN, f64::NEG_INFINITY, f64::INFINITY] {
                    let got = lib_loss(cfg, &with(bad), &CallOpts::default())
                        .unwrap_or_else(|e| panic!("seed {seed} {cfg} {bad}: {e:?}"));
                    // Equal as numbers (+0 and −0 of an untouched sum compare equal).
                    assert_eq!(
                        got.metrics, finite.metrics,
                        "seed {seed} {cfg} {bad}: metrics"
                    );
                    assert_eq!(got.grad_l, finite.grad_l, "seed {seed} {cfg} {bad}: grad");
                    assert_eq!(got.grad_h, finite.grad_h, "seed {seed} {cfg} {bad}: grad_h");
                    tested += 1;
                }
            }
        }
    }
    assert!(tested > 100, "only {tested} cases had masked positions");
}

// Outputs are finite whenever the status is OK: results that overflow their dtype are an
// error that writes nothing (found by the fuzz targets' invariant).
#[test]
fn results_that_overflow_their_dtype_are_an_error_that_writes_nothing() {
    let mut rng = Rng::new(9);
    let logits = random_logits(&mut rng, 2, 8, Dt::F32);
    let labels = Tensor::ints(&[1, 2], &[2], Dt::I64);
    // ∂L/∂ℓ of 3e38 at temperature 0.5 gives ∂L/∂z ≈ 6e38·(1 − p): past the f32 range.
    let lse = Tensor::new(&[5.0, 5.0], &[2], Dt::F64);
    let g = Tensor::new(&[3e38, 1.0], &[2], Dt::F64);
    let mut grad = Tensor::filled(1.5, &[2, 8], Dt::F32);
    let before = bits(&grad);
    let st = backward(&logits, &labels, 0.5, &lse, None, &g, &mut grad);
    expect(st, NON_FINITE, "grad_logits", "grad_logprobs 3e38");
    assert_eq!(bits(&grad), before);
    // Log-probs of −1e5 do not fit float16 outputs.
    let wide = Tensor::new(&[0.0, 1e5, -1e5, 3.0], &[1, 4], Dt::F32);
    let mut out = outputs(1, Dt::F16);
    let before: Vec<_> = out.iter().map(bits).collect();
    let st = forward(&wide, &Tensor::ints(&[2], &[1], Dt::I64), 1.0, &mut out);
    expect(st, NON_FINITE, "logprobs", "float16 logprobs of -2e5");
    assert_eq!(out.iter().map(bits).collect::<Vec<_>>(), before);
}

// Found by the fuzz targets (after the defects above were fixed).

// A label whose logit is −inf has log-prob −inf: an f64 output took it and the call said OK.
#[test]
fn forward_never_returns_ok_with_an_infinite_log_prob() {
    let logits = Tensor::new(&[0.0, f64::NEG_INFINITY, 1.0], &[1, 3], Dt::F32);
    let labels = Tensor::ints(&[1], &[1], Dt::I64);
    let mut out = outputs(1, Dt::F64);
    let before: Vec<_> = out.iter().map(bits).collect();
    let st = forward(&logits, &labels, 1.0, &mut out);
    expect(st, NON_FINITE, "logprobs", "label at a -inf logit");
    assert_eq!(out.iter().map(bits).collect::<Vec<_>>(), before);
}

// An f64 entropy of 1e300 is infinite in the f32 computation: 0·inf gave NaN gradients.
#[test]
fn backward_parameters_must_be_finite_float32() {
    let mut rng = Rng::new(10);
    let logits = random_logits(&mut rng, 2, 4, Dt::F32);
    let labels = Tensor::ints(&[1, 2], &[2], Dt::I64);
    let lse = Tensor::new(&[4.0, 4.0], &[2], Dt::F64);
    let ent = Tensor::new(&[1e300, 1.0], &[2], Dt::F64);
    let g = Tensor::new(&[0.5, 0.5], &[2], Dt::F64);
    let h = Tensor::new(&[0.0, 0.0], &[2], Dt::F64);
    let mut grad = Tensor::filled(1.5, &[2, 4], Dt::F32);
    let before = bits(&grad);
    let st = backward(&logits, &labels, 1.0, &lse, Some((&ent, &h)), &g, &mut grad);
    expect(st, INVALID_ARGUMENT, "entropy", "entropy 1e300");
    assert_eq!(bits(&grad), before);
}

// A configuration read back from its own JSON was not always the same (1e-30 came back as
// 9.999999999999999e-31).
#[test]
fn config_json_round_trips_exactly() {
    let json = |cfg: &common::Cfg| {
        let mut buf = vec![0u8; 4096];
        let mut len = 0;
        let st = unsafe {
            calibrl::ffi::common::calibrl_config_to_json(
                cfg.0,
                buf.as_mut_ptr() as *mut _,
                buf.len(),
                &mut len,
            ) as i32
        };
        assert_eq!(st, OK, "{}", last_error());
        String::from_utf8(buf[..len].to_vec()).unwrap()
    };
    for v in [
        "1e-30",
        "0.1",
        "3.0000000000000004",
        "1.7976931348623157e308",
    ] {
        let first = json(&cfg_new(&format!(r#"{{"correct_threshold":{v}}}"#)));
        let second = json(&cfg_new(&first));
        assert_eq!(first, second, "{v}");
    }
}

// calibrl_status_name took a Rust enum: a C caller's unknown number was undefined behaviour.
#[test]
fn status_name_of_any_number() {
    for (n, want) in [
        (0, "CALIBRL_STATUS_OK"),
        (12, "CALIBRL_STATUS_LAYOUT_UNSUPPORTED"),
        (13, "CALIBRL_STATUS_UNKNOWN"),
        (-1, "CALIBRL_STATUS_UNKNOWN"),
        (i32::MAX, "CALIBRL_STATUS_UNKNOWN"),
    ] {
        let s = unsafe { std::ffi::CStr::from_ptr(calibrl::ffi::common::calibrl_status_name(n)) };
        assert_eq!(s.to_str().unwrap(), want);
    }
}

// Found by the fuzz target `loss` in its final run: an empty padded expert tensor
// `[2^63 − 222, 0]` (zero bytes, so it exists) made the loss hold one range per declared row:
// capacity overflow, PANIC (and 2^40 rows aborted).
#[test]
fn empty_padded_expert_rows_never_panic() {
    let cfg = cfg_new(r#"{"lambda":0.0}"#);
    let logp = Tensor::new(&[-1.0, -2.0, -0.5, -0.25], &[2, 2], Dt::F32);
    let row = Tensor::new(&[0.5, -0.5], &[2], Dt::F32);
    let weights = Tensor::new(&[0.5, 0.5], &[2], Dt::F32);
    let signs = Tensor::new(&[1.0, -1.0], &[2], Dt::F32);
    let index = Tensor::ints(&[-1, -1], &[2], Dt::I64);
    for rows in [i64::MAX as usize - 221, 1 << 40] {
        let expert = null_empty(&[rows, 0], Dt::F32);
        let mut grad = Tensor::filled(7.0, &[2, 2], Dt::F32);
        let args = calibrl::ffi::loss::CalibrlLossArgs {
            logprobs: logp.lib(),
            seq_offsets: std::ptr::null(),
            mask: std::ptr::null(),
            old_logprobs: std::ptr::null(),
            ref_logprobs: std::ptr::null(),
            entropy: std::ptr::null(),
            advantages: row.lib(),
            weights: weights.lib(),
            signs: signs.lib(),
            is_expert: std::ptr::null(),
            expert_logprobs: expert.lib(),
            expert_offsets: std::ptr::null(),
            expert_mask: std::ptr::null(),
            expert_index: index.lib(),
            normalizers: std::ptr::null(),
            grad_logprobs: grad.lib_mut(),
            grad_entropy: std::ptr::null_mut(),
            metrics: std::ptr::null_mut(),
            token_weights: std::ptr::null(),
        };
        let st = unsafe {
            calibrl::ffi::loss::calibrl_loss(
                cfg.0,
                &args,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ) as i32
        };
        expect(
            st,
            INVALID_ARGUMENT,
            "expert_logprobs",
            &format!("[{rows}, 0] expert rows"),
        );
        assert!(grad.to_vec().iter().all(|&x| x == 7.0), "written on error");
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 30 (second fuzzing pass): hostile descriptors, aliased outputs, values that make no
// sense. Each test failed on the code before the fix (a segfault, or OK with a wrong result).
// ---------------------------------------------------------------------------------------------

use calibrl::ffi::loss::{calibrl_loss, CalibrlLossArgs};
use calibrl::tensor::{DLTensor as LibDL, HostTensor};

/// A second descriptor of the same view (for aliasing), with its own shape and strides arrays.
struct View {
    shape: Vec<i64>,
    strides: Vec<i64>,
    desc: LibDL,
}

impl View {
    /// `len` f64 elements starting `first` elements into `base`'s data, with `stride`.
    fn f64s(base: &HostTensor, first: usize, len: usize, stride: i64) -> Box<View> {
        let mut v = Box::new(View {
            shape: vec![len as i64],
            strides: vec![stride],
            desc: unsafe { std::ptr::read(&base.desc) },
        });
        v.desc.ndim = 1;
        v.desc.shape = v.shape.as_mut_ptr();
        v.desc.strides = v.strides.as_mut_ptr();
        v.desc.byte_offset = (first * 8) as u64;
        v
    }
}

/// A small valid loss call (two packed rows of two tokens, entropy bonus on): its inputs and
/// outputs, each output in its own buffer filled with 7.
struct LossCall {
    logp: Box<HostTensor>,
    offsets: Box<HostTensor>,
    mask: Box<HostTensor>,
    old: Box<HostTensor>,
    ent: Box<HostTensor>,
    adv: Box<HostTensor>,
    w: Box<HostTensor>,
    c: Box<HostTensor>,
    grad_l: Box<HostTensor>,
    grad_h: Box<HostTensor>,
    metrics: Box<HostTensor>,
    norm: Option<calibrl::desc::metrics::CalibrlNormalizers>,
    _data: Vec<Vec<f64>>,
    _ints: Vec<i64>,
}

impl LossCall {
    fn new() -> LossCall {
        let mut data: Vec<Vec<f64>> = vec![
            vec![-0.5, -1.0, -0.2, -0.7],
            vec![1.0, 1.0, 1.0, 0.0],
            vec![-0.6, -0.9, -0.3, -0.7],
            vec![0.8, 1.1, 0.5, 0.9],
            vec![1.0, -1.0],
            vec![1.0, 1.0],
            vec![1.0, -1.0],
            vec![7.0; 4],
            vec![7.0; 4],
            vec![7.0; 16],
        ];
        let mut ints = vec![0i64, 2, 4];
        let t = |d: &mut Vec<f64>| {
            let n = d.len();
            HostTensor::f64(d, &[n])
        };
        LossCall {
            logp: t(&mut data[0]),
            mask: t(&mut data[1]),
            old: t(&mut data[2]),
            ent: t(&mut data[3]),
            adv: t(&mut data[4]),
            w: t(&mut data[5]),
            c: t(&mut data[6]),
            grad_l: t(&mut data[7]),
            grad_h: t(&mut data[8]),
            metrics: t(&mut data[9]),
            offsets: HostTensor::i64(&mut ints, &[3]),
            norm: None,
            _data: data,
            _ints: ints,
        }
    }

    /// Calls the loss with the given output descriptors (defaults: the call's own buffers).
    fn run(
        &mut self,
        grad_l: Option<*mut LibDL>,
        grad_h: Option<*mut LibDL>,
        metrics: Option<*mut LibDL>,
    ) -> i32 {
        let cfg = cfg_new(r#"{"preset":"grpo","entropy_coef":0.01}"#);
        let args = CalibrlLossArgs {
            logprobs: self.logp.as_ptr(),
            seq_offsets: self.offsets.as_ptr(),
            mask: self.mask.as_ptr(),
            old_logprobs: self.old.as_ptr(),
            ref_logprobs: std::ptr::null(),
            entropy: self.ent.as_ptr(),
            advantages: self.adv.as_ptr(),
            weights: self.w.as_ptr(),
            signs: self.c.as_ptr(),
            is_expert: std::ptr::null(),
            expert_logprobs: std::ptr::null(),
            expert_offsets: std::ptr::null(),
            expert_mask: std::ptr::null(),
            expert_index: std::ptr::null(),
            normalizers: self
                .norm
                .as_ref()
                .map_or(std::ptr::null(), |n| n as *const _),
            grad_logprobs: grad_l.unwrap_or(self.grad_l.as_mut_ptr()),
            grad_entropy: grad_h.unwrap_or(self.grad_h.as_mut_ptr()),
            metrics: metrics.unwrap_or(self.metrics.as_mut_ptr()),
            token_weights: std::ptr::null(),
        };
        let mut host = calibrl::desc::metrics::CalibrlMetrics::default();
        unsafe { calibrl_loss(cfg.0, &args, &mut host, std::ptr::null_mut()) as i32 }
    }

    /// Every value of the input and output buffers (to show nothing was written).
    fn snapshot(&self) -> Vec<Vec<u64>> {
        self._data
            .iter()
            .map(|d| d.iter().map(|v| v.to_bits()).collect())
            .collect()
    }

    fn set(&mut self, which: usize, k: usize, v: f64) {
        let d = &mut self._data[which];
        d[k] = v; // the descriptors point into these vectors (never reallocated)
    }
}

// Issue 30, defect 6: outputs that share memory were accepted, and one result was lost.
#[test]
fn loss_outputs_that_share_memory_are_refused() {
    let mut call = LossCall::new();
    assert_eq!(call.run(None, None, None), OK, "{}", last_error());

    // (what, the argument named, the output views replacing grad_logprobs, grad_entropy, metrics)
    type Outputs = Box<dyn Fn(&LossCall) -> [Option<Box<View>>; 3]>;
    let cases: Vec<(&str, &str, Outputs)> = vec![
        (
            "grad_entropy == grad_logprobs",
            "grad_entropy",
            Box::new(|c| [None, Some(View::f64s(&c.grad_l, 0, 4, 1)), None]),
        ),
        (
            "metrics overlapping grad_logprobs",
            "metrics",
            Box::new(|c| {
                [
                    None,
                    None,
                    Some(View::f64s(&c.metrics, 0, 16, 1)).map(|mut v| {
                        v.desc.data = c.grad_l.desc.data;
                        v.desc.byte_offset = 16; // elements 2.. of grad_logprobs, then past it
                        v
                    }),
                ]
            }),
        ),
        (
            "metrics with stride 0",
            "metrics",
            Box::new(|c| [None, None, Some(View::f64s(&c.metrics, 0, 16, 0))]),
        ),
        (
            "grad_logprobs over the logprobs input",
            "grad_logprobs",
            Box::new(|c| [Some(View::f64s(&c.logp, 0, 4, 1)), None, None]),
        ),
        (
            "grad_entropy over the entropy input",
            "grad_entropy",
            Box::new(|c| [None, Some(View::f64s(&c.ent, 0, 4, 1)), None]),
        ),
    ];
    for (what, arg, views) in cases {
        let mut v = views(&call);
        let before = call.snapshot();
        let p = |v: &mut Option<Box<View>>| v.as_mut().map(|v| &mut v.desc as *mut LibDL);
        let [a, b, m] = &mut v;
        let st = call.run(p(a), p(b), p(m));
        expect(st, INVALID_ARGUMENT, arg, what);
        assert!(last_error().contains("memory"), "{what}: {}", last_error());
        assert_eq!(call.snapshot(), before, "{what}: a buffer was written");
    }
    // A metrics view that steps over every other element of a 32-element buffer owns its
    // elements: accepted.
    let mut wide = vec![7.0f64; 32];
    let wide_t = HostTensor::f64(&mut wide, &[32]);
    let mut strided = View::f64s(&wide_t, 0, 16, 2);
    assert_eq!(
        call.run(None, None, Some(&mut strided.desc)),
        OK,
        "{}",
        last_error()
    );
}

// Issue 30, defect 6: forward `logprobs == lse` returned OK with one of them lost; an output
// over an input (d-logits over `lse`) was accepted too. In place over the logits stays fine.
#[test]
fn logits_outputs_that_share_memory_are_refused() {
    let mut rng = Rng::new(30);
    let logits = random_logits(&mut rng, 3, 5, Dt::F32);
    let labels = Tensor::ints(&[1, 4, 0], &[3], Dt::I64);
    let mut out = outputs(3, Dt::F32);
    let mut alias = Tensor::filled(-7.0, &[3], Dt::F32);
    let before = bits(&alias);
    let st = unsafe {
        calibrl::ffi::logits::calibrl_logits_forward(
            logits.lib(),
            labels.lib(),
            1.0,
            alias.lib_mut(),
            out[1].lib_mut(),
            alias.lib_mut(),
            std::ptr::null_mut(),
        ) as i32
    };
    expect(st, INVALID_ARGUMENT, "lse", "forward logprobs == lse");
    assert_eq!(bits(&alias), before);
    assert_eq!(forward(&logits, &labels, 1.0, &mut out), OK);
    // d-logits [3, 5] f32 in a buffer whose first elements are the saved lse [3] f32.
    let [_, _, lse] = &out;
    let g = Tensor::filled(1.0, &[3], Dt::F32);
    let mut grad = Tensor::filled(0.0, &[15], Dt::F32);
    grad.bytes_mut()[..12].copy_from_slice(&lse.bytes()[..12]);
    let mut lse_view = Tensor::filled(0.0, &[3], Dt::F32);
    lse_view.desc.data = grad.desc.data;
    grad.set_shape(&[3, 5]);
    let before = bits(&grad);
    let st = backward(&logits, &labels, 1.0, &lse_view, None, &g, &mut grad);
    expect(st, INVALID_ARGUMENT, "grad_logits", "d-logits over lse");
    assert_eq!(bits(&grad), before);
    // In place (the documented pair) still works.
    let mut inplace = Tensor::new(&logits.to_vec(), &[3, 5], Dt::F32);
    let st = unsafe {
        calibrl::ffi::logits::calibrl_logits_backward(
            inplace.lib(),
            labels.lib(),
            1.0,
            0,
            lse.lib(),
            std::ptr::null(),
            g.lib(),
            std::ptr::null(),
            inplace.lib_mut(),
            std::ptr::null_mut(),
        ) as i32
    };
    assert_eq!(st, OK, "{}", last_error());
}

// Issue 30, defect 6: advantages' outputs aliasing each other; interleaved columns of one
// buffer do not share memory and stay accepted.
#[test]
fn advantage_outputs_that_share_memory_are_refused() {
    let mut rewards = vec![1.0, 0.0, 1.0, 0.5];
    let mut ids = vec![0i64, 0, 1, 1];
    let r = HostTensor::f64(&mut rewards, &[4]);
    let g = HostTensor::i64(&mut ids, &[4]);
    let cfg = cfg_new("{}");
    let call = |a: *mut LibDL, w: *mut LibDL, s: *mut LibDL| unsafe {
        let args = CalibrlAdvantageArgs {
            rewards: r.as_ptr(),
            group_ids: g.as_ptr(),
            num_groups: 2,
            correct: std::ptr::null(),
            is_expert: std::ptr::null(),
            advantages: a,
            weights: w,
            signs: s,
        };
        calibrl_group_advantages(cfg.0, &args, std::ptr::null_mut()) as i32
    };
    let mut cols = vec![7.0f64; 12];
    let base = HostTensor::f64(&mut cols, &[12]);
    let mut views: Vec<Box<View>> = (0..3).map(|j| View::f64s(&base, j, 4, 3)).collect();
    let [a, w, s] = &mut views[..] else {
        unreachable!()
    };
    assert_eq!(
        call(&mut a.desc, &mut w.desc, &mut s.desc),
        OK,
        "{}",
        last_error()
    );
    let mut sep = vec![vec![0.0f64; 4]; 3];
    let mut st: Vec<Box<HostTensor>> = sep.iter_mut().map(|d| HostTensor::f64(d, &[4])).collect();
    let [sa, sw, ss] = &mut st[..] else {
        unreachable!()
    };
    assert_eq!(call(sa.as_mut_ptr(), sw.as_mut_ptr(), ss.as_mut_ptr()), OK);
    drop(st);
    for j in 0..3 {
        let col: Vec<f64> = (0..4).map(|i| cols[3 * i + j]).collect();
        assert_eq!(col, sep[j], "column {j}");
    }
    let before = cols.clone();
    let base = HostTensor::f64(&mut cols, &[12]);
    let mut a = View::f64s(&base, 0, 4, 3);
    let mut w = View::f64s(&base, 0, 4, 3);
    let mut s = View::f64s(&base, 2, 4, 3);
    let status = call(&mut a.desc, &mut w.desc, &mut s.desc);
    expect(status, INVALID_ARGUMENT, "weights", "weights == advantages");
    let mut s_over_rewards = View::f64s(&r, 0, 4, 1);
    let mut a2 = View::f64s(&base, 0, 4, 3);
    let mut w2 = View::f64s(&base, 1, 4, 3);
    let status = call(&mut a2.desc, &mut w2.desc, &mut s_over_rewards.desc);
    expect(
        status,
        INVALID_ARGUMENT,
        "signs",
        "signs over the rewards input",
    );
    drop(base);
    assert_eq!(cols, before, "outputs written on error");
}

// Issue 30, defect 5: a byte_offset of 2^47…2^63 on a valid pointer passed the overflow check
// and the call read (or wrote) unmapped memory: a segfault.
#[test]
fn byte_offsets_past_the_user_address_space_are_refused() {
    let mut rng = Rng::new(5);
    let logits = random_logits(&mut rng, 2, 4, Dt::F32);
    let labels = Tensor::ints(&[1, 2], &[2], Dt::I64);
    for shift in [47u32, 50, 56, 62, 63] {
        let mut far = Tensor::new(&logits.to_vec(), &[2, 4], Dt::F32);
        far.desc.byte_offset = 1u64 << shift;
        let mut out = outputs(2, Dt::F32);
        let before: Vec<_> = out.iter().map(bits).collect();
        let st = forward(&far, &labels, 1.0, &mut out);
        expect(
            st,
            INVALID_ARGUMENT,
            "logits",
            &format!("byte_offset 2^{shift}"),
        );
        assert!(last_error().contains("address space"), "{}", last_error());
        assert_eq!(out.iter().map(bits).collect::<Vec<_>>(), before);
        // An output too: nothing is written there either.
        let mut out = outputs(2, Dt::F32);
        out[2].desc.byte_offset = 1u64 << shift;
        let st = forward(&logits, &labels, 1.0, &mut out);
        expect(
            st,
            INVALID_ARGUMENT,
            "lse",
            &format!("lse byte_offset 2^{shift}"),
        );
    }
}

// Issue 30, defect 7: values that make no sense returned OK.
#[test]
fn loss_values_that_make_no_sense_are_refused() {
    // normalizers.token_count = 0 while tokens count: the PG term was silently 0.
    let mut call = LossCall::new();
    call.norm = Some(calibrl::desc::metrics::CalibrlNormalizers {
        token_count: 0.0,
        seq_count: 2.0,
        ..Default::default()
    });
    let before = call.snapshot();
    expect(
        call.run(None, None, None),
        INVALID_ARGUMENT,
        "normalizers.token_count",
        "token_count 0",
    );
    assert_eq!(call.snapshot(), before);
    call.norm = Some(calibrl::desc::metrics::CalibrlNormalizers {
        token_count: 3.0,
        seq_count: 0.0,
        ..Default::default()
    });
    expect(
        call.run(None, None, None),
        INVALID_ARGUMENT,
        "normalizers.seq_count",
        "seq_count 0 with 2 rows",
    );
    // Smaller than the call's own counts is allowed: a data-parallel factor folded in.
    call.norm = Some(calibrl::desc::metrics::CalibrlNormalizers {
        token_count: 3.0,
        seq_count: 1.0,
        ..Default::default()
    });
    assert_eq!(call.run(None, None, None), OK, "{}", last_error());
    call.norm = Some(calibrl::desc::metrics::CalibrlNormalizers {
        token_count: 30.0,
        seq_count: 4.0,
        ..Default::default()
    });
    assert_eq!(call.run(None, None, None), OK, "{}", last_error());

    // Negative rarity weights; log-probs above 0 (in any log-prob input).
    for (what, which, k, v, arg) in [
        ("negative weight", 5, 1, -0.5, "weights"),
        ("log-prob 5", 0, 2, 5.0, "logprobs"),
    ] {
        let mut call = LossCall::new();
        call.set(which, k, v);
        let before = call.snapshot();
        expect(call.run(None, None, None), INVALID_ARGUMENT, arg, what);
        assert_eq!(call.snapshot(), before, "{what}");
    }
    // At a masked position (index 3) anything goes; a hair above 0 is rounding.
    for (k, v) in [(3, 1e30), (1, 1e-4)] {
        let mut call = LossCall::new();
        call.set(0, k, v);
        assert_eq!(
            call.run(None, None, None),
            OK,
            "log-prob {v} at {k}: {}",
            last_error()
        );
    }
}

// Issue 30, defect 7: configuration values and JSON that made no sense were accepted, or
// failed without naming the key.
#[test]
fn config_values_that_make_no_sense_are_refused() {
    let status = |json: &str| {
        let c = std::ffi::CString::new(json).unwrap();
        let mut out = std::ptr::null_mut();
        let st = unsafe { calibrl::ffi::common::calibrl_config_new(c.as_ptr(), &mut out) } as i32;
        if !out.is_null() {
            unsafe { calibrl::ffi::common::calibrl_config_free(out) };
        }
        (st, out.is_null())
    };
    const INVALID_CONFIG: i32 = 7;
    let dup = format!(
        "{{{}}}",
        (0..200_000)
            .map(|_| r#""lambda": 0.1"#)
            .collect::<Vec<_>>()
            .join(",")
    );
    for (json, key) in [
        (r#"{"kl_cov_coef": -1}"#.to_string(), "kl_cov_coef"),
        (r#"{"lambda": NaN}"#.to_string(), "lambda"),
        (
            r#"{"alpha": 0.3, "lambda": -Infinity}"#.to_string(),
            "lambda",
        ),
        (
            r#"{"alpha": 0.3, "lambda": 0.2, "alpha": 0.4}"#.to_string(),
            "alpha",
        ),
        (dup, "lambda"),
    ] {
        let (st, untouched) = status(&json);
        expect(st, INVALID_CONFIG, key, &json[..json.len().min(60)]);
        assert!(untouched);
    }
}
