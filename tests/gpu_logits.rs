//! GPU tests of the fused logits path: every CUDA operation against the CPU backend on fresh
//! random inputs, through the C ABI.
//!
//! The tests that need a device are `#[ignore]`d with that reason, so a plain `cargo test`
//! reports them as ignored; run them with `-- --include-ignored` on a GPU machine
//! (scripts/gpu-check.sh does). Without a CUDA driver or device they then print
//! "skipped: no CUDA device" and return.
//! `CALIBRL_GPU_TEST_QUICK=1` shrinks the sizes (for compute-sanitizer runs) and skips the
//! > 2^31-element test. `CALIBRL_GPU_TEST_SEED=<u64>` fixes the random seed (default: time).
//!
//! Every output buffer is filled with NaN before a GPU call, so a comparison against the
//! (always finite or ±inf) CPU result also proves each element was written.

use calibrl::cuda::logits::{forward_backward_path, LogitsPath};
use calibrl::desc::logits::{ForwardBackward, LogitsInput};
use calibrl::ffi::common::calibrl_last_error_message;
use calibrl::ffi::logits::{
    calibrl_logits_backward, calibrl_logits_forward, calibrl_logits_shard_finish,
    calibrl_logits_shard_stats,
};
use calibrl::ops::logits::forward_backward;
use calibrl::tensor::{DLDataType, DLDevice, DLTensor, DType, Tensor, DL_CPU, DL_CUDA};
use calibrl::CalibrlStatus;
use cudarc::driver::{CudaSlice, DevicePtr};
use half::{bf16, f16};
use std::ffi::c_void;

#[macro_use]
mod gpu_common;
use gpu_common::{Gpu, Rng};

// ------------------------------------------------------------------------------------------------
// Random numbers

fn quick() -> bool {
    std::env::var("CALIBRL_GPU_TEST_QUICK").is_ok_and(|v| v == "1")
}

impl Rng {
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Approximately standard normal (Irwin–Hall of 4).
    fn normal(&mut self) -> f32 {
        let x = self.next();
        let u = |s: u32| ((x >> s) & 0xffff) as f32 / 65536.0;
        (u(0) + u(16) + u(32) + u(48) - 2.0) * 1.732
    }
}

// ------------------------------------------------------------------------------------------------
// dtypes and host buffers

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
        match self {
            Dt::Bf16 => DLDataType {
                code: 4,
                bits: 16,
                lanes: 1,
            },
            Dt::F16 => DLDataType {
                code: 2,
                bits: 16,
                lanes: 1,
            },
            Dt::F32 => DLDataType {
                code: 2,
                bits: 32,
                lanes: 1,
            },
            Dt::F64 => DLDataType {
                code: 2,
                bits: 64,
                lanes: 1,
            },
        }
    }
    fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        for &v in values {
            match self {
                Dt::Bf16 => out.extend(bf16::from_f32(v).to_le_bytes()),
                Dt::F16 => out.extend(f16::from_f32(v).to_le_bytes()),
                Dt::F32 => out.extend(v.to_le_bytes()),
                Dt::F64 => out.extend((v as f64).to_le_bytes()),
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
    fn nan(self, n: usize) -> Vec<u8> {
        self.encode(&vec![f32::NAN; n])
    }
    /// Relative spacing of the dtype at the bottom of a binade (one rounding step).
    fn ulp(self) -> f64 {
        match self {
            Dt::Bf16 => 2f64.powi(-7),
            Dt::F16 => 2f64.powi(-10),
            Dt::F32 => 2f64.powi(-23),
            Dt::F64 => 0.0,
        }
    }
    /// Smallest positive subnormal (absolute resolution near zero).
    fn tiny(self) -> f64 {
        match self {
            Dt::F16 => 6e-8,
            _ => 1e-38,
        }
    }
}

/// 8-byte aligned host bytes (the CPU backend reads them as typed slices).
struct HostBuf {
    words: Vec<u64>,
    len: usize,
}

impl HostBuf {
    fn new(bytes: &[u8]) -> HostBuf {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `words` holds at least `bytes.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                words.as_mut_ptr() as *mut u8,
                bytes.len(),
            )
        };
        HostBuf {
            words,
            len: bytes.len(),
        }
    }
    fn ptr(&mut self) -> *mut c_void {
        self.words.as_mut_ptr() as *mut c_void
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

fn labels_bytes(labels: &[i64], as_i64: bool) -> Vec<u8> {
    if as_i64 {
        labels.iter().flat_map(|l| l.to_le_bytes()).collect()
    } else {
        labels
            .iter()
            .flat_map(|&l| (l as i32).to_le_bytes())
            .collect()
    }
}

fn label_dtype(as_i64: bool) -> DLDataType {
    DLDataType {
        code: 0,
        bits: if as_i64 { 64 } else { 32 },
        lanes: 1,
    }
}

// ------------------------------------------------------------------------------------------------
// DLPack descriptors

/// A descriptor that owns its shape and strides arrays.
struct Desc {
    _shape: Vec<i64>,
    _strides: Vec<i64>,
    t: DLTensor,
}

impl Desc {
    fn new(
        data: *mut c_void,
        device_type: i32,
        dtype: DLDataType,
        shape: &[usize],
        strides: Option<&[usize]>,
        byte_offset: usize,
    ) -> Box<Desc> {
        let mut d = Box::new(Desc {
            _shape: shape.iter().map(|&s| s as i64).collect(),
            _strides: strides
                .map(|s| s.iter().map(|&x| x as i64).collect())
                .unwrap_or_default(),
            t: DLTensor {
                data,
                device: DLDevice {
                    device_type,
                    device_id: 0,
                },
                ndim: shape.len() as i32,
                dtype,
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: byte_offset as u64,
            },
        });
        d.t.shape = d._shape.as_mut_ptr();
        if strides.is_some() {
            d.t.strides = d._strides.as_mut_ptr();
        }
        d
    }
    fn p(&self) -> *const DLTensor {
        &self.t
    }
    fn m(&mut self) -> *mut DLTensor {
        &mut self.t
    }
}

fn host_desc(buf: &mut HostBuf, dtype: DLDataType, shape: &[usize]) -> Box<Desc> {
    Desc::new(buf.ptr(), DL_CPU, dtype, shape, None, 0)
}

fn last_error() -> String {
    // SAFETY: the library returns a valid NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(calibrl_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

fn ok(status: CalibrlStatus, what: &str) {
    assert_eq!(status, CalibrlStatus::Ok, "{what}: {}", last_error());
}

/// `calibrl_logits_backward` over built descriptors; `rows` are `[lse, entropy, grad_logprobs,
/// grad_entropy]` (null where absent), `stream` null for the CPU backend.
fn logits_backward(
    logits: &Desc,
    labels: &Desc,
    temperature: f64,
    vocab_start: i64,
    rows: [*const DLTensor; 4],
    grad_logits: &mut Desc,
    stream: *mut c_void,
) -> CalibrlStatus {
    // SAFETY: every descriptor (and each non-null row pointer) describes live memory of its
    // stated shape, on the device `stream` belongs to.
    unsafe {
        calibrl_logits_backward(
            logits.p(),
            labels.p(),
            temperature,
            vocab_start,
            rows[0],
            rows[1],
            rows[2],
            rows[3],
            grad_logits.m(),
            stream,
        )
    }
}

/// Device buffer of raw bytes.
struct DevBuf {
    slice: CudaSlice<u8>,
}

impl DevBuf {
    fn upload(g: &Gpu, bytes: &[u8]) -> DevBuf {
        DevBuf {
            slice: g.stream.memcpy_stod(bytes).unwrap(),
        }
    }
    fn ptr(&self, g: &Gpu) -> *mut c_void {
        let (p, _sync) = self.slice.device_ptr(&g.stream);
        p as usize as *mut c_void
    }
    fn desc(
        &self,
        g: &Gpu,
        dtype: DLDataType,
        shape: &[usize],
        strides: Option<&[usize]>,
        byte_offset: usize,
    ) -> Box<Desc> {
        Desc::new(self.ptr(g), DL_CUDA, dtype, shape, strides, byte_offset)
    }
    fn download(&self, g: &Gpu) -> Vec<u8> {
        let v = g.stream.memcpy_dtov(&self.slice).unwrap();
        g.stream.synchronize().unwrap();
        v
    }
}

// ------------------------------------------------------------------------------------------------
// Comparison

/// `calibrl_logits_forward` into `outs` = [logprobs, entropy, lse], on the host or on the
/// device as the descriptors and `stream` say.
fn forward_into(
    logits: &Desc,
    labels: &Desc,
    temperature: f64,
    outs: &mut [Box<Desc>],
    stream: *mut c_void,
) -> CalibrlStatus {
    let [a, b, c] = outs else {
        panic!("forward_into takes three outputs, got {}", outs.len())
    };
    // SAFETY: every caller's descriptors point at live memory of their stated shapes.
    unsafe {
        calibrl_logits_forward(
            logits.p(),
            labels.p(),
            temperature,
            a.m(),
            b.m(),
            c.m(),
            stream,
        )
    }
}

/// Compares element-wise; `tol(i, want)` gives the allowed absolute difference. NaN must match
/// NaN and an infinity the same infinity.
fn compare(what: &str, got: &[f64], want: &[f64], tol: impl Fn(usize, f64) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut bad = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let fine = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            g.is_finite() && (g - w).abs() <= tol(i, w)
        };
        if !fine {
            bad.push(i);
        }
    }
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {} of {} elements differ; first at {i}: got {}, want {} (tolerance {:e})",
            bad.len(),
            got.len(),
            got[i],
            want[i],
            tol(i, want[i])
        );
    }
}

