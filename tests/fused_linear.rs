//! The fused linear path (hidden states and LM head to ℓ, H, lse and their gradients, in
//! chunks through a workspace) against a float64 reference written here (matmul, then the
//! SPEC §6 reference), against the materialised path (logits, then today's fused logits path),
//! and against central finite differences; every dtype, odd shapes, chunk sizes 1..N and past
//! N, temperature, bias, accumulate vs overwrite, vocabulary shards, and bad input.

mod common;

use calibrl::ffi::linear::*;
use common::reference::{ref_logits_backward, ref_logits_forward};
use common::*;

const OK: i32 = 0;

/// One problem: inputs already rounded to `dt`.
struct Case {
    n: usize,
    h: usize,
    v: usize,
    dt: Dt,
    hidden: Vec<f64>,
    weight: Vec<f64>,
    bias: Option<Vec<f64>>,
    labels: Vec<i64>,
    temp: f64,
}

fn gen(seed: u64, (n, h, v): (usize, usize, usize), dt: Dt, bias: bool, temp: f64) -> Case {
    let mut rng = Rng::new(seed);
    let scale = 2.0 / (h as f64).sqrt();
    let hidden: Vec<f64> = (0..n * h).map(|_| rng.normal()).collect();
    let weight: Vec<f64> = (0..v * h).map(|_| scale * rng.normal()).collect();
    let b: Vec<f64> = (0..v).map(|_| 0.5 * rng.normal()).collect();
    let labels = (0..n)
        .map(|k| if k == 1 { -1 } else { rng.int(0, v) as i64 })
        .collect();
    Case {
        n,
        h,
        v,
        dt,
        hidden: quant_vec(&hidden, dt),
        weight: quant_vec(&weight, dt),
        bias: bias.then(|| quant_vec(&b, dt)),
        labels,
        temp,
    }
}

impl Case {
    /// z = hidden·weightᵀ + bias in float64.
    fn logits(&self, hidden: &[f64], weight: &[f64]) -> Vec<f64> {
        let (n, h, v) = (self.n, self.h, self.v);
        let mut z = vec![0.0; n * v];
        for k in 0..n {
            for j in 0..v {
                let dot: f64 = (0..h).map(|i| hidden[k * h + i] * weight[j * h + i]).sum();
                z[k * v + j] = dot + self.bias.as_ref().map_or(0.0, |b| b[j]);
            }
        }
        z
    }
    /// Float64 reference gradients from ∂L/∂z: (d_hidden, d_weight, d_bias).
    fn ref_grads(&self, g: &[f64], hh: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (n, h, v) = (self.n, self.h, self.v);
        let z = self.logits(&self.hidden, &self.weight);
        let dz = ref_logits_backward(&z, n, v, &self.labels, self.temp, g, hh);
        let mut dh = vec![0.0; n * h];
        let mut dw = vec![0.0; v * h];
        let mut db = vec![0.0; v];
        for k in 0..n {
            for j in 0..v {
                let d = dz[k * v + j];
                db[j] += d;
                for i in 0..h {
                    dh[k * h + i] += d * self.weight[j * h + i];
                    dw[j * h + i] += d * self.hidden[k * h + i];
                }
            }
        }
        (dh, dw, db)
    }
    fn tensors(&self) -> (Tensor, Tensor, Option<Tensor>, Tensor) {
        (
            Tensor::new(&self.hidden, &[self.n, self.h], self.dt),
            Tensor::new(&self.weight, &[self.v, self.h], self.dt),
            self.bias
                .as_ref()
                .map(|b| Tensor::new(b, &[self.v], self.dt)),
            Tensor::ints(&self.labels, &[self.n], Dt::I64),
        )
    }
    fn scale(&self) -> f64 {
        let z = self.logits(&self.hidden, &self.weight);
        1.0 + z.iter().fold(0.0f64, |a, &x| a.max(x.abs())) / self.temp
    }
}

