//! GPU tests of the fused linear path (cuBLAS GEMMs + the fused logits kernels): every CUDA
//! call against the CPU backend on the same inputs, through the C ABI.
//!
//! The device tests are `#[ignore]`d (run with `--include-ignored`; without a device they print
//! "skipped: no CUDA device"). Without a GPU, `scripts/emulate-kernels.sh` runs them on the
//! emulated driver and the emulated cuBLAS (`tests/emulate/`). `CALIBRL_GPU_TEST_SEED=<u64>`
//! fixes the random seed.
//!
//! Tolerances: the CUDA backend keeps the chunk's logits (and ∂L/∂z) in the input dtype, the CPU
//! backend in float32, so bf16 / f16 results differ by that rounding: each element must be
//! within `tol × max|CPU result|` of the CPU's (tol = 2 spacings of the dtype at 1; 1e-4 for
//! float32). A wrong transpose, leading dimension, chunk offset or beta gives errors of the
//! order of the values themselves. Outputs are filled with NaN before a call, so every element
//! compared was written.

use calibrl::cuda::cublas::{locate, majors_for, search_dirs, CUBLAS};
use calibrl::cuda::culib::open_first;
use calibrl::ffi::common::calibrl_last_error_message;
use calibrl::ffi::linear::*;
use calibrl::tensor::{DLDataType, DLDevice, DLTensor, DL_CPU, DL_CUDA};
use calibrl::CalibrlStatus;
use cudarc::driver::{CudaSlice, DevicePtr};
use half::{bf16, f16};
use std::ffi::c_void;
use std::path::{Path, PathBuf};

#[macro_use]
mod gpu_common;
use gpu_common::{Gpu, Rng};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dt {
    Bf16,
    F16,
    F32,
    F64,
}