fn bits_equal(what: &str, a: &[u8], b: &[u8]) {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: not bitwise deterministic (first differing byte {i})");
    }
    assert_eq!(a.len(), b.len(), "{what}");
}

// ------------------------------------------------------------------------------------------------
// Problems

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// normal(0, 3) plus a per-row offset in [-20, 20]
    Normal,
    /// Normal, with ~1% of entries ±1e4 and ~2% -inf (never a whole row)
    Extreme,
}

/// One random problem; `logits` holds values already rounded to `dt`.
struct Problem {
    n: usize,
    v: usize,
    dt: Dt,
    temperature: f64,
    labels: Vec<i64>,
    labels_i64: bool,
    logits: Vec<f32>,
    grad_logprobs: Vec<f32>,
    grad_entropy: Option<Vec<f32>>,
    /// max |z / T| over finite logits
    umax: f64,
}

impl Problem {
    fn new(
        rng: &mut Rng,
        n: usize,
        v: usize,
        dt: Dt,
        kind: Kind,
        temperature: f64,
        with_grad_entropy: bool,
    ) -> Problem {
        let mut logits = Vec::with_capacity(n * v);
        for _ in 0..n {
            let offset = (rng.uniform() - 0.5) * 40.0;
            for j in 0..v {
                let mut z = offset + 3.0 * rng.normal();
                if kind == Kind::Extreme {
                    let r = rng.uniform();
                    if r < 0.005 {
                        z = 1e4;
                    } else if r < 0.01 {
                        z = -1e4;
                    } else if r < 0.03 && j > 0 {
                        z = f32::NEG_INFINITY;
                    }
                }
                logits.push(z);
            }
        }
        // Round to the dtype so both backends see the same values.
        let logits = dt
            .decode(&dt.encode(&logits))
            .into_iter()
            .map(|x| x as f32)
            .collect::<Vec<_>>();
        // A label on a −inf logit would make log p = −inf, which the CPU backend rejects as an
        // out-of-range result: such a row takes label 0 (never −inf) instead.
        let labels = (0..n)
            .map(|row| {
                if rng.uniform() < 0.1 {
                    -1 - rng.below(3) as i64
                } else {
                    let y = rng.below(v);
                    if logits[row * v + y].is_finite() {
                        y as i64
                    } else {
                        0
                    }
                }
            })
            .collect();
        let grad_logprobs = (0..n).map(|_| rng.normal()).collect();
        let grad_entropy = with_grad_entropy.then(|| (0..n).map(|_| 0.5 * rng.normal()).collect());
        let umax = logits
            .iter()
            .filter(|z| z.is_finite())
            .fold(0f64, |m, z| m.max(z.abs() as f64))
            / temperature;
        Problem {
            n,
            v,
            dt,
            temperature,
            labels,
            labels_i64: rng.uniform() < 0.5,
            logits,
            grad_logprobs,
            grad_entropy,
            umax,
        }
    }

    fn logits_bytes(&self) -> Vec<u8> {
        self.dt.encode(&self.logits)
    }

    /// f32 tolerance factor of the kernels' exponent arguments (grows with |u|).
    fn eps(&self) -> f64 {
        4e-6 + 5e-7 * self.umax
    }

    fn forward_tol(&self) -> impl Fn(usize, f64) -> f64 {
        let a = 2e-5 + 5e-7 * self.umax;
        move |_, w: f64| a + 2e-6 * w.abs()
    }

    /// Per-row tolerance of d-logits in dtype `out`.
    fn backward_tol(&self, entropy: &[f64]) -> impl Fn(usize, f64) -> f64 {
        let eps = self.eps();
        let (v, dt, t) = (self.v, self.dt, self.temperature);
        let scales: Vec<f64> = (0..self.n)
            .map(|k| {
                let h = self
                    .grad_entropy
                    .as_ref()
                    .map_or(0.0, |h| h[k].abs() as f64);
                (self.grad_logprobs[k].abs() as f64 + h * (entropy[k].abs() + 30.0)) / t
            })
            .collect();
        move |i, w: f64| 4.0 * eps * scales[i / v] + (eps + 2.0 * dt.ulp()) * w.abs() + dt.tiny()
    }
}

/// (logprobs, entropy, lse) as f64.
type RowOutputs = (Vec<f64>, Vec<f64>, Vec<f64>);

fn cpu_forward(p: &Problem) -> RowOutputs {
    let mut logits = HostBuf::new(&p.logits_bytes());
    let mut labels = HostBuf::new(&labels_bytes(&p.labels, p.labels_i64));
    let mut outs: Vec<HostBuf> = (0..3).map(|_| HostBuf::new(&Dt::F32.nan(p.n))).collect();
    let lg = host_desc(&mut logits, p.dt.dl(), &[p.n, p.v]);
    let lb = host_desc(&mut labels, label_dtype(p.labels_i64), &[p.n]);
    let mut o: Vec<Box<Desc>> = outs
        .iter_mut()
        .map(|b| host_desc(b, Dt::F32.dl(), &[p.n]))
        .collect();
    ok(
        forward_into(&lg, &lb, p.temperature, &mut o, std::ptr::null_mut()),
        "cpu forward",
    );
    drop(o);
    let d = |b: &HostBuf| Dt::F32.decode(b.bytes());
    (d(&outs[0]), d(&outs[1]), d(&outs[2]))
}

/// Row vectors saved by the forward (uploaded as f32 to both backends).
struct Saved {
    lse: Vec<f32>,
    entropy: Vec<f32>,
}

impl Saved {
    fn from(fwd: &RowOutputs) -> Saved {
        Saved {
            lse: fwd.2.iter().map(|&x| x as f32).collect(),
            entropy: fwd.1.iter().map(|&x| x as f32).collect(),
        }
    }
}

