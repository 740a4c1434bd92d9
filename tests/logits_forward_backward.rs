//! `calibrl_logits_forward_backward` on the CPU backend: the bits of `calibrl_logits_forward`
//! followed by `calibrl_logits_backward` (f32 / bf16 / f16 logits, float32 / float64 row
//! outputs, odd V, ignored rows, extreme logits, temperature, entropy on or off, in place and
//! out of place), and bad input refused naming the argument with every output untouched.

mod common;

use calibrl::ffi::logits::calibrl_logits_forward_backward;
use common::*;

/// Random `[n, v]` logits rounded to `dt` (some ±1e4 and −∞ entries, never at the label) and
/// labels with row 0 ignored.
fn problem(rng: &mut Rng, n: usize, v: usize, dt: Dt) -> (Vec<f64>, Vec<i64>) {
    let labels: Vec<i64> = (0..n)
        .map(|k| if k == 0 { -1 } else { rng.int(0, v) as i64 })
        .collect();
    let z: Vec<f64> = (0..n * v)
        .map(|i| {
            let r = rng.f64();
            if i % v == labels[i / v].max(0) as usize || r > 0.08 {
                3.0 * rng.normal()
            } else if r < 0.04 {
                f64::NEG_INFINITY
            } else if rng.bool(0.5) {
                1e4
            } else {
                -1e4
            }
        })
        .collect();
    (quant_vec(&z, dt), labels)
}

/// The call's tensors: inputs, outputs (NaN-filled), and whether each optional one is passed.
struct Call {
    logits: Tensor,
    labels: Tensor,
    temperature: f64,
    grad_logprobs: Tensor,
    grad_entropy: Option<Tensor>,
    logprobs: Tensor,
    entropy: Option<Tensor>,
    lse: Tensor,
    /// `None`: in place (`grad_logits` is `logits`).
    grad_logits: Option<Tensor>,
}

impl Call {
    fn run(&mut self) -> Result<(), (i32, String)> {
        let logits = self.logits.lib();
        let grad_logits = match &mut self.grad_logits {
            Some(t) => t.lib_mut(),
            None => self.logits.lib_mut(),
        };
        // SAFETY: every descriptor points at live host memory of its stated shape.
        let st = unsafe {
            calibrl_logits_forward_backward(
                logits,
                self.labels.lib(),
                self.temperature,
                self.grad_logprobs.lib(),
                opt_lib(&self.grad_entropy),
                self.logprobs.lib_mut(),
                opt_lib_mut(&mut self.entropy),
                self.lse.lib_mut(),
                grad_logits,
                std::ptr::null_mut(),
            )
        };
        match st as i32 {
            0 => Ok(()),
            s => Err((s, last_error())),
        }
    }

    /// Every byte the call may write.
    fn outputs(&self) -> Vec<Vec<u8>> {
        let mut out = vec![
            self.logits.bytes().to_vec(),
            self.logprobs.bytes().to_vec(),
            self.lse.bytes().to_vec(),
        ];
        out.extend(self.entropy.iter().map(|t| t.bytes().to_vec()));
        out.extend(self.grad_logits.iter().map(|t| t.bytes().to_vec()));
        out
    }
}

fn bits_equal(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(a.to_bits() == b.to_bits(), "{what}[{i}]: {a} vs {b}");
    }
}