impl Dt {
    fn size(self) -> usize {
        match self {
            Dt::Bf16 | Dt::F16 => 2,
            Dt::F32 => 4,
            Dt::F64 => 8,
        }
    }
    fn dl(self) -> DLDataType {
        let (code, bits) = match self {
            Dt::Bf16 => (4, 16),
            Dt::F16 => (2, 16),
            Dt::F32 => (2, 32),
            Dt::F64 => (2, 64),
        };
        DLDataType {
            code,
            bits,
            lanes: 1,
        }
    }
    fn round(self, x: f32) -> f32 {
        match self {
            Dt::Bf16 => bf16::from_f32(x).to_f32(),
            Dt::F16 => f16::from_f32(x).to_f32(),
            _ => x,
        }
    }
    fn encode(self, values: &[f64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        for &v in values {
            match self {
                Dt::Bf16 => out.extend(bf16::from_f64(v).to_le_bytes()),
                Dt::F16 => out.extend(f16::from_f64(v).to_le_bytes()),
                Dt::F32 => out.extend((v as f32).to_le_bytes()),
                Dt::F64 => out.extend(v.to_le_bytes()),
            }
        }
        out
    }
    fn decode(self, bytes: &[u8]) -> Vec<f64> {
        bytes
            .chunks_exact(self.size())
            .map(|c| match self {
                Dt::Bf16 => bf16::from_le_bytes([c[0], c[1]]).to_f64(),
                Dt::F16 => f16::from_le_bytes([c[0], c[1]]).to_f64(),
                Dt::F32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
                Dt::F64 => f64::from_le_bytes(c.try_into().unwrap()),
            })
            .collect()
    }
    /// Allowed difference to the CPU backend, relative to the largest CPU value.
    fn tol(self) -> f64 {
        match self {
            Dt::Bf16 => 2.0 * 2f64.powi(-7),
            Dt::F16 => 2.0 * 2f64.powi(-10),
            _ => 1e-4,
        }
    }
}

const I64: DLDataType = DLDataType {
    code: 0,
    bits: 64,
    lanes: 1,
};
const U8: DLDataType = DLDataType {
    code: 1,
    bits: 8,
    lanes: 1,
};

/// A tensor on the host (`g` None) or the device, owning its memory and descriptor.
struct Buf {
    g: Option<&'static Gpu>,
    host: Vec<u128>, // 16-byte aligned
    dev: Option<CudaSlice<u8>>,
    len: usize,
    _shape: Vec<i64>,
    t: DLTensor,
}

impl Buf {
    fn new(g: Option<&'static Gpu>, bytes: &[u8], dtype: DLDataType, shape: &[usize]) -> Box<Buf> {
        let mut b = Box::new(Buf {
            g,
            host: vec![0; bytes.len().div_ceil(16).max(1)],
            dev: None,
            len: bytes.len(),
            _shape: shape.iter().map(|&s| s as i64).collect(),
            t: DLTensor {
                data: std::ptr::null_mut(),
                device: DLDevice {
                    device_type: if g.is_some() { DL_CUDA } else { DL_CPU },
                    device_id: 0,
                },
                ndim: shape.len() as i32,
                dtype,
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
        });
        b.t.shape = b._shape.as_mut_ptr();
        match g {
            Some(g) => {
                let data = if bytes.is_empty() {
                    vec![0u8]
                } else {
                    bytes.to_vec()
                };
                let slice = g.stream.memcpy_stod(&data).unwrap();
                b.t.data = {
                    let (p, _sync) = slice.device_ptr(&g.stream);
                    p as usize as *mut c_void
                };
                b.dev = Some(slice);
            }
            None => {
                // SAFETY: `host` holds at least `bytes.len()` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        b.host.as_mut_ptr() as *mut u8,
                        bytes.len(),
                    )
                };
                b.t.data = b.host.as_mut_ptr() as *mut c_void;
            }
        }
        b
    }
    fn p(&self) -> *const DLTensor {
        &self.t
    }
    fn m(&mut self) -> *mut DLTensor {
        &mut self.t
    }
    fn bytes(&self) -> Vec<u8> {
        match (self.g, &self.dev) {
            (Some(g), Some(d)) => {
                let mut v = g.stream.memcpy_dtov(d).unwrap();
                g.stream.synchronize().unwrap();
                v.truncate(self.len);
                v
            }
            // SAFETY: `host` holds `len` initialised bytes.
            _ => unsafe {
                std::slice::from_raw_parts(self.host.as_ptr() as *const u8, self.len).to_vec()
            },
        }
    }
}

