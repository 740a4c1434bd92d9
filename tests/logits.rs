//! The fused logits path (SPEC §6) against the f64 reference: forward ℓ, H, lse for f32 / bf16 /
//! f16 logits and V ∈ {1, 5, 1000, 32000} with extreme and −∞ entries, temperature ≠ 1 and
//! ignored rows; the backward against central finite differences of the reference forward and
//! against the analytic reference; in-place = out-of-place; the two-phase vocabulary-shard form.

mod common;

use common::reference::{ref_logits_backward, ref_logits_forward};
use common::*;

/// Random `[n, v]` logits (as f64, already rounded to `dt`) and labels. `extreme`: some ±1e4
/// entries and −∞ entries (never at the label). Row 0 is ignored (label −1) when `ignore`.
fn gen_logits(
    rng: &mut Rng,
    n: usize,
    v: usize,
    dt: Dt,
    extreme: bool,
    ignore: bool,
) -> (Vec<f64>, Vec<i64>) {
    let mut z: Vec<f64> = (0..n * v).map(|_| 3.0 * rng.normal()).collect();
    let labels: Vec<i64> = (0..n)
        .map(|k| {
            if ignore && k == 0 && n > 1 {
                -1
            } else {
                rng.int(0, v) as i64
            }
        })
        .collect();
    if extreme {
        for k in 0..n {
            for j in 0..v {
                if j as i64 == labels[k] {
                    continue;
                }
                let r = rng.f64();
                if r < 0.05 {
                    z[k * v + j] = f64::NEG_INFINITY;
                } else if r < 0.08 {
                    z[k * v + j] = if rng.bool(0.5) { 1e4 } else { -1e4 };
                }
            }
            // Sometimes the label itself is extreme.
            if rng.bool(0.3) {
                z[k * v + labels[k].max(0) as usize] = if rng.bool(0.5) { 1e4 } else { -1e4 };
            }
        }
    }
    (quant_vec(&z, dt), labels)
}

fn max_abs_finite(z: &[f64]) -> f64 {
    z.iter()
        .filter(|x| x.is_finite())
        .fold(0.0, |a, &x| a.max(x.abs()))
}

#[test]
fn forward_matches_reference() {
    let mut calls = 0;
    for dt in [Dt::F32, Dt::BF16, Dt::F16] {
        for &v in &[1usize, 5, 1000, 32000] {
            for &temp in &[1.0, 0.7, 1.6] {
                for extreme in [false, true] {
                    if dt == Dt::F16 && extreme {
                        // ±1e4 is representable in f16 (max 65504); keep it.
                    }
                    let n = if v >= 32000 { 3 } else { 6 };
                    let mut rng = Rng::new(v as u64 * 31 + (temp * 10.0) as u64 + extreme as u64);
                    let (z, labels) = gen_logits(&mut rng, n, v, dt, extreme && v > 1, true);
                    let zt = Tensor::new(&z, &[n, v], dt);
                    let lt =
                        Tensor::ints(&labels, &[n], if v % 2 == 0 { Dt::I64 } else { Dt::I32 });
                    let out_dt = if extreme { Dt::F64 } else { Dt::F32 };
                    let got = lib_logits_forward_dt(&zt, &lt, temp, out_dt).unwrap();
                    let want = ref_logits_forward(&z, n, v, &labels, temp);
                    let scale = 1.0 + max_abs_finite(&z) / temp;
                    let what = format!("{dt:?} V={v} T={temp} extreme={extreme}");
                    assert_vec_close(
                        &format!("{what}: logprobs"),
                        &got.logp,
                        &want.logp,
                        1e-6,
                        1e-6 * scale,
                    );
                    assert_vec_close(
                        &format!("{what}: entropy"),
                        &got.ent,
                        &want.ent,
                        1e-6,
                        1e-6 * scale,
                    );
                    assert_vec_close(
                        &format!("{what}: lse"),
                        &got.lse,
                        &want.lse,
                        1e-6,
                        1e-6 * scale,
                    );
                    // Ignored row: zeros.
                    if n > 1 {
                        assert_eq!(
                            (got.logp[0], got.ent[0], got.lse[0]),
                            (0.0, 0.0, 0.0),
                            "{what}: ignored row"
                        );
                    }
                    calls += 1;
                }
            }
        }
    }
    eprintln!("{calls} forward calls checked");
}