/// A 16-byte aligned byte tensor of `bytes` bytes.
fn workspace(bytes: usize) -> Tensor {
    let mut t = Tensor::filled(0.0, &[bytes + 16], Dt::U8);
    let off = (16 - (t.desc.data as usize % 16)) % 16;
    t.desc.byte_offset = off as u64;
    t.set_shape(&[bytes]);
    t
}

fn ws_size(c: &Case, chunk: i64) -> Result<usize, (i32, String)> {
    let (hid, w, _, _) = c.tensors();
    let mut bytes = 0usize;
    let st = unsafe { calibrl_fused_linear_workspace_size(hid.lib(), w.lib(), chunk, &mut bytes) };
    if st as i32 != OK {
        return Err((st as i32, last_error()));
    }
    Ok(bytes)
}

/// The argument tensors of one call (kept alive while the struct points at them).
struct Args {
    hid: Tensor,
    w: Tensor,
    b: Option<Tensor>,
    lab: Tensor,
    ws: Tensor,
    vocab_start: i64,
    chunk: i64,
    /// Overrides for the bad-input tests.
    temp: Option<f64>,
    null: Option<&'static str>,
}

impl Args {
    fn new(c: &Case, chunk: usize) -> Args {
        let (hid, w, b, lab) = c.tensors();
        let ws = workspace(ws_size(c, chunk as i64).unwrap());
        Args {
            hid,
            w,
            b,
            lab,
            ws,
            vocab_start: 0,
            chunk: chunk as i64,
            temp: None,
            null: None,
        }
    }
    fn input(&mut self, c: &Case) -> CalibrlLinearInput {
        let mut i = CalibrlLinearInput {
            hidden: self.hid.lib(),
            weight: self.w.lib(),
            bias: opt_lib(&self.b),
            labels: self.lab.lib(),
            temperature: self.temp.unwrap_or(c.temp),
            vocab_start: self.vocab_start,
            chunk_size: self.chunk,
            workspace: self.ws.lib_mut(),
        };
        match self.null {
            Some("hidden") => i.hidden = std::ptr::null(),
            Some("workspace") => i.workspace = std::ptr::null_mut(),
            _ => {}
        }
        i
    }
}

type Fwd = (Vec<f64>, Vec<f64>, Vec<f64>);

fn forward(c: &Case, a: &mut Args) -> Result<Fwd, (i32, String)> {
    let n = c.n;
    let mut lp = Tensor::filled(f64::NAN, &[n], Dt::F64);
    let mut en = Tensor::filled(f64::NAN, &[n], Dt::F64);
    let mut ls = Tensor::filled(f64::NAN, &[n], Dt::F64);
    let input = a.input(c);
    let st = unsafe {
        calibrl_fused_linear_forward(
            &input,
            lp.lib_mut(),
            en.lib_mut(),
            ls.lib_mut(),
            std::ptr::null_mut(),
        )
    };
    if st as i32 != OK {
        return Err((st as i32, last_error()));
    }
    Ok((lp.to_vec(), en.to_vec(), ls.to_vec()))
}

/// Gradient outputs, pre-filled with `init` (accumulate tests) in float32 (d_hidden in `dh_dt`).
struct Grads {
    dh: Tensor,
    dw: Tensor,
    db: Option<Tensor>,
}

impl Grads {
    fn new(c: &Case, dh_dt: Dt, init: f64) -> Grads {
        Grads {
            dh: Tensor::filled(init, &[c.n, c.h], dh_dt),
            dw: Tensor::filled(init, &[c.v, c.h], Dt::F32),
            db: c
                .bias
                .as_ref()
                .map(|_| Tensor::filled(init, &[c.v], Dt::F32)),
        }
    }
}