fn last_error() -> String {
    // SAFETY: a valid NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(calibrl_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// One problem's host data (inputs already representable in their dtype).
struct Problem {
    n: usize,
    h: usize,
    v: usize,
    hidden: Vec<f64>,
    weight: Vec<f64>,
    bias: Vec<f64>,
    labels: Vec<i64>,
    grad_logprobs: Vec<f64>,
    grad_entropy: Vec<f64>,
    d_weight0: Vec<f64>,
    d_bias0: Vec<f64>,
}

impl Problem {
    fn new(rng: &mut Rng, (n, h, v): (usize, usize, usize), dt: Dt) -> Problem {
        let mut normal = |scale: f64| {
            let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            let w = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            let x = (-2.0 * (u + 1e-12).ln()).sqrt() * (std::f64::consts::TAU * w).cos();
            dt.round((x * scale) as f32) as f64
        };
        let hidden = (0..n * h).map(|_| normal(1.0)).collect();
        let weight = (0..v * h)
            .map(|_| normal(1.5 / (h as f64).sqrt()))
            .collect();
        let bias = (0..v).map(|_| normal(0.5)).collect();
        let grad_logprobs = (0..n).map(|_| normal(1.0)).collect();
        let grad_entropy = (0..n).map(|_| normal(0.3)).collect();
        let d_weight0 = (0..v * h).map(|_| normal(1.0)).collect();
        let d_bias0 = (0..v).map(|_| normal(1.0)).collect();
        let labels = (0..n)
            .map(|k| if k % 5 == 3 { -1 } else { rng.below(v) as i64 })
            .collect();
        Problem {
            n,
            h,
            v,
            hidden,
            weight,
            bias,
            labels,
            grad_logprobs,
            grad_entropy,
            d_weight0,
            d_bias0,
        }
    }
}

/// How a call is made.
#[derive(Clone, Copy, Debug)]
struct Setup {
    dt: Dt,
    /// dtype of the `[N]` tensors.
    rows: Dt,
    d_hidden: Dt,
    chunk: i64,
    bias: bool,
    temperature: f64,
    accumulate: bool,
    grad_entropy: bool,
    /// (first id, rows) of the weight shard.
    shard: Option<(usize, usize)>,
    /// Added to the queried workspace size.
    workspace_delta: isize,
    labels_i32: bool,
}

impl Setup {
    fn new(dt: Dt) -> Setup {
        Setup {
            dt,
            rows: Dt::F32,
            d_hidden: Dt::F32,
            chunk: 4,
            bias: true,
            temperature: 1.0,
            accumulate: false,
            grad_entropy: true,
            shard: None,
            workspace_delta: 0,
            labels_i32: false,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Forward,
    ShardStats,
    /// From the same backend's saved full-vocabulary forward.
    Backward,
    ForwardBackward,
}

type Outputs = Vec<(&'static str, Vec<f64>)>;

/// Runs `op` on the host (`g` None: the CPU backend) or the device; returns the named outputs,
/// or the status and message.
fn run(
    g: Option<&'static Gpu>,
    p: &Problem,
    s: &Setup,
    op: &Op,
) -> Result<Outputs, (CalibrlStatus, String)> {
    let (vs, vl) = s.shard.unwrap_or((0, p.v));
    let (n, h) = (p.n, p.h);
    let dt = s.dt;
    let hidden = Buf::new(g, &dt.encode(&p.hidden), dt.dl(), &[n, h]);
    let weight = Buf::new(
        g,
        &dt.encode(&p.weight[vs * h..(vs + vl) * h]),
        dt.dl(),
        &[vl, h],
    );
    let bias = Buf::new(g, &dt.encode(&p.bias[vs..vs + vl]), dt.dl(), &[vl]);
    let labels = if s.labels_i32 {
        let bytes: Vec<u8> = p
            .labels
            .iter()
            .flat_map(|&l| (l as i32).to_le_bytes())
            .collect();
        Buf::new(g, &bytes, DLDataType { bits: 32, ..I64 }, &[n])
    } else {
        let bytes: Vec<u8> = p.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        Buf::new(g, &bytes, I64, &[n])
    };
    let mut bytes = 0usize;
    // SAFETY: valid descriptors and out-pointer.
    let st =
        unsafe { calibrl_fused_linear_workspace_size(hidden.p(), weight.p(), s.chunk, &mut bytes) };
    if st != CalibrlStatus::Ok {
        return Err((st, last_error()));
    }
    let bytes = (bytes as isize + s.workspace_delta).max(0) as usize;
    let mut ws = Buf::new(g, &vec![0xffu8; bytes], U8, &[bytes]);
    let input = CalibrlLinearInput {
        hidden: hidden.p(),
        weight: weight.p(),
        bias: if s.bias { bias.p() } else { std::ptr::null() },
        labels: labels.p(),
        temperature: s.temperature,
        vocab_start: vs as i64,
        chunk_size: s.chunk,
        workspace: ws.m(),
    };
    let nan_rows = s.rows.encode(&vec![f64::NAN; n]);
    let mut lp = Buf::new(g, &nan_rows, s.rows.dl(), &[n]);
    let mut ent = Buf::new(g, &nan_rows, s.rows.dl(), &[n]);
    let mut lse = Buf::new(g, &nan_rows, s.rows.dl(), &[n]);
    let mut stats = Buf::new(
        g,
        &Dt::F32.encode(&vec![f64::NAN; n * 4]),
        Dt::F32.dl(),
        &[n, 4],
    );
    let gl = Buf::new(g, &s.rows.encode(&p.grad_logprobs), s.rows.dl(), &[n]);
    let ge = Buf::new(g, &s.rows.encode(&p.grad_entropy), s.rows.dl(), &[n]);
    let (dw0, db0) = if s.accumulate {
        (
            p.d_weight0[vs * h..(vs + vl) * h].to_vec(),
            p.d_bias0[vs..vs + vl].to_vec(),
        )
    } else {
        (vec![f64::NAN; vl * h], vec![f64::NAN; vl])
    };
    let mut dh = Buf::new(
        g,
        &s.d_hidden.encode(&vec![f64::NAN; n * h]),
        s.d_hidden.dl(),
        &[n, h],
    );
    let mut dw = Buf::new(g, &Dt::F32.encode(&dw0), Dt::F32.dl(), &[vl, h]);
    let mut db = Buf::new(g, &Dt::F32.encode(&db0), Dt::F32.dl(), &[vl]);
    let ge_p = if s.grad_entropy {
        ge.p()
    } else {
        std::ptr::null()
    };
    let db_p = if s.bias { db.m() } else { std::ptr::null_mut() };
    let stream = g.map_or(std::ptr::null_mut(), |g| {
        g.stream.cu_stream() as *mut c_void
    });
    let mut saved = Vec::new();
    let fwd_saved = if matches!(op, Op::Backward) {
        let mut full = *s;
        full.shard = None;
        full.workspace_delta = 0;
        run(g, p, &full, &Op::Forward)?
    } else {
        Vec::new()
    };
    // SAFETY: every descriptor lives until the end of this function.
    let st = unsafe {
        match op {
            Op::Forward => {
                calibrl_fused_linear_forward(&input, lp.m(), ent.m(), lse.m(), stream as _)
            }
            Op::ShardStats => calibrl_fused_linear_shard_stats(&input, stats.m(), stream as _),
            Op::Backward => {
                let (l, e) = (&fwd_saved[2].1, &fwd_saved[1].1);
                saved.push(Buf::new(g, &s.rows.encode(l), s.rows.dl(), &[n]));
                saved.push(Buf::new(g, &s.rows.encode(e), s.rows.dl(), &[n]));
                calibrl_fused_linear_backward(
                    &input,
                    saved[0].p(),
                    if s.grad_entropy {
                        saved[1].p()
                    } else {
                        std::ptr::null()
                    },
                    gl.p(),
                    ge_p,
                    dh.m(),
                    dw.m(),
                    db_p,
                    s.accumulate as i32,
                    stream as _,
                )
            }
            Op::ForwardBackward => calibrl_fused_linear_forward_backward(
                &input,
                gl.p(),
                ge_p,
                lp.m(),
                ent.m(),
                lse.m(),
                dh.m(),
                dw.m(),
                db_p,
                s.accumulate as i32,
                stream as _,
            ),
        }
    };
    if let Some(g) = g {
        g.stream.synchronize().unwrap();
    }
    if st != CalibrlStatus::Ok {
        let msg = last_error();
        // A refused call writes nothing; a CUDA / cuBLAS failure in the middle of the pass
        // (queued work already ran) cannot be undone.
        let refused = st != CalibrlStatus::CudaError;
        for (name, b, before) in [
            ("logprobs", &lp, &nan_rows),
            ("entropy", &ent, &nan_rows),
            ("lse", &lse, &nan_rows),
            ("d_weight", &dw, &Dt::F32.encode(&dw0)),
            ("d_bias", &db, &Dt::F32.encode(&db0)),
        ] {
            assert!(
                !refused || b.bytes() == *before,
                "{name} was written by a refused call ({msg})"
            );
        }
        return Err((st, msg));
    }
    let rows = |b: &Buf| s.rows.decode(&b.bytes());
    let f32s = |b: &Buf| Dt::F32.decode(&b.bytes());
    let mut out: Outputs = Vec::new();
    match op {
        Op::Forward => out.extend([
            ("logprobs", rows(&lp)),
            ("entropy", rows(&ent)),
            ("lse", rows(&lse)),
        ]),
        Op::ShardStats => {
            // Ignored rows' statistics are not read by calibrl_logits_shard_finish (the CPU
            // fused path leaves them 0, the logits kernels fill them): compare the others.
            let mut st = f32s(&stats);
            for (k, _) in p.labels.iter().enumerate().filter(|(_, &l)| l < 0) {
                st[4 * k..4 * k + 4].fill(0.0);
            }
            out.push(("stats", st))
        }
        _ => {}
    }
    if matches!(op, Op::Backward | Op::ForwardBackward) {
        out.push(("d_hidden", s.d_hidden.decode(&dh.bytes())));
        out.push(("d_weight", f32s(&dw)));
        if s.bias {
            out.push(("d_bias", f32s(&db)));
        }
    }
    if matches!(op, Op::ForwardBackward) {
        out.extend([
            ("logprobs", rows(&lp)),
            ("entropy", rows(&ent)),
            ("lse", rows(&lse)),
        ]);
    }
    Ok(out)
}

/// Each element within `tol × max|want|` of the CPU's (NaN nowhere: the CPU's are finite).
/// Returns the largest |diff| / (tol × scale) seen (≤ 1).
fn compare(what: &str, got: &Outputs, want: &Outputs, tol: impl Fn(&str) -> f64) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut used = 0f64;
    for ((name, g), (_, w)) in got.iter().zip(want) {
        let tol = tol(name);
        let scale = w.iter().fold(1e-3f64, |a, &x| a.max(x.abs()));
        let worst = g
            .iter()
            .zip(w)
            .enumerate()
            .map(|(i, (a, b))| {
                (
                    i,
                    if a.is_finite() {
                        (a - b).abs()
                    } else {
                        f64::INFINITY
                    },
                )
            })
            .fold((0, 0f64), |m, x| if x.1 > m.1 { x } else { m });
        assert!(
            worst.1 <= tol * scale,
            "{what}: {name}[{}]: cuda {} cpu {} (|diff| {:e} > {tol:e} × {scale:e})",
            worst.0,
            g[worst.0],
            w[worst.0],
            worst.1
        );
        used = used.max(worst.1 / (tol * scale));
    }
    used
}

/// The CUDA call against the CPU backend's; the largest fraction of the tolerance used.
fn check(p: &Problem, s: &Setup, op: &Op, g: &'static Gpu) -> f64 {
    let what = format!("{op:?} n={} h={} v={} {s:?}", p.n, p.h, p.v);
    let what = &what[..what.len().min(300)];
    let want = run(None, p, s, op).unwrap_or_else(|e| panic!("{what}: cpu {e:?}"));
    let got = run(Some(g), p, s, op).unwrap_or_else(|e| panic!("{what}: cuda {e:?}"));
    // The inputs' rounding, or the output dtype's where that is coarser.
    let tol = |name: &str| {
        let out = match name {
            "logprobs" | "entropy" | "lse" => s.rows,
            "d_hidden" => s.d_hidden,
            _ => Dt::F32,
        };
        s.dt.tol().max(out.tol())
    };
    compare(what, &got, &want, tol)
}

/// Prints the largest fraction of the tolerance a test used, per input dtype.
fn report(test: &str, used: &[(Dt, f64)]) {
    for (dt, u) in used {
        println!("{test}: {dt:?}: largest |cuda - cpu| = {u:.3} of the tolerance");
    }
}

fn shapes() -> Vec<(usize, usize, usize)> {
    vec![
        (1, 1, 1),
        (2, 3, 5),
        (7, 5, 33),
        (13, 24, 97),
        (37, 16, 250),
    ]
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn every_dtype_shape_and_chunk_matches_cpu() {
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(33);
    let mut used = Vec::new();
    for dt in [Dt::Bf16, Dt::F16, Dt::F32] {
        let mut u = 0f64;
        for shape in shapes() {
            let p = Problem::new(&mut rng, shape, dt);
            let n = shape.0 as i64;
            for chunk in [1, 3, n, n + 5] {
                let mut s = Setup::new(dt);
                s.chunk = chunk;
                s.bias = chunk != 3;
                s.labels_i32 = chunk == 3;
                s.temperature = if chunk == 1 { 0.7 } else { 1.0 };
                u = u.max(check(&p, &s, &Op::Forward, g));
                let saved = Op::Backward;
                u = u.max(check(&p, &s, &saved, g));
                s.accumulate = true;
                s.grad_entropy = chunk != n;
                u = u.max(check(&p, &s, &saved, g));
                u = u.max(check(&p, &s, &Op::ForwardBackward, g));
                // d_hidden in the inputs' dtype, [N] tensors in other dtypes.
                if dt != Dt::F32 {
                    s.d_hidden = dt;
                }
                s.rows = if chunk == 1 { Dt::F64 } else { Dt::Bf16 };
                s.accumulate = false;
                u = u.max(check(&p, &s, &Op::ForwardBackward, g));
            }
        }
        used.push((dt, u));
    }
    report("every dtype, shape and chunk", &used);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn vocabulary_shards_match_cpu() {
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(34);
    let mut used = Vec::new();
    for dt in [Dt::Bf16, Dt::F32] {
        let mut u = 0f64;
        let p = Problem::new(&mut rng, (11, 9, 61), dt);
        let saved = Op::Backward;
        for shard in [(0, 20), (20, 30), (50, 11)] {
            for chunk in [2, 11] {
                let mut s = Setup::new(dt);
                s.shard = Some(shard);
                s.chunk = chunk;
                u = u.max(check(&p, &s, &Op::ShardStats, g));
                u = u.max(check(&p, &s, &saved, g));
            }
        }
        used.push((dt, u));
    }
    report("vocabulary shards", &used);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn no_tokens_overwrite_zeroes_and_accumulate_keeps_the_gradients() {
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(37);
    let p = Problem::new(&mut rng, (0, 3, 5), Dt::Bf16);
    let mut s = Setup::new(Dt::Bf16);
    for accumulate in [false, true] {
        s.accumulate = accumulate;
        check(&p, &s, &Op::ForwardBackward, g);
        check(&p, &s, &Op::Backward, g);
        let got = run(Some(g), &p, &s, &Op::ForwardBackward).unwrap();
        let dw = &got.iter().find(|(n, _)| *n == "d_weight").unwrap().1;
        let want = if accumulate {
            p.d_weight0.clone()
        } else {
            vec![0.0; 15]
        };
        assert_eq!(dw, &want, "accumulate {accumulate}");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn repeated_calls_are_bitwise_equal() {
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(35);
    let p = Problem::new(&mut rng, (19, 12, 77), Dt::Bf16);
    let mut s = Setup::new(Dt::Bf16);
    s.chunk = 5;
    let a = run(Some(g), &p, &s, &Op::ForwardBackward).unwrap();
    let b = run(Some(g), &p, &s, &Op::ForwardBackward).unwrap();
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(x),
            bits(y),
            "{name} differs between two identical calls"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn bad_input_is_refused_by_name() {
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(36);
    let p = Problem::new(&mut rng, (6, 8, 40), Dt::Bf16);
    let base = Setup::new(Dt::Bf16);
    let mut cases: Vec<(Setup, Op, CalibrlStatus, &str)> = Vec::new();
    let mut s = base;
    s.workspace_delta = -1;
    cases.push((s, Op::Forward, CalibrlStatus::BufferTooSmall, "workspace"));
    cases.push((
        s,
        Op::ForwardBackward,
        CalibrlStatus::BufferTooSmall,
        "workspace",
    ));
    let mut s = base;
    s.d_hidden = Dt::F64;
    cases.push((
        s,
        Op::ForwardBackward,
        CalibrlStatus::DtypeMismatch,
        "d_hidden",
    ));
    s.d_hidden = Dt::F16;
    cases.push((
        s,
        Op::ForwardBackward,
        CalibrlStatus::DtypeMismatch,
        "d_hidden",
    ));
    let mut s = base;
    s.chunk = 0;
    cases.push((s, Op::Forward, CalibrlStatus::InvalidArgument, "chunk_size"));
    for (s, op, status, name) in cases {
        match run(Some(g), &p, &s, &op) {
            Ok(_) => panic!("{op:?} {s:?}: accepted"),
            Err((st, msg)) => {
                assert_eq!(st, status, "{op:?} {s:?}: {msg}");
                assert!(
                    msg.contains(name),
                    "{op:?}: the message names `{name}`: {msg}"
                );
            }
        }
    }
    // The exact size the query returns is enough; on CUDA it holds cuBLAS's 32 MiB beside the
    // chunk's logits in the input dtype.
    let mut s = base;
    s.chunk = 6;
    run(Some(g), &p, &s, &Op::ForwardBackward).unwrap();
    let hidden = Buf::new(Some(g), &[0; 6 * 8 * 2], Dt::Bf16.dl(), &[6, 8]);
    let weight = Buf::new(Some(g), &[0; 40 * 8 * 2], Dt::Bf16.dl(), &[40, 8]);
    let mut bytes = 0;
    // SAFETY: valid descriptors.
    let st = unsafe { calibrl_fused_linear_workspace_size(hidden.p(), weight.p(), 6, &mut bytes) };
    assert_eq!(st, CalibrlStatus::Ok);
    assert!(bytes >= 6 * 40 * 2 + (32 << 20), "{bytes}");
    // `run` checks that a refused call left every output as it was (NaN, or the d_weight being
    // accumulated into).
    let mut s = base;
    s.accumulate = true;
    s.workspace_delta = -1;
    assert!(run(Some(g), &p, &s, &Op::ForwardBackward).is_err());
}

#[test]
fn missing_cublas_names_every_place_searched() {
    let own = Path::new("/nonexistent/site-packages/calibrl");
    let dirs13 = search_dirs(13, Some(own));
    assert_eq!(
        dirs13[0],
        Some(PathBuf::from("/nonexistent/site-packages/nvidia/cu13/lib"))
    );
    let dirs12 = search_dirs(12, Some(own));
    assert_eq!(
        dirs12[0],
        Some(PathBuf::from(
            "/nonexistent/site-packages/nvidia/cublas/lib"
        ))
    );
    assert_eq!(CUBLAS.soname(13), "libcublas.so.13");
    // Only places that cannot hold it: the wheel directories and a toolkit that does not exist.
    let find = |major: u32| {
        let dirs = [
            Some(PathBuf::from(format!(
                "/nonexistent/site-packages/nvidia/cu{major}/lib"
            ))),
            Some(PathBuf::from("/nonexistent/cuda/lib64")),
        ];
        open_first(&CUBLAS.soname(major), &dirs)
    };
    let err = locate(&majors_for(13), &find).unwrap_err();
    for place in [
        "/nonexistent/site-packages/nvidia/cu13/lib/libcublas.so.13",
        "/nonexistent/site-packages/nvidia/cu12/lib/libcublas.so.12",
        "/nonexistent/cuda/lib64/libcublas.so.13",
        "/nonexistent/cuda/lib64/libcublas.so.12",
        "pip install nvidia-cublas",
    ] {
        assert!(err.contains(place), "the error names {place}: {err}");
    }
    assert!(locate(&majors_for(11), &find)
        .unwrap_err()
        .contains("no CUDA major"));
}