#[test]
fn equals_forward_then_backward() {
    let mut rng = Rng::new(35);
    let mut cases = 0;
    for dt in [Dt::F32, Dt::BF16, Dt::F16] {
        for &v in &[1usize, 5, 37, 1001] {
            for (i, &temperature) in [1.0, 1.7, 0.6].iter().enumerate() {
                let n = 7;
                let (z, labels) = problem(&mut rng, n, v, dt);
                let g: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
                let h: Vec<f64> = (0..n).map(|_| 0.1 * rng.normal()).collect();
                let out_dt = if i % 2 == 0 { Dt::F32 } else { Dt::F64 };
                let label_dt = if i == 2 { Dt::I32 } else { Dt::I64 };
                let zt = Tensor::new(&z, &[n, v], dt);
                let lt = Tensor::ints(&labels, &[n], label_dt);
                let want = lib_logits_forward_dt(&zt, &lt, temperature, out_dt).unwrap();
                // entropy: 0 none, 1 written but no grad_entropy, 2 both.
                for entropy in 0..3 {
                    let mut want_grad = Tensor::filled(f64::NAN, &[n, v], dt);
                    lib_logits_backward(
                        &mut Tensor::new(&z, &[n, v], dt),
                        &lt,
                        temperature,
                        0,
                        &want.lse,
                        &want.ent,
                        &g,
                        (entropy == 2).then_some(&h[..]),
                        Some(&mut want_grad),
                    )
                    .unwrap();
                    for in_place in [false, true] {
                        let what = format!(
                            "{dt:?} V={v} T={temperature} out {out_dt:?} entropy {entropy} \
                             in place {in_place}"
                        );
                        let mut call = Call {
                            logits: Tensor::new(&z, &[n, v], dt),
                            labels: Tensor::ints(&labels, &[n], label_dt),
                            temperature,
                            grad_logprobs: Tensor::new(&g, &[n], Dt::F64),
                            grad_entropy: (entropy == 2).then(|| Tensor::new(&h, &[n], Dt::F64)),
                            logprobs: Tensor::filled(f64::NAN, &[n], out_dt),
                            entropy: (entropy > 0).then(|| Tensor::filled(f64::NAN, &[n], out_dt)),
                            lse: Tensor::filled(f64::NAN, &[n], out_dt),
                            grad_logits: (!in_place).then(|| Tensor::filled(f64::NAN, &[n, v], dt)),
                        };
                        call.run().unwrap_or_else(|e| panic!("{what}: {e:?}"));
                        bits_equal(
                            &format!("{what}: logprobs"),
                            &call.logprobs.to_vec(),
                            &want.logp,
                        );
                        bits_equal(&format!("{what}: lse"), &call.lse.to_vec(), &want.lse);
                        if let Some(e) = &call.entropy {
                            bits_equal(&format!("{what}: entropy"), &e.to_vec(), &want.ent);
                        }
                        let grad = match &call.grad_logits {
                            Some(t) => {
                                assert_eq!(
                                    call.logits.bytes(),
                                    zt.bytes(),
                                    "{what}: logits changed"
                                );
                                t.to_vec()
                            }
                            None => call.logits.to_vec(),
                        };
                        bits_equal(&format!("{what}: grad_logits"), &grad, &want_grad.to_vec());
                        cases += 1;
                    }
                }
            }
        }
    }
    assert_eq!(cases, 3 * 4 * 3 * 3 * 2);
}

/// One valid call (f32 logits, f32 row outputs, out of place) to break one argument of.
fn valid_call() -> Call {
    let mut rng = Rng::new(7);
    let (n, v) = (4, 9);
    let (z, labels) = problem(&mut rng, n, v, Dt::F32);
    let g: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Call {
        logits: Tensor::new(&z, &[n, v], Dt::F32),
        labels: Tensor::ints(&labels, &[n], Dt::I64),
        temperature: 1.0,
        grad_logprobs: Tensor::new(&g, &[n], Dt::F32),
        grad_entropy: Some(Tensor::new(&g, &[n], Dt::F32)),
        logprobs: Tensor::filled(-7.0, &[n], Dt::F32),
        entropy: Some(Tensor::filled(-7.0, &[n], Dt::F32)),
        lse: Tensor::filled(-7.0, &[n], Dt::F32),
        grad_logits: Some(Tensor::filled(-7.0, &[n, v], Dt::F32)),
    }
}