/// Σ g·ℓ + Σ h·H of the f64 reference forward.
fn objective(
    z: &[f64],
    n: usize,
    v: usize,
    labels: &[i64],
    temp: f64,
    g: &[f64],
    h: &[f64],
) -> f64 {
    let f = ref_logits_forward(z, n, v, labels, temp);
    (0..n).map(|k| g[k] * f.logp[k] + h[k] * f.ent[k]).sum()
}

#[allow(clippy::too_many_arguments)]
fn lib_backward_out_of_place(
    z: &[f64],
    dt: Dt,
    n: usize,
    v: usize,
    labels: &[i64],
    temp: f64,
    g: &[f64],
    h: &[f64],
) -> Vec<f64> {
    let mut zt = Tensor::new(z, &[n, v], dt);
    let lt = Tensor::ints(labels, &[n], Dt::I64);
    let fwd = lib_logits_forward(&zt, &lt, temp).unwrap();
    let mut out = Tensor::filled(f64::NAN, &[n, v], dt);
    lib_logits_backward(
        &mut zt,
        &lt,
        temp,
        0,
        &fwd.lse,
        &fwd.ent,
        g,
        Some(h),
        Some(&mut out),
    )
    .unwrap();
    // The input logits are untouched by an out-of-place backward.
    assert_eq!(zt.to_vec(), quant_vec(z, dt));
    out.to_vec()
}

#[test]
fn backward_matches_finite_differences_and_analytic_reference() {
    for &v in &[5usize, 1000] {
        for &temp in &[0.7, 1.3] {
            let n = 4;
            let mut rng = Rng::new(v as u64 + 1000 * (temp * 10.0) as u64);
            let (z, labels) = gen_logits(&mut rng, n, v, Dt::F32, false, true);
            let g: Vec<f64> = (0..n).map(|_| quant(rng.normal(), Dt::F32)).collect();
            let h: Vec<f64> = (0..n).map(|_| quant(rng.normal(), Dt::F32)).collect();
            let got = lib_backward_out_of_place(&z, Dt::F32, n, v, &labels, temp, &g, &h);
            let analytic = ref_logits_backward(&z, n, v, &labels, temp, &g, &h);
            let what = format!("V={v} T={temp}");
            let gmax = analytic.iter().fold(0.0f64, |a, &x| a.max(x.abs()));
            assert_vec_close(
                &format!("{what}: backward vs analytic"),
                &got,
                &analytic,
                1e-5,
                1e-6 * gmax,
            );
            let mut x = z.clone();
            for i in 0..n * v {
                let fd = central_diff(&mut x, i, 1e-6, |x| {
                    objective(x, n, v, &labels, temp, &g, &h)
                });
                // FD and the analytic reference agree (the reference itself is right; FD
                // round-off is ε·|objective|/h ≈ 1e-8 for V = 1000) ...
                assert_close(
                    &format!("{what}: analytic vs FD [{i}]"),
                    analytic[i],
                    fd,
                    1e-5,
                    1e-7 * gmax.max(1.0),
                );
                // ... and the library's f32 backward agrees with the FD.
                assert_close(
                    &format!("{what}: library vs FD [{i}]"),
                    got[i],
                    fd,
                    1e-3,
                    1e-5 * gmax,
                );
            }
            // Ignored row 0: zero gradient.
            assert!(
                got[..v].iter().all(|&x| x == 0.0),
                "{what}: ignored row gradient"
            );
        }
    }
}