fn backward(
    c: &Case,
    a: &mut Args,
    fwd: &Fwd,
    g: &[f64],
    hh: &[f64],
    out: &mut Grads,
    accumulate: bool,
) -> Result<(), (i32, String)> {
    let n = c.n;
    let lse = Tensor::new(&fwd.2, &[n], Dt::F64);
    let ent = Tensor::new(&fwd.1, &[n], Dt::F64);
    let gt = Tensor::new(g, &[n], Dt::F64);
    let ht = Tensor::new(hh, &[n], Dt::F64);
    let input = a.input(c);
    let st = unsafe {
        calibrl_fused_linear_backward(
            &input,
            lse.lib(),
            ent.lib(),
            gt.lib(),
            ht.lib(),
            out.dh.lib_mut(),
            out.dw.lib_mut(),
            opt_lib_mut(&mut out.db),
            accumulate as i32,
            std::ptr::null_mut(),
        )
    };
    if st as i32 != OK {
        return Err((st as i32, last_error()));
    }
    Ok(())
}

fn forward_backward(
    c: &Case,
    a: &mut Args,
    g: &[f64],
    hh: &[f64],
    out: &mut Grads,
) -> Result<Fwd, (i32, String)> {
    let n = c.n;
    let gt = Tensor::new(g, &[n], Dt::F64);
    let ht = Tensor::new(hh, &[n], Dt::F64);
    let mut lp = Tensor::filled(f64::NAN, &[n], Dt::F64);
    let mut en = Tensor::filled(f64::NAN, &[n], Dt::F64);
    let mut ls = Tensor::filled(f64::NAN, &[n], Dt::F64);
    let input = a.input(c);
    let st = unsafe {
        calibrl_fused_linear_forward_backward(
            &input,
            gt.lib(),
            ht.lib(),
            lp.lib_mut(),
            en.lib_mut(),
            ls.lib_mut(),
            out.dh.lib_mut(),
            out.dw.lib_mut(),
            opt_lib_mut(&mut out.db),
            0,
            std::ptr::null_mut(),
        )
    };
    if st as i32 != OK {
        return Err((st as i32, last_error()));
    }
    Ok((lp.to_vec(), en.to_vec(), ls.to_vec()))
}

const SHAPES: [(usize, usize, usize); 4] = [(7, 13, 37), (1, 5, 1), (5, 3, 301), (11, 33, 129)];

fn chunks(n: usize) -> Vec<usize> {
    let mut c: Vec<usize> = vec![1, 2, 3, n.saturating_sub(1).max(1), n, n + 5];
    c.dedup();
    c
}

fn upstream(n: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    (
        (0..n).map(|_| rng.normal()).collect(),
        (0..n).map(|_| 0.5 * rng.normal()).collect(),
    )
}