fn cpu_backward(p: &Problem, saved: &Saved) -> Vec<f64> {
    let mut logits = HostBuf::new(&p.logits_bytes());
    let mut grad = HostBuf::new(&p.dt.nan(p.n * p.v));
    let mut labels = HostBuf::new(&labels_bytes(&p.labels, p.labels_i64));
    let mut lse = HostBuf::new(&Dt::F32.encode(&saved.lse));
    let mut ent = HostBuf::new(&Dt::F32.encode(&saved.entropy));
    let mut gl = HostBuf::new(&Dt::F32.encode(&p.grad_logprobs));
    let mut ge = p
        .grad_entropy
        .as_ref()
        .map(|h| HostBuf::new(&Dt::F32.encode(h)));
    let f = Dt::F32.dl();
    let lg = host_desc(&mut logits, p.dt.dl(), &[p.n, p.v]);
    let mut gd = host_desc(&mut grad, p.dt.dl(), &[p.n, p.v]);
    let lb = host_desc(&mut labels, label_dtype(p.labels_i64), &[p.n]);
    let ls = host_desc(&mut lse, f, &[p.n]);
    let en = host_desc(&mut ent, f, &[p.n]);
    let gld = host_desc(&mut gl, f, &[p.n]);
    let ged = ge.as_mut().map(|b| host_desc(b, f, &[p.n]));
    let ged_p = ged.as_ref().map_or(std::ptr::null(), |d| d.p());
    let rows = [ls.p(), en.p(), gld.p(), ged_p];
    let st = logits_backward(
        &lg,
        &lb,
        p.temperature,
        0,
        rows,
        &mut gd,
        std::ptr::null_mut(),
    );
    ok(st, "cpu backward");
    drop(gd);
    p.dt.decode(grad.bytes())
}

/// The problem's row inputs on the device.
struct DevRows {
    labels: DevBuf,
    lse: DevBuf,
    entropy: DevBuf,
    grad_logprobs: DevBuf,
    grad_entropy: Option<DevBuf>,
}

impl DevRows {
    fn upload(g: &Gpu, p: &Problem, saved: &Saved) -> DevRows {
        DevRows {
            labels: DevBuf::upload(g, &labels_bytes(&p.labels, p.labels_i64)),
            lse: DevBuf::upload(g, &Dt::F32.encode(&saved.lse)),
            entropy: DevBuf::upload(g, &Dt::F32.encode(&saved.entropy)),
            grad_logprobs: DevBuf::upload(g, &Dt::F32.encode(&p.grad_logprobs)),
            grad_entropy: p
                .grad_entropy
                .as_ref()
                .map(|h| DevBuf::upload(g, &Dt::F32.encode(h))),
        }
    }
    fn labels_desc(&self, g: &Gpu, p: &Problem) -> Box<Desc> {
        self.labels
            .desc(g, label_dtype(p.labels_i64), &[p.n], None, 0)
    }
}

/// A `[n, v]` view of a device buffer of row stride `stride` starting `offset` elements in.
#[derive(Clone, Copy)]
struct View {
    n: usize,
    v: usize,
    stride: usize,
    offset: usize,
}

impl View {
    fn full(p: &Problem) -> View {
        View {
            n: p.n,
            v: p.v,
            stride: p.v,
            offset: 0,
        }
    }
    fn desc(&self, g: &Gpu, buf: &DevBuf, dt: Dt) -> Box<Desc> {
        buf.desc(
            g,
            dt.dl(),
            &[self.n, self.v],
            Some(&[self.stride, 1]),
            self.offset * dt.size(),
        )
    }
}

/// Runs the GPU forward into fresh NaN-poisoned f32 outputs; returns (outputs, raw bytes).
fn gpu_forward(g: &Gpu, p: &Problem, logits: &DevBuf, rows: &DevRows) -> (RowOutputs, Vec<u8>) {
    let outs: Vec<DevBuf> = (0..3)
        .map(|_| DevBuf::upload(g, &Dt::F32.nan(p.n)))
        .collect();
    let lg = View::full(p).desc(g, logits, p.dt);
    let lb = rows.labels_desc(g, p);
    let mut o: Vec<Box<Desc>> = outs
        .iter()
        .map(|b| b.desc(g, Dt::F32.dl(), &[p.n], None, 0))
        .collect();
    ok(
        forward_into(
            &lg,
            &lb,
            p.temperature,
            &mut o,
            g.stream.cu_stream() as *mut c_void,
        ),
        "gpu forward",
    );
    let raw: Vec<Vec<u8>> = outs.iter().map(|b| b.download(g)).collect();
    let d = |b: &[u8]| Dt::F32.decode(b);
    ((d(&raw[0]), d(&raw[1]), d(&raw[2])), raw.concat())
}

/// Runs the GPU backward over `view` of `logits` writing into `view_out` of `out` (the same
/// buffer and view for in place).
#[allow(clippy::too_many_arguments)]
fn gpu_backward_into(
    g: &Gpu,
    p: &Problem,
    logits: &DevBuf,
    view: View,
    out: &DevBuf,
    view_out: View,
    vocab_start: i64,
    rows: &DevRows,
) {
    let lg = view.desc(g, logits, p.dt);
    let mut gd = view_out.desc(g, out, p.dt);
    let f = Dt::F32.dl();
    let lb = rows.labels_desc(g, p);
    let ls = rows.lse.desc(g, f, &[p.n], None, 0);
    let en = rows.entropy.desc(g, f, &[p.n], None, 0);
    let gl = rows.grad_logprobs.desc(g, f, &[p.n], None, 0);
    let ge = rows
        .grad_entropy
        .as_ref()
        .map(|b| b.desc(g, f, &[p.n], None, 0));
    let ge_p = ge.as_ref().map_or(std::ptr::null(), |d| d.p());
    // In place: pass the very same descriptor contents for logits and grad_logits.
    let stream = g.stream.cu_stream() as *mut c_void;
    let rows = [ls.p(), en.p(), gl.p(), ge_p];
    let st = logits_backward(&lg, &lb, p.temperature, vocab_start, rows, &mut gd, stream);
    ok(st, "gpu backward");
}

// ------------------------------------------------------------------------------------------------
// Tests