#[test]
fn bad_input_is_refused_by_name_with_outputs_untouched() {
    const NULL: i32 = 1;
    const INVALID: i32 = 2;
    const SHAPE: i32 = 3;
    const DTYPE: i32 = 4;
    const NON_FINITE: i32 = 6;
    type Break = fn(&mut Call);
    let cases: Vec<(&str, Break, i32, &str)> = vec![
        (
            "f16 logprobs",
            |c| c.logprobs = Tensor::filled(0.0, &[4], Dt::F16),
            DTYPE,
            "logprobs",
        ),
        (
            "bf16 lse",
            |c| c.lse = Tensor::filled(0.0, &[4], Dt::BF16),
            DTYPE,
            "lse",
        ),
        (
            "f16 entropy",
            |c| c.entropy = Some(Tensor::filled(0.0, &[4], Dt::F16)),
            DTYPE,
            "entropy",
        ),
        (
            "grad_entropy without entropy",
            |c| c.entropy = None,
            NULL,
            "entropy",
        ),
        (
            "short lse",
            |c| c.lse = Tensor::filled(0.0, &[3], Dt::F32),
            SHAPE,
            "lse",
        ),
        (
            "short labels",
            |c| c.labels = Tensor::ints(&[1, 2, 3], &[3], Dt::I64),
            SHAPE,
            "labels",
        ),
        ("label past V", |c| c.labels.set(2, 9.0), INVALID, "labels"),
        (
            "f16 grad_logits",
            |c| c.grad_logits = Some(Tensor::filled(0.0, &[4, 9], Dt::F16)),
            DTYPE,
            "grad_logits",
        ),
        (
            "grad_logits shape",
            |c| c.grad_logits = Some(Tensor::filled(0.0, &[4, 8], Dt::F32)),
            SHAPE,
            "grad_logits",
        ),
        (
            "temperature 0",
            |c| c.temperature = 0.0,
            INVALID,
            "temperature",
        ),
        (
            "NaN grad_logprobs",
            |c| c.grad_logprobs.set(1, f64::NAN),
            NON_FINITE,
            "grad_logprobs",
        ),
        (
            "inf grad_entropy",
            |c| c.grad_entropy.as_mut().unwrap().set(3, f64::INFINITY),
            NON_FINITE,
            "grad_entropy",
        ),
        (
            "NaN logits",
            |c| c.logits.set(14, f64::NAN),
            NON_FINITE,
            "logits",
        ),
        (
            "overflowing gradient",
            |c| c.grad_logprobs.set(1, 3e38),
            NON_FINITE,
            "grad_logits",
        ),
    ];
    for (what, break_it, status, name) in cases {
        let mut call = valid_call();
        break_it(&mut call);
        let before = call.outputs();
        let (st, msg) = call.run().expect_err(what);
        assert_eq!(st, status, "{what}: {msg}");
        assert!(msg.contains(&format!("`{name}`")), "{what}: {msg}");
        assert!(call.outputs() == before, "{what}: an output was written");
    }
    // NULL required pointers, one at a time.
    for name in [
        "logits",
        "labels",
        "grad_logprobs",
        "logprobs",
        "lse",
        "grad_logits",
    ] {
        let mut c = valid_call();
        let before = c.outputs();
        let null = std::ptr::null_mut::<calibrl::tensor::DLTensor>();
        let grad = c.grad_logits.as_mut().map_or(null, |t| t.lib_mut());
        // SAFETY: every non-NULL descriptor points at live host memory of its stated shape.
        let st = unsafe {
            calibrl_logits_forward_backward(
                if name == "logits" {
                    null
                } else {
                    c.logits.lib_mut()
                },
                if name == "labels" {
                    null
                } else {
                    c.labels.lib()
                },
                1.0,
                if name == "grad_logprobs" {
                    null
                } else {
                    c.grad_logprobs.lib()
                },
                opt_lib(&c.grad_entropy),
                if name == "logprobs" {
                    null
                } else {
                    c.logprobs.lib_mut()
                },
                opt_lib_mut(&mut c.entropy),
                if name == "lse" { null } else { c.lse.lib_mut() },
                if name == "grad_logits" { null } else { grad },
                std::ptr::null_mut(),
            )
        };
        let msg = last_error();
        assert_eq!(st as i32, NULL, "NULL {name}: {msg}");
        assert!(msg.contains(&format!("`{name}`")), "NULL {name}: {msg}");
        assert!(c.outputs() == before, "NULL {name}: an output was written");
    }
    // The unbroken call succeeds and writes (the checks above can fail).
    let mut ok = valid_call();
    let before = ok.outputs();
    ok.run().unwrap();
    assert!(ok.outputs() != before);
}