#[test]
fn forward_matches_reference_and_materialised_path() {
    for dt in [Dt::F32, Dt::BF16, Dt::F16] {
        for (si, &shape) in SHAPES.iter().enumerate() {
            for (bias, temp) in [(false, 1.0), (true, 0.7), (true, 1.3)] {
                let c = gen(si as u64 * 7 + bias as u64, shape, dt, bias, temp);
                let z = c.logits(&c.hidden, &c.weight);
                let want = ref_logits_forward(&z, c.n, c.v, &c.labels, c.temp);
                // The materialised path: f32 logits, then today's fused logits path.
                let zt = Tensor::new(&z, &[c.n, c.v], Dt::F32);
                let lt = Tensor::ints(&c.labels, &[c.n], Dt::I64);
                let mat = lib_logits_forward(&zt, &lt, c.temp).unwrap();
                let tol = 2e-5 * c.scale();
                for chunk in chunks(c.n) {
                    let what = format!("{dt:?} {shape:?} bias={bias} T={temp} chunk={chunk}");
                    let got = forward(&c, &mut Args::new(&c, chunk)).unwrap();
                    assert_vec_close(&format!("{what} logp"), &got.0, &want.logp, 0.0, tol);
                    assert_vec_close(&format!("{what} entropy"), &got.1, &want.ent, 0.0, tol);
                    assert_vec_close(&format!("{what} lse"), &got.2, &want.lse, 0.0, tol);
                    assert_vec_close(&format!("{what} logp vs mat"), &got.0, &mat.logp, 0.0, tol);
                    assert_vec_close(&format!("{what} H vs mat"), &got.1, &mat.ent, 0.0, tol);
                    // The ignored row gives zeros.
                    if c.n > 1 {
                        assert_eq!((got.0[1], got.1[1], got.2[1]), (0.0, 0.0, 0.0), "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn backward_matches_reference_and_materialised_path() {
    for dt in [Dt::F32, Dt::BF16, Dt::F16] {
        for (si, &shape) in SHAPES.iter().enumerate() {
            for (bias, temp) in [(false, 1.0), (true, 0.7)] {
                let c = gen(100 + si as u64, shape, dt, bias, temp);
                let (g, hh) = upstream(c.n, si as u64);
                let (dh, dw, db) = c.ref_grads(&g, &hh);
                // Materialised: ∂L/∂z from today's backward on f32 logits.
                let z = c.logits(&c.hidden, &c.weight);
                let mut zt = Tensor::new(&z, &[c.n, c.v], Dt::F32);
                let lt = Tensor::ints(&c.labels, &[c.n], Dt::I64);
                let fw = lib_logits_forward(&zt, &lt, c.temp).unwrap();
                lib_logits_backward(
                    &mut zt,
                    &lt,
                    c.temp,
                    0,
                    &fw.lse,
                    &fw.ent,
                    &g,
                    Some(&hh),
                    None,
                )
                .unwrap();
                let dz = zt.to_vec();
                let mut dh_mat = vec![0.0; c.n * c.h];
                for k in 0..c.n {
                    for j in 0..c.v {
                        for i in 0..c.h {
                            dh_mat[k * c.h + i] += dz[k * c.v + j] * c.weight[j * c.h + i];
                        }
                    }
                }
                let gscale = 1e-4 * (1.0 + c.scale());
                for chunk in chunks(c.n) {
                    let what = format!("{dt:?} {shape:?} bias={bias} T={temp} chunk={chunk}");
                    let mut a = Args::new(&c, chunk);
                    let fwd = forward(&c, &mut a).unwrap();
                    let mut out = Grads::new(&c, Dt::F32, f64::NAN);
                    backward(&c, &mut a, &fwd, &g, &hh, &mut out, false).unwrap();
                    assert_vec_close(
                        &format!("{what} d_hidden"),
                        &out.dh.to_vec(),
                        &dh,
                        0.0,
                        gscale,
                    );
                    assert_vec_close(
                        &format!("{what} d_hidden mat"),
                        &out.dh.to_vec(),
                        &dh_mat,
                        0.0,
                        gscale,
                    );
                    assert_vec_close(
                        &format!("{what} d_weight"),
                        &out.dw.to_vec(),
                        &dw,
                        0.0,
                        gscale,
                    );
                    if let Some(t) = &out.db {
                        assert_vec_close(&format!("{what} d_bias"), &t.to_vec(), &db, 0.0, gscale);
                    }
                    // The combined call gives the same results in one pass.
                    let mut a = Args::new(&c, chunk);
                    let mut both = Grads::new(&c, Dt::F32, f64::NAN);
                    let f2 = forward_backward(&c, &mut a, &g, &hh, &mut both).unwrap();
                    assert_vec_close(
                        &format!("{what} fb logp"),
                        &f2.0,
                        &fwd.0,
                        0.0,
                        1e-6 * c.scale(),
                    );
                    assert_vec_close(
                        &format!("{what} fb d_hidden"),
                        &both.dh.to_vec(),
                        &dh,
                        0.0,
                        gscale,
                    );
                    assert_vec_close(
                        &format!("{what} fb d_weight"),
                        &both.dw.to_vec(),
                        &dw,
                        0.0,
                        gscale,
                    );
                }
            }
        }
    }
}

/// L = Σ_k g_k·ℓ_k + h_k·H_k of the float64 reference, as a function of hidden and weight.
fn ref_objective(c: &Case, hidden: &[f64], weight: &[f64], g: &[f64], hh: &[f64]) -> f64 {
    let z = c.logits(hidden, weight);
    let f = ref_logits_forward(&z, c.n, c.v, &c.labels, c.temp);
    (0..c.n).map(|k| g[k] * f.logp[k] + hh[k] * f.ent[k]).sum()
}

#[test]
fn gradients_match_finite_differences() {
    let c = gen(7, (5, 6, 9), Dt::F32, true, 0.8);
    let (g, hh) = upstream(c.n, 3);
    let mut a = Args::new(&c, 2);
    let fwd = forward(&c, &mut a).unwrap();
    let mut out = Grads::new(&c, Dt::F64, 0.0);
    backward(&c, &mut a, &fwd, &g, &hh, &mut out, false).unwrap();
    let (dh, dw) = (out.dh.to_vec(), out.dw.to_vec());
    let mut hidden = c.hidden.clone();
    for i in 0..hidden.len() {
        let fd = central_diff(&mut hidden, i, 1e-5, |x| {
            ref_objective(&c, x, &c.weight, &g, &hh)
        });
        assert_close(&format!("d_hidden[{i}]"), dh[i], fd, 1e-3, 1e-4);
    }
    let mut weight = c.weight.clone();
    for i in 0..weight.len() {
        let fd = central_diff(&mut weight, i, 1e-5, |x| {
            ref_objective(&c, &c.hidden, x, &g, &hh)
        });
        assert_close(&format!("d_weight[{i}]"), dw[i], fd, 1e-3, 1e-4);
    }
}

#[test]
fn accumulate_adds_and_overwrite_replaces() {
    for dt in [Dt::F32, Dt::BF16] {
        let c = gen(11, (6, 10, 23), dt, true, 1.0);
        let (g, hh) = upstream(c.n, 5);
        let (_, dw, db) = c.ref_grads(&g, &hh);
        let mut a = Args::new(&c, 4);
        let fwd = forward(&c, &mut a).unwrap();
        let tol = 1e-4 * (1.0 + c.scale());
        let mut out = Grads::new(&c, Dt::F32, 0.25);
        backward(&c, &mut a, &fwd, &g, &hh, &mut out, true).unwrap();
        let plus: Vec<f64> = dw.iter().map(|x| x + 0.25).collect();
        assert_vec_close("accumulated d_weight", &out.dw.to_vec(), &plus, 0.0, tol);
        let plus_b: Vec<f64> = db.iter().map(|x| x + 0.25).collect();
        assert_vec_close(
            "accumulated d_bias",
            &out.db.as_ref().unwrap().to_vec(),
            &plus_b,
            0.0,
            tol,
        );
        // A second accumulating call adds the same again; an overwriting one replaces.
        backward(&c, &mut a, &fwd, &g, &hh, &mut out, true).unwrap();
        let twice: Vec<f64> = dw.iter().map(|x| 2.0 * x + 0.25).collect();
        assert_vec_close("twice d_weight", &out.dw.to_vec(), &twice, 0.0, 2.0 * tol);
        backward(&c, &mut a, &fwd, &g, &hh, &mut out, false).unwrap();
        assert_vec_close("overwritten d_weight", &out.dw.to_vec(), &dw, 0.0, tol);
    }
}

#[test]
fn low_precision_d_hidden() {
    for dh_dt in [Dt::BF16, Dt::F16] {
        let c = gen(13, (4, 8, 17), Dt::BF16, false, 1.0);
        let (g, hh) = upstream(c.n, 9);
        let (dh, _, _) = c.ref_grads(&g, &hh);
        let mut a = Args::new(&c, 3);
        let fwd = forward(&c, &mut a).unwrap();
        let mut out = Grads::new(&c, dh_dt, 0.0);
        backward(&c, &mut a, &fwd, &g, &hh, &mut out, false).unwrap();
        let want = quant_vec(&dh, dh_dt);
        assert_vec_close(
            &format!("{dh_dt:?} d_hidden"),
            &out.dh.to_vec(),
            &want,
            1e-2,
            1e-3,
        );
    }
}

/// Two vocabulary shards: statistics per shard, all-gathered and finished by the logits
/// path's `calibrl_logits_shard_finish`, then the backward per shard.
#[test]
fn vocabulary_shards_match_the_full_vocabulary() {
    for dt in [Dt::F32, Dt::BF16] {
        let c = gen(21, (6, 7, 31), dt, true, 0.9);
        let (g, hh) = upstream(c.n, 2);
        let mut a = Args::new(&c, 4);
        let full = forward(&c, &mut a).unwrap();
        let mut fo = Grads::new(&c, Dt::F32, 0.0);
        backward(&c, &mut a, &full, &g, &hh, &mut fo, false).unwrap();
        let split = 13;
        let parts = [(0, split), (split, c.v)];
        let shard = |(v0, v1): (usize, usize)| Case {
            n: c.n,
            h: c.h,
            v: v1 - v0,
            dt,
            hidden: c.hidden.clone(),
            weight: c.weight[v0 * c.h..v1 * c.h].to_vec(),
            bias: c.bias.as_ref().map(|b| b[v0..v1].to_vec()),
            labels: c.labels.clone(),
            temp: c.temp,
        };
        let mut stats = vec![];
        for &(v0, v1) in &parts {
            let s = shard((v0, v1));
            let mut a = Args::new(&s, 3);
            a.vocab_start = v0 as i64;
            let mut st = Tensor::filled(f64::NAN, &[c.n, 4], Dt::F32);
            let input = a.input(&s);
            let rc = unsafe {
                calibrl_fused_linear_shard_stats(&input, st.lib_mut(), std::ptr::null_mut())
            };
            assert_eq!(rc as i32, OK, "{}", last_error());
            stats.extend(st.to_vec());
        }
        let all = Tensor::new(&stats, &[2, c.n, 4], Dt::F32);
        let lab = Tensor::ints(&c.labels, &[c.n], Dt::I64);
        let mut lp = Tensor::filled(f64::NAN, &[c.n], Dt::F64);
        let mut en = Tensor::filled(f64::NAN, &[c.n], Dt::F64);
        let mut ls = Tensor::filled(f64::NAN, &[c.n], Dt::F64);
        let rc = unsafe {
            calibrl::ffi::logits::calibrl_logits_shard_finish(
                all.lib(),
                lab.lib(),
                lp.lib_mut(),
                en.lib_mut(),
                ls.lib_mut(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc as i32, OK, "{}", last_error());
        let tol = 1e-5 * c.scale();
        assert_vec_close("shard logp", &lp.to_vec(), &full.0, 0.0, tol);
        assert_vec_close("shard entropy", &en.to_vec(), &full.1, 0.0, tol);
        let sharded = (lp.to_vec(), en.to_vec(), ls.to_vec());
        let mut dh_sum = vec![0.0; c.n * c.h];
        for &(v0, v1) in &parts {
            let s = shard((v0, v1));
            let mut a = Args::new(&s, 2);
            a.vocab_start = v0 as i64;
            let mut out = Grads::new(&s, Dt::F32, 0.0);
            backward(&s, &mut a, &sharded, &g, &hh, &mut out, false).unwrap();
            for (d, x) in dh_sum.iter_mut().zip(out.dh.to_vec()) {
                *d += x;
            }
            let tol = 1e-4 * (1.0 + c.scale());
            assert_vec_close(
                "shard d_weight",
                &out.dw.to_vec(),
                &fo.dw.to_vec()[v0 * c.h..v1 * c.h],
                0.0,
                tol,
            );
        }
        assert_vec_close(
            "summed d_hidden",
            &dh_sum,
            &fo.dh.to_vec(),
            0.0,
            1e-4 * c.scale(),
        );
    }
}

#[test]
fn workspace_size_query() {
    let c = gen(1, (3, 4, 10), Dt::F32, false, 1.0);
    assert_eq!(ws_size(&c, 5).unwrap(), 5 * 10 * 4);
    let (code, msg) = ws_size(&c, 0).unwrap_err();
    assert_eq!(code, calibrl::CalibrlStatus::InvalidArgument as i32);
    assert!(msg.contains("`chunk_size`"), "{msg}");
    let (hid, w, _, _) = c.tensors();
    let st =
        unsafe { calibrl_fused_linear_workspace_size(hid.lib(), w.lib(), 4, std::ptr::null_mut()) };
    assert_eq!(st as i32, calibrl::CalibrlStatus::NullArgument as i32);
    assert!(last_error().contains("`bytes`"));
}

/// Every bad input fails with a status and a message naming the argument, and no output is
/// touched (forward outputs, and d_hidden / d_weight of the backward).
#[test]
fn bad_input_names_the_argument_and_writes_nothing() {
    use calibrl::CalibrlStatus as S;
    let c = gen(3, (4, 6, 11), Dt::F32, true, 1.0);
    let (g, hh) = upstream(c.n, 1);
    type Mutate<'a> = Box<dyn Fn(&mut Args) + 'a>;
    let cases: Vec<(&str, S, &str, Mutate)> = vec![
        (
            "weight columns",
            S::ShapeMismatch,
            "`weight`",
            Box::new(|a| a.w.set_shape(&[c.h, c.v])),
        ),
        (
            "labels length",
            S::ShapeMismatch,
            "`labels`",
            Box::new(|a| a.lab.set_shape(&[c.n - 1])),
        ),
        (
            "bias length",
            S::ShapeMismatch,
            "`bias`",
            Box::new(|a| a.b.as_mut().unwrap().set_shape(&[c.v - 1])),
        ),
        (
            "small workspace",
            S::BufferTooSmall,
            "`workspace`",
            Box::new(|a| a.ws.set_shape(&[4 * c.v * 2 - 1])),
        ),
        (
            "chunk 0",
            S::InvalidArgument,
            "`chunk_size`",
            Box::new(|a| a.chunk = 0),
        ),
        (
            "null hidden",
            S::NullArgument,
            "`hidden`",
            Box::new(|a| a.null = Some("hidden")),
        ),
        (
            "null workspace",
            S::NullArgument,
            "`workspace`",
            Box::new(|a| a.null = Some("workspace")),
        ),
        (
            "temperature",
            S::InvalidArgument,
            "`temperature`",
            Box::new(|a| a.temp = Some(0.0)),
        ),
        (
            "dtype mix",
            S::DtypeMismatch,
            "`weight`",
            Box::new(|a| a.w = Tensor::new(&c.weight, &[c.v, c.h], Dt::BF16)),
        ),
        (
            "label range",
            S::InvalidArgument,
            "`labels`",
            Box::new(|a| a.lab = Tensor::ints(&[0, 0, 11, 0], &[4], Dt::I64)),
        ),
        (
            "NaN hidden",
            S::NonFinite,
            "`hidden`",
            Box::new(|a| a.hid.set(5, f64::NAN)),
        ),
        (
            "inf weight",
            S::NonFinite,
            "`weight`",
            Box::new(|a| a.w.set(3, f64::INFINITY)),
        ),
        (
            "overflowing logits",
            S::NonFinite,
            "`hidden`",
            Box::new(|a| a.hid.set(0, 1e38)),
        ),
        (
            "cuda",
            S::DeviceMismatch,
            "`weight`",
            Box::new(|a| a.w.desc.device.device_type = 2),
        ),
        (
            "vocab_start",
            S::InvalidArgument,
            "`vocab_start`",
            Box::new(|a| a.vocab_start = 3),
        ),
    ];
    for (what, status, name, mutate) in &cases {
        // Forward.
        let mut a = Args::new(&c, 2);
        mutate(&mut a);
        let input = a.input(&c);
        let mut lp = Tensor::filled(-7.0, &[c.n], Dt::F32);
        let mut ls = Tensor::filled(-7.0, &[c.n], Dt::F32);
        let st = unsafe {
            calibrl_fused_linear_forward(
                &input,
                lp.lib_mut(),
                std::ptr::null_mut(),
                ls.lib_mut(),
                std::ptr::null_mut(),
            )
        } as i32;
        let msg = last_error();
        assert_eq!(st, *status as i32, "forward {what}: {msg}");
        assert!(msg.contains(name), "forward {what}: {msg}");
        assert!(
            lp.to_vec().iter().chain(&ls.to_vec()).all(|&x| x == -7.0),
            "forward {what}: output touched"
        );
        if *what == "vocab_start" || *what == "label range" {
            // The backward takes shards: a label past this weight's rows is another shard's.
            continue;
        }
        // Backward.
        let zeros = vec![0.1; c.n];
        let fwd = (zeros.clone(), zeros.clone(), zeros);
        let mut a = Args::new(&c, 2);
        let mut out = Grads::new(&c, Dt::F32, -7.0);
        let lse = Tensor::new(&fwd.2, &[c.n], Dt::F64);
        let gt = Tensor::new(&g, &[c.n], Dt::F64);
        let ht = Tensor::new(&hh, &[c.n], Dt::F64);
        mutate(&mut a);
        let input = a.input(&c);
        let st = unsafe {
            calibrl_fused_linear_backward(
                &input,
                lse.lib(),
                lse.lib(),
                gt.lib(),
                ht.lib(),
                out.dh.lib_mut(),
                out.dw.lib_mut(),
                opt_lib_mut(&mut out.db),
                0,
                std::ptr::null_mut(),
            )
        } as i32;
        let msg = last_error();
        assert_eq!(st, *status as i32, "backward {what}: {msg}");
        assert!(msg.contains(name), "backward {what}: {msg}");
        for t in [&out.dh, &out.dw, out.db.as_ref().unwrap()] {
            assert!(
                t.to_vec().iter().all(|&x| x == -7.0),
                "backward {what}: output touched"
            );
        }
    }
    // Output-side errors of the backward.
    let mut a = Args::new(&c, 2);
    let fwd = forward(&c, &mut a).unwrap();
    let mut out = Grads::new(&c, Dt::F32, -7.0);
    out.dw = Tensor::filled(-7.0, &[c.v, c.h], Dt::BF16);
    let (code, msg) = backward(&c, &mut a, &fwd, &g, &hh, &mut out, false).unwrap_err();
    assert_eq!(code, S::DtypeMismatch as i32, "{msg}");
    assert!(msg.contains("`d_weight`"), "{msg}");
    let mut out = Grads::new(&c, Dt::F32, -7.0);
    out.dh.set_shape(&[c.n, c.h - 1]);
    let (code, msg) = backward(&c, &mut a, &fwd, &g, &hh, &mut out, false).unwrap_err();
    assert_eq!(code, S::ShapeMismatch as i32, "{msg}");
    assert!(msg.contains("`d_hidden`"), "{msg}");
    assert!(out.dw.to_vec().iter().all(|&x| x == -7.0));
    // Accumulating into a d_weight that holds NaN: refused, nothing written (found by the fuzzer).
    let mut out = Grads::new(&c, Dt::F32, 0.5);
    out.dw.set(3, f64::NAN);
    let (code, msg) = backward(&c, &mut a, &fwd, &g, &hh, &mut out, true).unwrap_err();
    assert_eq!(code, S::NonFinite as i32, "{msg}");
    assert!(msg.contains("`d_weight`"), "{msg}");
    assert!(out.dh.to_vec().iter().all(|&x| x == 0.5));
    // d_weight aliasing the workspace.
    let mut out = Grads::new(&c, Dt::F32, -7.0);
    let mut ws_alias = Args::new(&c, 1);
    ws_alias.ws = workspace(c.v * c.h * 4);
    out.dw.desc.data =
        (ws_alias.ws.desc.data as usize + ws_alias.ws.desc.byte_offset as usize) as *mut _;
    let (code, msg) = backward(&c, &mut ws_alias, &fwd, &g, &hh, &mut out, false).unwrap_err();
    assert_eq!(code, S::InvalidArgument as i32, "{msg}");
    assert!(
        msg.contains("`d_weight`") && msg.contains("`workspace`"),
        "{msg}"
    );
}