/// (N, V) pairs: N ∈ {1, 7, 1000} for V up to 32000, fewer rows for the big vocabularies.
fn sizes() -> Vec<(usize, usize)> {
    if quick() {
        return vec![(1, 1), (7, 5), (3, 1000), (2, 32000), (2, 152_064)];
    }
    let mut s = Vec::new();
    for v in [1usize, 5, 32000] {
        for n in [1usize, 7, 1000] {
            s.push((n, v));
        }
    }
    for v in [152_064usize, 262_144] {
        for n in [1usize, 7, 100] {
            s.push((n, v));
        }
    }
    s
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn forward_and_backward_match_cpu() {
    let (g, _lock) = require_gpu!();
    let mut rng = Rng::new(1);
    let mut case = 0;
    for dt in [Dt::Bf16, Dt::F16, Dt::F32] {
        for &(n, v) in &sizes() {
            case += 1;
            let kind = if case % 3 == 0 {
                Kind::Extreme
            } else {
                Kind::Normal
            };
            let temperature = [1.0, 0.7, 1.3][case % 3];
            let p = Problem::new(&mut rng, n, v, dt, kind, temperature, case % 2 == 0);
            let what = format!(
                "{dt:?} N={n} V={v} {kind:?} T={temperature} labels_i64={}",
                p.labels_i64
            );
            println!("{what}");

            let want = cpu_forward(&p);
            let saved = Saved::from(&want);
            let logits = DevBuf::upload(g, &p.logits_bytes());
            let rows = DevRows::upload(g, &p, &saved);
            let (got, raw1) = gpu_forward(g, &p, &logits, &rows);
            compare(
                &format!("{what}: logprobs"),
                &got.0,
                &want.0,
                p.forward_tol(),
            );
            compare(
                &format!("{what}: entropy"),
                &got.1,
                &want.1,
                p.forward_tol(),
            );
            compare(&format!("{what}: lse"), &got.2, &want.2, p.forward_tol());
            let (_, raw2) = gpu_forward(g, &p, &logits, &rows);
            bits_equal(&format!("{what}: forward"), &raw1, &raw2);

            let want_grad = cpu_backward(&p, &saved);
            let tol = p.backward_tol(&want.1);
            // Out of place, twice (determinism), into NaN-poisoned buffers.
            let mut outs = Vec::new();
            for _ in 0..2 {
                let out = DevBuf::upload(g, &dt.nan(n * v));
                gpu_backward_into(
                    g,
                    &p,
                    &logits,
                    View::full(&p),
                    &out,
                    View::full(&p),
                    0,
                    &rows,
                );
                outs.push(out.download(g));
            }
            compare(
                &format!("{what}: d-logits (out of place)"),
                &dt.decode(&outs[0]),
                &want_grad,
                &tol,
            );
            bits_equal(&format!("{what}: backward"), &outs[0], &outs[1]);
            // The logits were not modified by the out-of-place backward.
            bits_equal(
                &format!("{what}: logits after out-of-place backward"),
                &logits.download(g),
                &p.logits_bytes(),
            );
            // In place.
            gpu_backward_into(
                g,
                &p,
                &logits,
                View::full(&p),
                &logits,
                View::full(&p),
                0,
                &rows,
            );
            let in_place = logits.download(g);
            compare(
                &format!("{what}: d-logits (in place)"),
                &dt.decode(&in_place),
                &want_grad,
                &tol,
            );
            bits_equal(
                &format!("{what}: in place vs out of place"),
                &in_place,
                &outs[0],
            );
        }
    }
}

/// Runs `forward_backward` (the Rust API behind `calibrl_logits_forward_backward`) writing d-logits
/// into `out` (`logits` itself for in place) and fresh NaN-poisoned f32 row outputs (entropy only
/// when `entropy_out`); returns (outputs, raw output bytes). A missing entropy output reads NaN.
fn gpu_forward_backward(
    g: &Gpu,
    p: &Problem,
    logits: &DevBuf,
    out: &DevBuf,
    rows: &DevRows,
    entropy_out: bool,
) -> (RowOutputs, Vec<u8>) {
    let outs: Vec<DevBuf> = (0..3)
        .map(|_| DevBuf::upload(g, &Dt::F32.nan(p.n)))
        .collect();
    let f = Dt::F32.dl();
    let lg = View::full(p).desc(g, logits, p.dt);
    let gd = View::full(p).desc(g, out, p.dt);
    let lb = rows.labels_desc(g, p);
    let gl = rows.grad_logprobs.desc(g, f, &[p.n], None, 0);
    let ge = rows
        .grad_entropy
        .as_ref()
        .map(|b| b.desc(g, f, &[p.n], None, 0));
    let o: Vec<Box<Desc>> = outs.iter().map(|b| b.desc(g, f, &[p.n], None, 0)).collect();
    // SAFETY: every descriptor points at live device memory of its stated shape and outlives
    // the call.
    let args = unsafe {
        ForwardBackward {
            input: LogitsInput::new(
                Tensor::from_raw(lg.p(), "logits").unwrap(),
                Tensor::from_raw(lb.p(), "labels").unwrap(),
                p.temperature,
                0,
            )
            .unwrap(),
            grad_logprobs: Tensor::from_raw(gl.p(), "grad_logprobs").unwrap(),
            grad_entropy: Tensor::optional(
                ge.as_ref().map_or(std::ptr::null(), |d| d.p()),
                "grad_entropy",
            )
            .unwrap(),
            logprobs: Tensor::from_raw(o[0].p(), "logprobs").unwrap(),
            entropy: Tensor::optional(
                if entropy_out {
                    o[1].p()
                } else {
                    std::ptr::null()
                },
                "entropy",
            )
            .unwrap(),
            lse: Tensor::from_raw(o[2].p(), "lse").unwrap(),
            grad_logits: Tensor::from_raw(gd.p(), "grad_logits").unwrap(),
        }
    };
    forward_backward(&args, g.stream.cu_stream() as *mut c_void)
        .unwrap_or_else(|e| panic!("gpu forward_backward: {e}"));
    drop(args);
    let raw: Vec<Vec<u8>> = outs.iter().map(|b| b.download(g)).collect();
    let d = |b: &[u8]| Dt::F32.decode(b);
    ((d(&raw[0]), d(&raw[1]), d(&raw[2])), raw.concat())
}

/// The largest V whose rows of `dt` the single pass holds in one CTA on this device (0: the
/// single pass does not apply, e.g. below sm_90).
fn single_cta_capacity(dt: DType) -> usize {
    let one = |v| {
        matches!(
            forward_backward_path(0, v, dt).unwrap(),
            LogitsPath::SinglePass { cluster: 1, .. }
        )
    };
    if !one(1) {
        return 0;
    }
    let (mut lo, mut hi) = (1usize, 1usize << 24);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if one(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// An odd V near `x`, divisible by none of 3, 5, 7 (no vector or thread count divides it).
fn odd_near(x: usize) -> usize {
    let mut v = x.max(1) | 1;
    while v > 7 && (v % 3 == 0 || v % 5 == 0 || v % 7 == 0) {
        v += 2;
    }
    v
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn forward_backward_single_pass_matches_cpu_and_three_passes() {
    let (g, _lock) = require_gpu!();
    let mut rng = Rng::new(3);
    let mut case = 0;
    for (dt, dtype) in [
        (Dt::Bf16, DType::BF16),
        (Dt::F16, DType::F16),
        (Dt::F32, DType::F32),
    ] {
        let cap = single_cta_capacity(dtype);
        // V for clusters of 1, 2, 4 and 8 CTAs, and one past 8 CTAs (the three-pass fallback).
        let mut shapes: Vec<(usize, Option<usize>)> = vec![(odd_near(5), Some(1))];
        if cap > 0 {
            shapes.push((odd_near(cap * 2 / 3), Some(1)));
            shapes.push((odd_near(cap * 3 / 2), Some(2)));
            shapes.push((odd_near(cap * 3), Some(4)));
            if !quick() || cap <= 1 << 15 {
                shapes.push((odd_near(cap * 6), Some(8)));
                shapes.push((odd_near(cap * 9), None));
            }
        } else {
            shapes[0].1 = None;
            println!(
                "single pass unavailable on this device: checking the three-pass fallback only"
            );
        }
        for &(v, cluster) in &shapes {
            case += 1;
            let path = forward_backward_path(0, v, dtype).unwrap();
            match (cluster, path) {
                (Some(c), LogitsPath::SinglePass { cluster, .. }) => {
                    assert_eq!(cluster, c, "{dt:?} V={v}: {path:?}")
                }
                (None, LogitsPath::ThreePass) => {}
                _ => panic!("{dt:?} V={v}: expected cluster {cluster:?}, the plan is {path:?}"),
            }
            let n = if quick() { 5 } else { 19 };
            let kind = if case % 3 == 0 {
                Kind::Extreme
            } else {
                Kind::Normal
            };
            let temperature = [1.0, 0.7, 1.3][case % 3];
            let with_h = case % 2 == 0;
            let mut p = Problem::new(&mut rng, n, v, dt, kind, temperature, with_h);
            p.labels[1] = -1; // always an ignored row
            let entropy_out = with_h || case % 4 == 1;
            let what = format!("{dt:?} N={n} V={v} {path:?} {kind:?} T={temperature} grad_entropy={with_h} entropy_out={entropy_out}");
            println!("{what}");

            let want = cpu_forward(&p);
            let saved = Saved::from(&want);
            let want_grad = cpu_backward(&p, &saved);
            let logits = DevBuf::upload(g, &p.logits_bytes());
            let rows = DevRows::upload(g, &p, &saved);

            // Out of place, twice (determinism), into NaN-poisoned buffers.
            let mut runs = Vec::new();
            for _ in 0..2 {
                let out = DevBuf::upload(g, &dt.nan(n * v));
                let (got, raw) = gpu_forward_backward(g, &p, &logits, &out, &rows, entropy_out);
                runs.push((got, raw, out.download(g)));
            }
            let (got, raw, grad) = &runs[0];
            compare(
                &format!("{what}: logprobs"),
                &got.0,
                &want.0,
                p.forward_tol(),
            );
            if entropy_out {
                compare(
                    &format!("{what}: entropy"),
                    &got.1,
                    &want.1,
                    p.forward_tol(),
                );
            } else {
                assert!(
                    got.1.iter().all(|x| x.is_nan()),
                    "{what}: entropy written without an entropy output"
                );
            }
            compare(&format!("{what}: lse"), &got.2, &want.2, p.forward_tol());
            let tol = p.backward_tol(&want.1);
            compare(
                &format!("{what}: d-logits vs CPU"),
                &dt.decode(grad),
                &want_grad,
                &tol,
            );
            bits_equal(&format!("{what}: row outputs"), raw, &runs[1].1);
            bits_equal(&format!("{what}: d-logits"), grad, &runs[1].2);
            bits_equal(
                &format!("{what}: logits after out-of-place forward_backward"),
                &logits.download(g),
                &p.logits_bytes(),
            );

            // Today's three passes (forward, then backward from its saved lse and entropy).
            let (three, _) = gpu_forward(g, &p, &logits, &rows);
            compare(
                &format!("{what}: logprobs vs three passes"),
                &got.0,
                &three.0,
                p.forward_tol(),
            );
            compare(
                &format!("{what}: lse vs three passes"),
                &got.2,
                &three.2,
                p.forward_tol(),
            );
            if entropy_out {
                compare(
                    &format!("{what}: entropy vs three passes"),
                    &got.1,
                    &three.1,
                    p.forward_tol(),
                );
            }
            let three_rows = DevRows::upload(g, &p, &Saved::from(&three));
            let three_grad = DevBuf::upload(g, &dt.nan(n * v));
            gpu_backward_into(
                g,
                &p,
                &logits,
                View::full(&p),
                &three_grad,
                View::full(&p),
                0,
                &three_rows,
            );
            compare(
                &format!("{what}: d-logits vs three passes"),
                &dt.decode(grad),
                &dt.decode(&three_grad.download(g)),
                &tol,
            );

            // In place: the same bits as out of place.
            let (_, raw_in_place) =
                gpu_forward_backward(g, &p, &logits, &logits, &rows, entropy_out);
            bits_equal(&format!("{what}: row outputs in place"), &raw_in_place, raw);
            bits_equal(
                &format!("{what}: d-logits in place"),
                &logits.download(g),
                grad,
            );
        }
    }
}

/// `forward_backward` on the CPU backend (its reference on CUDA's fallback side): the bits of
/// `forward` then `backward`, and the argument rules of `ForwardBackward` (no GPU needed).
#[test]
fn forward_backward_on_cpu_is_forward_then_backward_and_checks_arguments() {
    let mut rng = Rng::new(4);
    let p = Problem::new(&mut rng, 6, 37, Dt::Bf16, Kind::Normal, 0.9, true);
    let want = cpu_forward(&p);
    let want_grad = cpu_backward(&p, &Saved::from(&want));
    let f = Dt::F32.dl();
    let mut logits = HostBuf::new(&p.logits_bytes());
    let mut labels = HostBuf::new(&labels_bytes(&p.labels, p.labels_i64));
    let mut gl = HostBuf::new(&Dt::F32.encode(&p.grad_logprobs));
    let mut ge = HostBuf::new(&Dt::F32.encode(p.grad_entropy.as_ref().unwrap()));
    let mut outs: Vec<HostBuf> = (0..3).map(|_| HostBuf::new(&Dt::F32.nan(p.n))).collect();
    let mut half = HostBuf::new(&Dt::F16.nan(p.n));
    let mut grad = HostBuf::new(&p.dt.nan(p.n * p.v));
    let lg = host_desc(&mut logits, p.dt.dl(), &[p.n, p.v]);
    let lb = host_desc(&mut labels, label_dtype(p.labels_i64), &[p.n]);
    let gld = host_desc(&mut gl, f, &[p.n]);
    let ged = host_desc(&mut ge, f, &[p.n]);
    let o: Vec<Box<Desc>> = outs.iter_mut().map(|b| host_desc(b, f, &[p.n])).collect();
    let hd = host_desc(&mut half, Dt::F16.dl(), &[p.n]);
    let gd = host_desc(&mut grad, p.dt.dl(), &[p.n, p.v]);
    // (f16 logprobs, with entropy output) → result
    let run = |half_logprobs: bool, entropy: bool| {
        // SAFETY: every descriptor points at live host memory of its stated shape.
        let args = unsafe {
            ForwardBackward {
                input: LogitsInput::new(
                    Tensor::from_raw(lg.p(), "logits").unwrap(),
                    Tensor::from_raw(lb.p(), "labels").unwrap(),
                    p.temperature,
                    0,
                )
                .unwrap(),
                grad_logprobs: Tensor::from_raw(gld.p(), "grad_logprobs").unwrap(),
                grad_entropy: Tensor::optional(ged.p(), "grad_entropy").unwrap(),
                logprobs: Tensor::from_raw(
                    if half_logprobs { hd.p() } else { o[0].p() },
                    "logprobs",
                )
                .unwrap(),
                entropy: Tensor::optional(
                    if entropy { o[1].p() } else { std::ptr::null() },
                    "entropy",
                )
                .unwrap(),
                lse: Tensor::from_raw(o[2].p(), "lse").unwrap(),
                grad_logits: Tensor::from_raw(gd.p(), "grad_logits").unwrap(),
            }
        };
        forward_backward(&args, std::ptr::null_mut())
    };
    let e = run(true, true).unwrap_err().to_string();
    assert!(e.contains("logprobs") && e.contains("float16"), "{e}");
    let e = run(false, false).unwrap_err().to_string();
    assert!(e.contains("entropy") && e.contains("grad_entropy"), "{e}");
    run(false, true).unwrap();
    drop((o, gd));
    let d = |b: &HostBuf| Dt::F32.decode(b.bytes());
    assert_eq!((d(&outs[0]), d(&outs[1]), d(&outs[2])), want);
    assert_eq!(p.dt.decode(grad.bytes()), want_grad);
}

/// Splits `v` into `parts` uneven, non-empty shards: (start, len).
fn shards(rng: &mut Rng, v: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.min(v);
    let mut cuts: Vec<usize> = (1..parts).map(|i| i * v / parts).collect();
    for c in cuts.iter_mut() {
        // jitter by up to ±7 elements so shards are unaligned and uneven
        let j = rng.below(15) as isize - 7;
        *c = (*c as isize + j).clamp(1, v as isize - 1) as usize;
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(v);
    bounds.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn vocabulary_shards_match_full_vocabulary() {
    let (g, _lock) = require_gpu!();
    let mut rng = Rng::new(2);
    let cases: Vec<(usize, usize, usize)> = if quick() {
        vec![(7, 5, 2), (3, 1000, 3)]
    } else {
        vec![
            (7, 5, 2),
            (7, 32000, 3),
            (64, 152_064, 4),
            (16, 262_144, 2),
            (1000, 1001, 3),
        ]
    };
    for dt in [Dt::Bf16, Dt::F16, Dt::F32] {
        for (i, &(n, v, parts)) in cases.iter().enumerate() {
            let kind = if i % 2 == 1 {
                Kind::Extreme
            } else {
                Kind::Normal
            };
            let p = Problem::new(&mut rng, n, v, dt, kind, 0.8, true);
            let sh = shards(&mut rng, v, parts);
            let what = format!("{dt:?} N={n} V={v} shards={sh:?} {kind:?}");
            println!("{what}");
            let want = cpu_forward(&p);
            let saved = Saved::from(&want);
            let logits = DevBuf::upload(g, &p.logits_bytes());
            let rows = DevRows::upload(g, &p, &saved);
            let r = sh.len();

            // Phase 1 per shard into slices of one [R, N, 4] buffer, then phase 2.
            let stats = DevBuf::upload(g, &Dt::F32.nan(r * n * 4));
            let lb = rows.labels_desc(g, &p);
            for (s, &(start, len)) in sh.iter().enumerate() {
                let view = View {
                    n,
                    v: len,
                    stride: v,
                    offset: start,
                };
                let lg = view.desc(g, &logits, dt);
                let mut st = stats.desc(g, Dt::F32.dl(), &[n, 4], None, s * n * 4 * 4);
                // SAFETY: the descriptors point at live device memory of their stated shapes.
                ok(
                    unsafe {
                        calibrl_logits_shard_stats(
                            lg.p(),
                            lb.p(),
                            p.temperature,
                            start as i64,
                            st.m(),
                            g.stream.cu_stream() as *mut c_void,
                        )
                    },
                    "gpu shard_stats",
                );
            }
            // Compare every shard's statistics with the CPU's on the same strided view.
            let gpu_stats = Dt::F32.decode(&stats.download(g));
            let mut host_logits = HostBuf::new(&p.logits_bytes());
            let mut host_labels = HostBuf::new(&labels_bytes(&p.labels, p.labels_i64));
            for (s, &(start, len)) in sh.iter().enumerate() {
                let mut out = HostBuf::new(&Dt::F32.nan(n * 4));
                let lg = Desc::new(
                    host_logits.ptr(),
                    DL_CPU,
                    dt.dl(),
                    &[n, len],
                    Some(&[v, 1]),
                    start * dt.size(),
                );
                let lb = host_desc(&mut host_labels, label_dtype(p.labels_i64), &[n]);
                let mut st = host_desc(&mut out, Dt::F32.dl(), &[n, 4]);
                // SAFETY: host descriptors over live buffers.
                ok(
                    unsafe {
                        calibrl_logits_shard_stats(
                            lg.p(),
                            lb.p(),
                            p.temperature,
                            start as i64,
                            st.m(),
                            std::ptr::null_mut(),
                        )
                    },
                    "cpu shard_stats",
                );
                drop(st);
                let cpu = Dt::F32.decode(out.bytes());
                let tol = p.forward_tol();
                compare(
                    &format!("{what}: shard {s} stats"),
                    &gpu_stats[s * n * 4..(s + 1) * n * 4],
                    &cpu,
                    |i, w| {
                        // column 1 (Σe) and 2 (Σe·(u−m)) are sums over up to V terms of size ≤ 1
                        if i % 4 == 0 || i % 4 == 3 {
                            tol(i, w)
                        } else {
                            1e-5 * (len as f64).sqrt() + 1e-5 * w.abs() + p.eps() * w.abs()
                        }
                    },
                );
            }

            let outs: Vec<DevBuf> = (0..3).map(|_| DevBuf::upload(g, &Dt::F32.nan(n))).collect();
            let stt = stats.desc(g, Dt::F32.dl(), &[r, n, 4], None, 0);
            let mut o: Vec<Box<Desc>> = outs
                .iter()
                .map(|b| b.desc(g, Dt::F32.dl(), &[n], None, 0))
                .collect();
            let (a, rest) = o.split_at_mut(1);
            let (b, c) = rest.split_at_mut(1);
            // SAFETY: as above.
            ok(
                unsafe {
                    calibrl_logits_shard_finish(
                        stt.p(),
                        lb.p(),
                        a[0].m(),
                        b[0].m(),
                        c[0].m(),
                        g.stream.cu_stream() as *mut c_void,
                    )
                },
                "gpu shard_finish",
            );
            drop(o);
            let got: Vec<Vec<f64>> = outs
                .iter()
                .map(|b| Dt::F32.decode(&b.download(g)))
                .collect();
            let (full, _) = gpu_forward(g, &p, &logits, &rows);
            for (j, name) in ["logprobs", "entropy", "lse"].iter().enumerate() {
                let want_j = [&want.0, &want.1, &want.2][j];
                compare(
                    &format!("{what}: sharded {name} vs CPU"),
                    &got[j],
                    want_j,
                    p.forward_tol(),
                );
                compare(
                    &format!("{what}: sharded {name} vs GPU full"),
                    &got[j],
                    &[&full.0, &full.1, &full.2][j][..],
                    p.forward_tol(),
                );
            }

            // Backward per shard: out of place into the matching columns of one [N, V] buffer,
            // then in place on each shard of the logits; both equal the full backward.
            let full_grad = DevBuf::upload(g, &dt.nan(n * v));
            gpu_backward_into(
                g,
                &p,
                &logits,
                View::full(&p),
                &full_grad,
                View::full(&p),
                0,
                &rows,
            );
            let full_grad = full_grad.download(g);
            let want_grad = cpu_backward(&p, &saved);
            let tol = p.backward_tol(&want.1);
            compare(
                &format!("{what}: full d-logits"),
                &dt.decode(&full_grad),
                &want_grad,
                &tol,
            );
            // Out of place into a fresh buffer, then in place over the logits themselves.
            let sharded = DevBuf::upload(g, &dt.nan(n * v));
            for (place, dst) in [("out-of-place", &sharded), ("in-place", &logits)] {
                for &(start, len) in &sh {
                    let view = View {
                        n,
                        v: len,
                        stride: v,
                        offset: start,
                    };
                    gpu_backward_into(g, &p, &logits, view, dst, view, start as i64, &rows);
                }
                bits_equal(
                    &format!("{what}: sharded {place} backward vs full"),
                    &dst.download(g),
                    &full_grad,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn other_row_dtypes_match_cpu() {
    let (g, _lock) = require_gpu!();
    let mut rng = Rng::new(3);
    let (n, v) = (37, 3001);
    let p = Problem::new(&mut rng, n, v, Dt::Bf16, Kind::Normal, 1.0, true);
    for (lp_dt, ent_dt, lse_dt) in [
        (Dt::F64, Dt::Bf16, Dt::F16),
        (Dt::F16, Dt::F64, Dt::F64),
        (Dt::Bf16, Dt::F32, Dt::F64),
    ] {
        let what = format!("outputs {lp_dt:?}/{ent_dt:?}/{lse_dt:?}");
        let dts = [lp_dt, ent_dt, lse_dt];
        // CPU
        let mut logits = HostBuf::new(&p.logits_bytes());
        let mut labels = HostBuf::new(&labels_bytes(&p.labels, p.labels_i64));
        let mut outs: Vec<HostBuf> = dts.iter().map(|d| HostBuf::new(&d.nan(n))).collect();
        let lg = host_desc(&mut logits, p.dt.dl(), &[n, v]);
        let lb = host_desc(&mut labels, label_dtype(p.labels_i64), &[n]);
        let mut o: Vec<Box<Desc>> = outs
            .iter_mut()
            .zip(dts)
            .map(|(b, d)| host_desc(b, d.dl(), &[n]))
            .collect();
        ok(
            forward_into(&lg, &lb, 1.0, &mut o, std::ptr::null_mut()),
            "cpu",
        );
        drop(o);
        let want: Vec<Vec<f64>> = outs
            .iter()
            .zip(dts)
            .map(|(b, d)| d.decode(b.bytes()))
            .collect();
        // GPU
        let dl = DevBuf::upload(g, &p.logits_bytes());
        let dlab = DevBuf::upload(g, &labels_bytes(&p.labels, p.labels_i64));
        let douts: Vec<DevBuf> = dts.iter().map(|d| DevBuf::upload(g, &d.nan(n))).collect();
        let lg = dl.desc(g, p.dt.dl(), &[n, v], None, 0);
        let lb = dlab.desc(g, label_dtype(p.labels_i64), &[n], None, 0);
        let mut o: Vec<Box<Desc>> = douts
            .iter()
            .zip(dts)
            .map(|(b, d)| b.desc(g, d.dl(), &[n], None, 0))
            .collect();
        ok(
            forward_into(&lg, &lb, 1.0, &mut o, g.stream.cu_stream() as *mut c_void),
            "gpu",
        );
        drop(o);
        for (j, d) in dts.iter().enumerate() {
            let got = d.decode(&douts[j].download(g));
            let base = p.forward_tol();
            compare(&format!("{what}: output {j}"), &got, &want[j], |i, w| {
                base(i, w) + 2.0 * d.ulp() * w.abs()
            });
        }

        // Backward with the row inputs in these dtypes (the same values on both backends).
        let fwd32 = cpu_forward(&p);
        let as_f32 = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<_>>();
        let row_in = [
            (lse_dt, as_f32(&fwd32.2)),
            (ent_dt, as_f32(&fwd32.1)),
            (lp_dt, p.grad_logprobs.clone()),
            (ent_dt, p.grad_entropy.clone().unwrap()),
        ];
        let mut host_rows: Vec<HostBuf> = row_in
            .iter()
            .map(|(d, x)| HostBuf::new(&d.encode(x)))
            .collect();
        let dev_rows: Vec<DevBuf> = row_in
            .iter()
            .map(|(d, x)| DevBuf::upload(g, &d.encode(x)))
            .collect();
        let mut grad_host = HostBuf::new(&p.dt.nan(n * v));
        let grad_dev = DevBuf::upload(g, &p.dt.nan(n * v));
        {
            let lg = host_desc(&mut logits, p.dt.dl(), &[n, v]);
            let lb = host_desc(&mut labels, label_dtype(p.labels_i64), &[n]);
            let r: Vec<Box<Desc>> = host_rows
                .iter_mut()
                .zip(&row_in)
                .map(|(b, (d, _))| host_desc(b, d.dl(), &[n]))
                .collect();
            let mut gd = host_desc(&mut grad_host, p.dt.dl(), &[n, v]);
            let rows = [r[0].p(), r[1].p(), r[2].p(), r[3].p()];
            let st = logits_backward(&lg, &lb, 1.0, 0, rows, &mut gd, std::ptr::null_mut());
            ok(st, "cpu backward");
            let lg = dl.desc(g, p.dt.dl(), &[n, v], None, 0);
            let lb = dlab.desc(g, label_dtype(p.labels_i64), &[n], None, 0);
            let r: Vec<Box<Desc>> = dev_rows
                .iter()
                .zip(&row_in)
                .map(|(b, (d, _))| b.desc(g, d.dl(), &[n], None, 0))
                .collect();
            let mut gd = grad_dev.desc(g, p.dt.dl(), &[n, v], None, 0);
            let stream = g.stream.cu_stream() as *mut c_void;
            let rows = [r[0].p(), r[1].p(), r[2].p(), r[3].p()];
            ok(
                logits_backward(&lg, &lb, 1.0, 0, rows, &mut gd, stream),
                "gpu backward",
            );
        }
        let want = p.dt.decode(grad_host.bytes());
        let ent_used: Vec<f64> = row_in[1].0.decode(&row_in[1].0.encode(&row_in[1].1));
        compare(
            &format!("{what}: d-logits"),
            &p.dt.decode(&grad_dev.download(g)),
            &want,
            p.backward_tol(&ent_used),
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn non_finite_logits_give_nan_rows_on_cuda() {
    let (g, _lock) = require_gpu!();
    let (n, v) = (4, 100);
    let mut z = vec![0.5f32; n * v];
    z[v + 17] = f32::NAN; // row 1: NaN
    z[2 * v + 3] = f32::INFINITY; // row 2: +inf
    for x in &mut z[3 * v..] {
        *x = f32::NEG_INFINITY; // row 3: entirely -inf
    }
    let labels = vec![1i64, 2, 3, 4];
    let dl = DevBuf::upload(g, &Dt::F32.encode(&z));
    let dlab = DevBuf::upload(g, &labels_bytes(&labels, true));
    let outs: Vec<DevBuf> = (0..3)
        .map(|_| DevBuf::upload(g, &Dt::F32.encode(&vec![7.0; n])))
        .collect();
    let lg = dl.desc(g, Dt::F32.dl(), &[n, v], None, 0);
    let lb = dlab.desc(g, label_dtype(true), &[n], None, 0);
    let mut o: Vec<Box<Desc>> = outs
        .iter()
        .map(|b| b.desc(g, Dt::F32.dl(), &[n], None, 0))
        .collect();
    ok(
        forward_into(&lg, &lb, 1.0, &mut o, g.stream.cu_stream() as *mut c_void),
        "gpu forward",
    );
    drop(o);
    let lp = Dt::F32.decode(&outs[0].download(g));
    let lse = Dt::F32.decode(&outs[2].download(g));
    assert!(
        (lse[0] - (0.5 + (v as f64).ln())).abs() < 1e-5,
        "finite row: lse {}",
        lse[0]
    );
    assert!(
        (lp[0] + (v as f64).ln()).abs() < 1e-5,
        "finite row: logprob {}",
        lp[0]
    );
    for (k, x) in lp.iter().enumerate().skip(1) {
        assert!(x.is_nan(), "row {k}: logprob {x} should be NaN");
    }
    assert!(
        lse[1].is_nan() && lse[2].is_nan(),
        "NaN/+inf rows: lse {:?}",
        &lse[1..3]
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn invalid_cuda_arguments_are_rejected_by_name() {
    let (g, _lock) = require_gpu!();
    let (n, v) = (3, 10);
    let dl = DevBuf::upload(g, &Dt::F32.encode(&vec![0.0; n * v + 1]));
    let dlab = DevBuf::upload(g, &labels_bytes(&[0, 1, 2], true));
    let outs: Vec<DevBuf> = (0..3).map(|_| DevBuf::upload(g, &Dt::F32.nan(n))).collect();
    let lb = dlab.desc(g, label_dtype(true), &[n], None, 0);
    let stream = g.stream.cu_stream() as *mut c_void;
    let mut o: Vec<Box<Desc>> = outs
        .iter()
        .map(|b| b.desc(g, Dt::F32.dl(), &[n], None, 0))
        .collect();
    let (a, rest) = o.split_at_mut(1);
    let (b, c) = rest.split_at_mut(1);
    // Misaligned logits (1 byte into an f32 buffer).
    let lg = dl.desc(g, Dt::F32.dl(), &[n, v], None, 1);
    // SAFETY: device descriptors over live buffers (the misaligned one is rejected unread).
    let st = unsafe {
        calibrl_logits_forward(lg.p(), lb.p(), 1.0, a[0].m(), b[0].m(), c[0].m(), stream)
    };
    assert_eq!(st, CalibrlStatus::LayoutUnsupported, "{}", last_error());
    assert!(last_error().contains("`logits`"), "{}", last_error());
    // Integer output.
    let lg = dl.desc(g, Dt::F32.dl(), &[n, v], None, 0);
    let mut bad = outs[0].desc(g, label_dtype(false), &[n], None, 0);
    // SAFETY: as above.
    let st =
        unsafe { calibrl_logits_forward(lg.p(), lb.p(), 1.0, bad.m(), b[0].m(), c[0].m(), stream) };
    assert_eq!(st, CalibrlStatus::DtypeMismatch, "{}", last_error());
    assert!(last_error().contains("`logprobs`"), "{}", last_error());
    // Labels on the host, logits on the device.
    let mut host_labels = HostBuf::new(&labels_bytes(&[0, 1, 2], true));
    let hl = host_desc(&mut host_labels, label_dtype(true), &[n]);
    // SAFETY: as above.
    let st = unsafe {
        calibrl_logits_forward(lg.p(), hl.p(), 1.0, a[0].m(), b[0].m(), c[0].m(), stream)
    };
    assert_eq!(st, CalibrlStatus::DeviceMismatch, "{}", last_error());
    // Out-of-place gradient in another dtype than the logits.
    let grad = DevBuf::upload(g, &Dt::Bf16.nan(n * v));
    let mut gd = grad.desc(g, Dt::Bf16.dl(), &[n, v], None, 0);
    let rows = outs
        .iter()
        .map(|b| b.desc(g, Dt::F32.dl(), &[n], None, 0))
        .collect::<Vec<_>>();
    // SAFETY: as above.
    let st = unsafe {
        calibrl_logits_backward(
            lg.p(),
            lb.p(),
            1.0,
            0,
            rows[0].p(),
            std::ptr::null(),
            rows[1].p(),
            std::ptr::null(),
            gd.m(),
            stream,
        )
    };
    assert_eq!(st, CalibrlStatus::DtypeMismatch, "{}", last_error());
    assert!(last_error().contains("`grad_logits`"), "{}", last_error());
}

/// N×V > 2^31 elements: a 61-row random pattern (period coprime with the 2^31- and 2^32-element
/// row offsets 8192 and 16384, so a wrapped 32-bit index reads a different pattern row) tiled
/// over N = 8300 rows of V = 262144 bf16 (4.35 GB), forward and in-place backward.
#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn more_than_2_pow_31_elements() {
    let (g, _lock) = require_gpu!();
    if quick() {
        println!("skipped: CALIBRL_GPU_TEST_QUICK=1");
        return;
    }
    const PERIOD: usize = 61;
    let (n, v, dt) = (8300usize, 262_144usize, Dt::Bf16);
    assert!(n * v > 1 << 31);
    let bytes = n * v * dt.size();
    let (free, _) = cudarc::driver::result::mem_get_info().unwrap();
    if free < bytes + (1 << 30) {
        println!(
            "skipped: needs {} MiB free device memory, {} MiB free",
            (bytes >> 20) + 1024,
            free >> 20
        );
        return;
    }
    let mut rng = Rng::new(4);
    let pattern = Problem::new(&mut rng, PERIOD, v, dt, Kind::Normal, 1.0, true);
    let tile = |x: &Vec<f32>| (0..n).map(|k| x[k % PERIOD]).collect::<Vec<f32>>();
    let p = Problem {
        n,
        v,
        dt,
        temperature: 1.0,
        labels: (0..n).map(|k| pattern.labels[k % PERIOD]).collect(),
        labels_i64: true,
        logits: Vec::new(), // lives on the device only
        grad_logprobs: tile(&pattern.grad_logprobs),
        grad_entropy: pattern.grad_entropy.as_ref().map(tile),
        umax: pattern.umax,
    };
    let want = cpu_forward(&pattern);
    let saved_pattern = Saved::from(&want);
    let saved = Saved {
        lse: (0..n).map(|k| saved_pattern.lse[k % PERIOD]).collect(),
        entropy: (0..n).map(|k| saved_pattern.entropy[k % PERIOD]).collect(),
    };

    // Tile the pattern on the device by doubling copies (sizes stay multiples of PERIOD rows).
    // SAFETY: uninitialised device memory, fully written below before any read.
    let mut big = DevBuf {
        slice: unsafe { g.stream.alloc::<u8>(bytes) }.unwrap(),
    };
    let row_bytes = v * dt.size();
    g.stream
        .memcpy_htod(
            &pattern.logits_bytes(),
            &mut big.slice.slice_mut(0..PERIOD * row_bytes),
        )
        .unwrap();
    let mut filled = PERIOD;
    while filled < n {
        let count = filled.min(n - filled);
        let (src, mut dst) = big.slice.split_at_mut(filled * row_bytes);
        g.stream
            .memcpy_dtod(
                &src.slice(0..count * row_bytes),
                &mut dst.slice_mut(0..count * row_bytes),
            )
            .unwrap();
        filled += count;
    }
    g.stream.synchronize().unwrap();

    let rows = DevRows::upload(g, &p, &saved);
    let (got, _) = gpu_forward(g, &p, &big, &rows);
    let periodic = |x: &Vec<f64>| (0..n).map(|k| x[k % PERIOD]).collect::<Vec<f64>>();
    compare(
        "big: logprobs",
        &got.0,
        &periodic(&want.0),
        pattern.forward_tol(),
    );
    compare(
        "big: entropy",
        &got.1,
        &periodic(&want.1),
        pattern.forward_tol(),
    );
    compare(
        "big: lse",
        &got.2,
        &periodic(&want.2),
        pattern.forward_tol(),
    );

    gpu_backward_into(g, &p, &big, View::full(&p), &big, View::full(&p), 0, &rows);
    let want_grad = cpu_backward(&pattern, &saved_pattern);
    let tol = pattern.backward_tol(&want.1);
    // The first rows and the rows around and past element 2^31 (row 8192).
    for range in [0..PERIOD, 8100..n] {
        let mut host = vec![0u8; range.len() * row_bytes];
        g.stream
            .memcpy_dtoh(
                &big.slice
                    .slice(range.start * row_bytes..range.end * row_bytes),
                &mut host,
            )
            .unwrap();
        g.stream.synchronize().unwrap();
        let got = dt.decode(&host);
        let want: Vec<f64> = range
            .clone()
            .flat_map(|k| {
                want_grad[(k % PERIOD) * v..(k % PERIOD + 1) * v]
                    .iter()
                    .copied()
            })
            .collect();
        let offset = range.start;
        compare(
            &format!("big: d-logits rows {range:?}"),
            &got,
            &want,
            |i, w| tol((i / v + offset) % PERIOD * v, w),
        );
    }
}

/// Runs where there is no CUDA driver (CI): CUDA tensors give CUDA_UNAVAILABLE, not a crash.
#[test]
fn without_a_driver_cuda_tensors_report_unavailable() {
    // SAFETY: only probes whether libcuda can be opened.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        println!("skipped: a CUDA driver is present");
        return;
    }
    // Separate (fake) buffers: tensors that share memory are refused before the device is.
    let mut fake = [[0u64; 2]; 4];
    let [p_lg, p_lb, p_a, p_c] = fake.each_mut().map(|b| b.as_mut_ptr() as *mut c_void);
    let f = Dt::F32.dl();
    let lg = Desc::new(p_lg, DL_CUDA, f, &[1, 2], None, 0);
    let lb = Desc::new(p_lb, DL_CUDA, label_dtype(true), &[1], None, 0);
    let mut a = Desc::new(p_a, DL_CUDA, f, &[1], None, 0);
    let mut c = Desc::new(p_c, DL_CUDA, f, &[1], None, 0);
    // SAFETY: the call fails before touching the (fake) device pointers.
    let st = unsafe {
        calibrl_logits_forward(
            lg.p(),
            lb.p(),
            1.0,
            a.m(),
            std::ptr::null_mut(),
            c.m(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(st, CalibrlStatus::CudaUnavailable, "{}", last_error());
    assert!(last_error().contains("libcuda"), "{}", last_error());
}