#[test]
fn backward_with_extreme_logits_and_reduced_precision() {
    for dt in [Dt::F32, Dt::BF16, Dt::F16] {
        for &v in &[1usize, 5, 1000] {
            let n = 5;
            let temp = 0.8;
            let mut rng = Rng::new(77 + v as u64);
            let (z, labels) = gen_logits(&mut rng, n, v, dt, v > 1, true);
            let g: Vec<f64> = (0..n).map(|_| quant(rng.normal(), Dt::F32)).collect();
            let h: Vec<f64> = (0..n).map(|_| quant(rng.normal(), Dt::F32)).collect();
            let got = lib_backward_out_of_place(&z, dt, n, v, &labels, temp, &g, &h);
            let want = ref_logits_backward(&z, n, v, &labels, temp, &g, &h);
            let f = ref_logits_forward(&z, n, v, &labels, temp);
            assert!(
                got.iter().all(|x| x.is_finite()),
                "{dt:?} V={v}: non-finite d-logits"
            );
            // The CPU backward runs in f32 arithmetic (u = z/T and lse rounded to f32), so each
            // element may be off by its sensitivity to a rounding δ of (u − lse):
            // (1/T)·p·(|g| + |h|·(1 + |u − lse + H|))·δ, δ ≈ 2 ulp of max(|u|, |lse|); plus
            // the output dtype's rounding.
            let out_rtol = match dt {
                Dt::F32 => 1e-5,
                _ => 1e-2,
            };
            for k in 0..n {
                for j in 0..v {
                    let i = k * v + j;
                    if labels[k] < 0 {
                        assert_eq!(got[i], 0.0);
                        continue;
                    }
                    let u = z[i] / temp;
                    let p = if u == f64::NEG_INFINITY {
                        0.0
                    } else {
                        (u - f.lse[k]).exp()
                    };
                    let shift = if p > 0.0 {
                        (u - f.lse[k] + f.ent[k]).abs()
                    } else {
                        0.0
                    };
                    let delta = 2.4e-7 * u.abs().max(f.lse[k].abs()).clamp(1.0, 1e30);
                    let bound = p * (g[k].abs() + h[k].abs() * (1.0 + shift)) * delta / temp;
                    assert!(
                        (got[i] - want[i]).abs() <= bound + out_rtol * want[i].abs() + 1e-7,
                        "{dt:?} V={v} [{k},{j}]: got {} want {} (bound {bound:e})",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
}

#[test]
fn in_place_backward_equals_out_of_place() {
    for dt in [Dt::F32, Dt::BF16, Dt::F16] {
        for &v in &[5usize, 1000] {
            let (n, temp) = (6, 1.7);
            let mut rng = Rng::new(5 + v as u64);
            let (z, labels) = gen_logits(&mut rng, n, v, dt, true, true);
            let g: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let h: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let out = lib_backward_out_of_place(&z, dt, n, v, &labels, temp, &g, &h);
            let mut zt = Tensor::new(&z, &[n, v], dt);
            let lt = Tensor::ints(&labels, &[n], Dt::I64);
            let fwd = lib_logits_forward(&zt, &lt, temp).unwrap();
            lib_logits_backward(
                &mut zt,
                &lt,
                temp,
                0,
                &fwd.lse,
                &fwd.ent,
                &g,
                Some(&h),
                None,
            )
            .unwrap();
            let inplace = zt.to_vec();
            for (i, (a, b)) in inplace.iter().zip(&out).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "{dt:?} V={v} [{i}]: in place {a} vs out of place {b}"
                );
            }
        }
    }
}

/// Columns `[a, b)` of `[n, v]` row-major data.
fn columns(z: &[f64], n: usize, v: usize, a: usize, b: usize) -> Vec<f64> {
    (0..n)
        .flat_map(|k| z[k * v + a..k * v + b].to_vec())
        .collect()
}

#[test]
fn vocabulary_shards_equal_the_full_vocabulary() {
    for dt in [Dt::F32, Dt::BF16] {
        for (v, cuts) in [
            (1000usize, vec![0usize, 1, 401, 651, 1000]),
            (7, vec![0, 3, 7]),
            (32000, vec![0, 10000, 10001, 32000]),
        ] {
            let (n, temp) = (5, 0.9);
            let mut rng = Rng::new(v as u64 * 3);
            let (z, labels) = gen_logits(&mut rng, n, v, dt, true, true);
            let mut zt = Tensor::new(&z, &[n, v], dt);
            let lt = Tensor::ints(&labels, &[n], Dt::I64);
            let full = lib_logits_forward(&zt, &lt, temp).unwrap();
            let g: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let h: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let mut full_grad = Tensor::filled(f64::NAN, &[n, v], dt);
            lib_logits_backward(
                &mut zt,
                &lt,
                temp,
                0,
                &full.lse,
                &full.ent,
                &g,
                Some(&h),
                Some(&mut full_grad),
            )
            .unwrap();
            let full_grad = full_grad.to_vec();
            // Phase 1 per shard, stacked [R, N, 4].
            let r = cuts.len() - 1;
            let mut stacked = vec![];
            for w in cuts.windows(2) {
                let sz = Tensor::new(&columns(&z, n, v, w[0], w[1]), &[n, w[1] - w[0]], dt);
                let mut stats = Tensor::filled(f64::NAN, &[n, 4], Dt::F32);
                let st = unsafe {
                    calibrl::ffi::logits::calibrl_logits_shard_stats(
                        sz.lib(),
                        lt.lib(),
                        temp,
                        w[0] as i64,
                        stats.lib_mut(),
                        std::ptr::null_mut(),
                    )
                };
                assert_eq!(st as i32, 0, "shard_stats: {}", last_error());
                stacked.extend(stats.to_vec());
            }
            let stats = Tensor::new(&stacked, &[r, n, 4], Dt::F32);
            let mut lp = Tensor::filled(f64::NAN, &[n], Dt::F64);
            let mut en = Tensor::filled(f64::NAN, &[n], Dt::F64);
            let mut ls = Tensor::filled(f64::NAN, &[n], Dt::F64);
            let st = unsafe {
                calibrl::ffi::logits::calibrl_logits_shard_finish(
                    stats.lib(),
                    lt.lib(),
                    lp.lib_mut(),
                    en.lib_mut(),
                    ls.lib_mut(),
                    std::ptr::null_mut(),
                )
            };
            assert_eq!(st as i32, 0, "shard_finish: {}", last_error());
            let scale = 1.0 + max_abs_finite(&z) / temp;
            let what = format!("{dt:?} V={v} shards {cuts:?}");
            assert_vec_close(
                &format!("{what}: logprobs"),
                &lp.to_vec(),
                &full.logp,
                1e-6,
                1e-6 * scale,
            );
            assert_vec_close(
                &format!("{what}: entropy"),
                &en.to_vec(),
                &full.ent,
                1e-6,
                1e-6 * scale,
            );
            assert_vec_close(
                &format!("{what}: lse"),
                &ls.to_vec(),
                &full.lse,
                1e-6,
                1e-6 * scale,
            );
            // Phase-2 backward per shard with the finished lse / entropy = slice of the full one.
            let (rtol, atol) = if dt == Dt::F32 {
                (1e-5, 1e-7)
            } else {
                (1e-2, 1e-3)
            };
            for w in cuts.windows(2) {
                let mut sz = Tensor::new(&columns(&z, n, v, w[0], w[1]), &[n, w[1] - w[0]], dt);
                let mut out = Tensor::filled(f64::NAN, &[n, w[1] - w[0]], dt);
                lib_logits_backward(
                    &mut sz,
                    &lt,
                    temp,
                    w[0] as i64,
                    &ls.to_vec(),
                    &en.to_vec(),
                    &g,
                    Some(&h),
                    Some(&mut out),
                )
                .unwrap();
                let want = columns(&full_grad, n, v, w[0], w[1]);
                assert_vec_close(
                    &format!("{what}: shard [{}, {}) backward", w[0], w[1]),
                    &out.to_vec(),
                    &want,
                    rtol,
                    atol,
                );
            }
        }
    }
}

/// A shard given as a strided view into the full logits (row stride V, byte offset) gives the
/// same statistics as a compact copy.
#[test]
fn strided_shard_view_equals_copy() {
    let (n, v, temp) = (4, 300, 1.1);
    let mut rng = Rng::new(9);
    let (z, labels) = gen_logits(&mut rng, n, v, Dt::F32, false, false);
    let full = Tensor::new(&z, &[n, v], Dt::F32);
    let lt = Tensor::ints(&labels, &[n], Dt::I64);
    let (a, b) = (120usize, 250usize);
    let mut shape = [n as i64, (b - a) as i64];
    let mut strides = [v as i64, 1];
    let view = DLTensor {
        data: full.desc.data,
        device: full.desc.device,
        ndim: 2,
        dtype: full.desc.dtype,
        shape: shape.as_mut_ptr(),
        strides: strides.as_mut_ptr(),
        byte_offset: (a * 4) as u64,
    };
    let copy = Tensor::new(&columns(&z, n, v, a, b), &[n, b - a], Dt::F32);
    let mut s1 = Tensor::filled(f64::NAN, &[n, 4], Dt::F32);
    let mut s2 = Tensor::filled(f64::NAN, &[n, 4], Dt::F32);
    unsafe {
        let p = &view as *const DLTensor as *const calibrl::tensor::DLTensor;
        assert_eq!(
            calibrl::ffi::logits::calibrl_logits_shard_stats(
                p,
                lt.lib(),
                temp,
                a as i64,
                s1.lib_mut(),
                std::ptr::null_mut()
            ) as i32,
            0,
            "{}",
            last_error()
        );
        assert_eq!(
            calibrl::ffi::logits::calibrl_logits_shard_stats(
                copy.lib(),
                lt.lib(),
                temp,
                a as i64,
                s2.lib_mut(),
                std::ptr::null_mut()
            ) as i32,
            0
        );
    }
    assert_eq!(s1.to_vec(), s2.to_vec());
}
