//! GPU tests of the loss family: `calibrl_group_advantages` and `calibrl_loss` on CUDA tensors
//! against the CPU backend on the same inputs, through the C ABI, for every loss kind, Δ mode,
//! activation, aggregation, baseline and layout, with odd sizes and masked rows.
//!
//! The tests that need a device are `#[ignore]`d with that reason, so a plain `cargo test`
//! reports them as ignored; run them with `-- --include-ignored` on a GPU machine
//! (scripts/gpu-check.sh does). Without a CUDA driver or device they then print
//! "skipped: no CUDA device" and return.
//! Outputs are poisoned with NaN before each GPU call, so agreement with the (finite) CPU result
//! also proves every element was written. `CALIBRL_GPU_TEST_SEED` fixes the seed.

use calibrl::desc::metrics::{CalibrlMetrics, CalibrlNormalizers};
use calibrl::ffi::common::{
    calibrl_config_free, calibrl_config_new, calibrl_last_error_message, CalibrlConfig,
};
use calibrl::ffi::loss::{
    calibrl_group_advantages, calibrl_loss, CalibrlAdvantageArgs, CalibrlLossArgs,
};
use calibrl::tensor::{DLDataType, DLDevice, DLTensor, DL_CPU, DL_CUDA};
use calibrl::CalibrlStatus;
use cudarc::driver::{CudaSlice, DevicePtr};
use half::{bf16, f16};
use std::ffi::{c_void, CString};
use std::ptr::{null, null_mut};

#[macro_use]
mod gpu_common;
use gpu_common::{Gpu, Rng};

impl Rng {
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dt {
    F32,
    F64,
    Bf16,
    F16,
    I64,
    U8,
}

impl Dt {
    fn dl(self) -> DLDataType {
        let (code, bits) = match self {
            Dt::F32 => (2, 32),
            Dt::F64 => (2, 64),
            Dt::Bf16 => (4, 16),
            Dt::F16 => (2, 16),
            Dt::I64 => (0, 64),
            Dt::U8 => (1, 8),
        };
        DLDataType {
            code,
            bits,
            lanes: 1,
        }
    }
    fn encode(self, v: &[f64]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| match self {
                Dt::F32 => (x as f32).to_le_bytes().to_vec(),
                Dt::F64 => x.to_le_bytes().to_vec(),
                Dt::Bf16 => bf16::from_f64(x).to_le_bytes().to_vec(),
                Dt::F16 => f16::from_f64(x).to_le_bytes().to_vec(),
                Dt::I64 => (x as i64).to_le_bytes().to_vec(),
                Dt::U8 => vec![x as u8],
            })
            .collect()
    }
    fn decode(self, b: &[u8]) -> Vec<f64> {
        match self {
            Dt::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dt::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dt::Bf16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dt::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            _ => unreachable!("outputs are float"),
        }
    }
    fn size(self) -> usize {
        match self {
            Dt::F64 | Dt::I64 => 8,
            Dt::F32 => 4,
            Dt::Bf16 | Dt::F16 => 2,
            Dt::U8 => 1,
        }
    }
    /// Tolerance of one output rounding (two f64 results that differ in the last bits may round
    /// to neighbouring values).
    fn ulp(self) -> f64 {
        match self {
            Dt::F32 => 2f64.powi(-23),
            Dt::Bf16 => 2f64.powi(-7),
            Dt::F16 => 2f64.powi(-10),
            _ => 1e-12,
        }
    }
}

/// One tensor in host memory and (after `upload`) on the device, with its descriptor.
struct Pair {
    dt: Dt,
    shape: Vec<i64>,
    host: Vec<u64>,
    len: usize,
    /// Bytes before the tensor's first element (`new_shifted`).
    skip: usize,
    dev: Option<CudaSlice<u8>>,
    host_desc: DLTensor,
    dev_desc: DLTensor,
}

impl Pair {
    fn new(g: &Gpu, dt: Dt, values: &[f64], shape: &[usize]) -> Box<Pair> {
        let bytes = dt.encode(values);
        let mut host = vec![0u64; bytes.len().div_ceil(8).max(1)];
        // SAFETY: `host` holds at least `bytes.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), host.as_mut_ptr() as *mut u8, bytes.len())
        };
        let dev = g
            .stream
            .memcpy_stod(if bytes.is_empty() { &[0u8][..] } else { &bytes })
            .unwrap();
        let blank = DLTensor {
            data: null_mut(),
            device: DLDevice {
                device_type: DL_CPU,
                device_id: 0,
            },
            ndim: shape.len() as i32,
            dtype: dt.dl(),
            shape: null_mut(),
            strides: null_mut(),
            byte_offset: 0,
        };
        let mut p = Box::new(Pair {
            dt,
            shape: shape.iter().map(|&s| s as i64).collect(),
            host,
            len: bytes.len(),
            skip: 0,
            dev: Some(dev),
            host_desc: DLTensor { ..blank },
            dev_desc: DLTensor {
                device: DLDevice {
                    device_type: DL_CUDA,
                    device_id: 0,
                },
                ..blank
            },
        });
        p.host_desc.shape = p.shape.as_mut_ptr();
        p.dev_desc.shape = p.shape.as_mut_ptr();
        p.host_desc.data = p.host.as_mut_ptr() as *mut c_void;
        let ptr = {
            let (ptr, _sync) = p.dev.as_ref().unwrap().device_ptr(&g.stream);
            ptr
        };
        p.dev_desc.data = ptr as usize as *mut c_void;
        p
    }
    /// Like `new`, with the tensor starting `shift` elements into its buffer (`byte_offset`): a
    /// base address that is not 16-byte aligned for shift 1 (the kernels' scalar fallback).
    fn new_shifted(g: &Gpu, dt: Dt, values: &[f64], shape: &[usize], shift: usize) -> Box<Pair> {
        let padded: Vec<f64> = std::iter::repeat(0.0)
            .take(shift)
            .chain(values.iter().copied())
            .collect();
        let mut p = Pair::new(g, dt, &padded, shape);
        let skip = (shift * dt.size()) as u64;
        p.host_desc.byte_offset = skip;
        p.dev_desc.byte_offset = skip;
        p.skip = skip as usize;
        p
    }
    fn desc(&mut self, on_gpu: bool) -> *mut DLTensor {
        if on_gpu {
            &mut self.dev_desc
        } else {
            &mut self.host_desc
        }
    }
    fn host_values(&self) -> Vec<f64> {
        // SAFETY: `host` holds `len` initialised bytes.
        let b = unsafe { std::slice::from_raw_parts(self.host.as_ptr() as *const u8, self.len) };
        self.dt.decode(&b[self.skip..])
    }
    fn dev_values(&self, g: &Gpu) -> Vec<f64> {
        let b = g.stream.memcpy_dtov(self.dev.as_ref().unwrap()).unwrap();
        self.dt.decode(&b[self.skip..self.len])
    }
}

fn last_error() -> String {
    // SAFETY: the library returns a valid NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(calibrl_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

fn config(json: &str) -> *mut CalibrlConfig {
    let c = CString::new(json).unwrap();
    let mut cfg = null_mut();
    // SAFETY: valid string and out pointer.
    let s = unsafe { calibrl_config_new(c.as_ptr(), &mut cfg) };
    assert_eq!(s, CalibrlStatus::Ok, "{json}: {}", last_error());
    cfg
}

fn close(what: &str, cpu: &[f64], gpu: &[f64], dt: Dt, scale: f64) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: lengths");
    for (i, (&a, &b)) in cpu.iter().zip(gpu).enumerate() {
        let tol = 1e-9 * scale.max(1.0) + 2.0 * dt.ulp() * a.abs().max(b.abs());
        assert!(
            b.is_finite() == a.is_finite() && (a - b).abs() <= tol,
            "{what}[{i}]: cpu {a} gpu {b} (tol {tol})"
        );
    }
}

/// A random batch: `b` rows, ragged lengths (some 0), masked tokens, expert rows for the
/// off-policy kinds, `p` expert responses.
struct Batch {
    rows: usize,
    lens: Vec<usize>,
    padded: bool,
    seq_len: usize,
    tokens: usize,
    logprobs: Vec<f64>,
    old: Vec<f64>,
    reference: Vec<f64>,
    entropy: Vec<f64>,
    mask: Vec<f64>,
    advantages: Vec<f64>,
    weights: Vec<f64>,
    signs: Vec<f64>,
    is_expert: Vec<f64>,
    prompts: usize,
    expert_lens: Vec<usize>,
    expert_logprobs: Vec<f64>,
    expert_index: Vec<f64>,
}

fn batch(rng: &mut Rng, rows: usize, padded: bool, expert_rows: bool) -> Batch {
    batch_with_lengths(rng, rows, padded, expert_rows, 40)
}

/// Rows of up to `max_len` tokens.
fn batch_with_lengths(
    rng: &mut Rng,
    rows: usize,
    padded: bool,
    expert_rows: bool,
    max_len: usize,
) -> Batch {
    let lens: Vec<usize> = (0..rows)
        .map(|_| {
            if rng.below(9) == 0 {
                0
            } else {
                1 + rng.below(max_len)
            }
        })
        .collect();
    batch_of(rng, lens, padded, expert_rows)
}

/// Rows of the given lengths (0: an empty row).
fn batch_of(rng: &mut Rng, lens: Vec<usize>, padded: bool, expert_rows: bool) -> Batch {
    let rows = lens.len();
    let prompts = rows.div_ceil(4).max(1);
    let seq_len = lens.iter().copied().max().unwrap_or(0).max(1);
    let tokens = if padded {
        rows * seq_len
    } else {
        lens.iter().sum()
    };
    let mut mask = vec![0.0; tokens];
    let mut k = 0;
    for &l in &lens {
        let width = if padded { seq_len } else { l };
        for t in 0..width {
            mask[k + t] = (t < l && rng.below(7) != 0) as u8 as f64;
        }
        k += width;
    }
    let logprobs: Vec<f64> = (0..tokens).map(|_| -4.0 * rng.uniform() - 1e-3).collect();
    let old = logprobs
        .iter()
        .map(|l| l + 0.6 * (rng.uniform() - 0.5))
        .collect();
    let reference = logprobs
        .iter()
        .map(|l| l + 0.8 * (rng.uniform() - 0.5))
        .collect();
    let entropy = (0..tokens).map(|_| 3.0 * rng.uniform()).collect();
    let advantages: Vec<f64> = (0..rows).map(|_| 2.0 * rng.uniform() - 1.0).collect();
    let weights = advantages.iter().map(|a: &f64| a.abs()).collect();
    let signs = (0..rows)
        .map(|_| if rng.below(2) == 0 { 1.0 } else { -1.0 })
        .collect();
    let is_expert = (0..rows)
        .map(|_| (expert_rows && rng.below(5) == 0) as u8 as f64)
        .collect();
    let expert_lens: Vec<usize> = (0..prompts).map(|_| 1 + rng.below(30)).collect();
    let expert_logprobs = (0..expert_lens.iter().sum::<usize>())
        .map(|_| -2.0 * rng.uniform())
        .collect();
    let expert_index = (0..rows)
        .map(|i| {
            if rng.below(6) == 0 {
                -1.0
            } else {
                (i % prompts) as f64
            }
        })
        .collect();
    Batch {
        rows,
        lens,
        padded,
        seq_len,
        tokens,
        logprobs,
        old,
        reference,
        entropy,
        mask,
        advantages,
        weights,
        signs,
        is_expert,
        prompts,
        expert_lens,
        expert_logprobs,
        expert_index,
    }
}

/// Which optional inputs a run passes (the kernel takes other paths without them: the layout's
/// counts instead of the counts kernel, no KL, no entropy; token weights only when asked).
#[derive(Clone, Copy)]
struct Inputs {
    mask: bool,
    is_expert: bool,
    reference: bool,
    entropy: bool,
    token_weights: bool,
    /// The expert's log-probs, offsets and slots (the exploration term's baseline).
    expert: bool,
    /// ℓold's dtype when it differs from ℓ's (the mixed-dtype kernel `calibrl_loss_any`).
    old_dtype: Option<Dt>,
    /// Elements by which ℓ, ℓold and the gradients start into their buffers (`new_shifted`).
    shift: usize,
}

const ALL_INPUTS: Inputs = Inputs {
    mask: true,
    is_expert: true,
    reference: true,
    entropy: true,
    token_weights: false,
    expert: true,
    old_dtype: None,
    shift: 0,
};

struct Outputs {
    grad: Vec<f64>,
    grad_entropy: Vec<f64>,
    metrics_tensor: Vec<f64>,
    metrics: CalibrlMetrics,
}

/// Runs the loss on the CPU and on the GPU (same inputs) and returns both results.
fn run_both(
    g: &Gpu,
    cfg_json: &str,
    b: &Batch,
    dt: Dt,
    normalizers: Option<CalibrlNormalizers>,
) -> (Outputs, Outputs) {
    run_both_with(g, cfg_json, b, dt, normalizers, ALL_INPUTS)
}

fn run_both_with(
    g: &Gpu,
    cfg_json: &str,
    b: &Batch,
    dt: Dt,
    normalizers: Option<CalibrlNormalizers>,
    inputs: Inputs,
) -> (Outputs, Outputs) {
    let cfg = config(cfg_json);
    let shape: Vec<usize> = if b.padded {
        vec![b.rows, b.seq_len]
    } else {
        vec![b.tokens]
    };
    let mut offsets = vec![0.0];
    for &l in &b.lens {
        offsets.push(offsets.last().unwrap() + l as f64);
    }
    let mut eoff = vec![0.0];
    for &l in &b.expert_lens {
        eoff.push(eoff.last().unwrap() + l as f64);
    }
    let et = b.expert_logprobs.len();
    let mut t_lp = Pair::new_shifted(g, dt, &b.logprobs, &shape, inputs.shift);
    let mut t_off = Pair::new(g, Dt::I64, &offsets, &[b.rows + 1]);
    let mut t_mask = Pair::new(g, Dt::U8, &b.mask, &shape);
    let old_dt = inputs.old_dtype.unwrap_or(dt);
    let mut t_old = Pair::new_shifted(g, old_dt, &b.old, &shape, inputs.shift);
    let mut t_ref = Pair::new(g, Dt::F32, &b.reference, &shape); // mixed dtypes on purpose
    let mut t_ent = Pair::new(g, dt, &b.entropy, &shape);
    let mut t_adv = Pair::new(g, Dt::F64, &b.advantages, &[b.rows]);
    let mut t_w = Pair::new(g, Dt::F64, &b.weights, &[b.rows]);
    let mut t_s = Pair::new(g, Dt::F32, &b.signs, &[b.rows]);
    let mut t_ie = Pair::new(g, Dt::U8, &b.is_expert, &[b.rows]);
    let mut t_elp = Pair::new(g, dt, &b.expert_logprobs, &[et]);
    let mut t_eoff = Pair::new(g, Dt::I64, &eoff, &[b.prompts + 1]);
    let mut t_eidx = Pair::new(g, Dt::I64, &b.expert_index, &[b.rows]);
    // Importance weights in [0, 2), some exactly 0 (truncated).
    let omega: Vec<f64> = (0..b.logprobs.len())
        .map(|k| ((k * 7919) % 13) as f64 / 6.5 * ((k % 11 != 0) as u8 as f64))
        .collect();
    let mut t_tw = Pair::new(g, Dt::F32, &omega, &shape);
    let pick = |on: bool, p: &mut Pair, on_gpu: bool| if on { p.desc(on_gpu) } else { null_mut() };
    let n = if b.padded {
        b.rows * b.seq_len
    } else {
        b.tokens
    };
    let mut run = |on_gpu: bool| -> Outputs {
        let nan = vec![f64::NAN; n];
        let mut t_grad = Pair::new_shifted(g, dt, &nan, &shape, inputs.shift);
        let mut t_gent = Pair::new_shifted(g, dt, &nan, &shape, inputs.shift);
        let mut t_met = Pair::new(g, Dt::F64, &[f64::NAN; 16], &[16]);
        let norm = normalizers.unwrap_or_default();
        let args = CalibrlLossArgs {
            logprobs: t_lp.desc(on_gpu),
            seq_offsets: if b.padded { null() } else { t_off.desc(on_gpu) },
            mask: pick(inputs.mask, &mut t_mask, on_gpu),
            old_logprobs: t_old.desc(on_gpu),
            ref_logprobs: pick(inputs.reference, &mut t_ref, on_gpu),
            entropy: pick(inputs.entropy, &mut t_ent, on_gpu),
            advantages: t_adv.desc(on_gpu),
            weights: t_w.desc(on_gpu),
            signs: t_s.desc(on_gpu),
            is_expert: pick(inputs.is_expert, &mut t_ie, on_gpu),
            expert_logprobs: pick(inputs.expert, &mut t_elp, on_gpu),
            expert_offsets: pick(inputs.expert, &mut t_eoff, on_gpu),
            expert_mask: null(),
            expert_index: pick(inputs.expert, &mut t_eidx, on_gpu),
            normalizers: if normalizers.is_some() { &norm } else { null() },
            grad_logprobs: t_grad.desc(on_gpu),
            grad_entropy: t_gent.desc(on_gpu),
            metrics: t_met.desc(on_gpu),
            token_weights: pick(inputs.token_weights, &mut t_tw, on_gpu),
        };
        let mut m = CalibrlMetrics::default();
        let stream = g.stream.cu_stream() as *mut c_void;
        // SAFETY: every descriptor points at live host or device memory of its stated shape.
        let s = unsafe { calibrl_loss(cfg, &args, &mut m, stream) };
        assert_eq!(
            s,
            CalibrlStatus::Ok,
            "{cfg_json} (gpu={on_gpu}): {}",
            last_error()
        );
        g.stream.synchronize().unwrap();
        if on_gpu {
            Outputs {
                grad: t_grad.dev_values(g),
                grad_entropy: t_gent.dev_values(g),
                metrics_tensor: t_met.dev_values(g),
                metrics: m,
            }
        } else {
            Outputs {
                grad: t_grad.host_values(),
                grad_entropy: t_gent.host_values(),
                metrics_tensor: t_met.host_values(),
                metrics: m,
            }
        }
    };
    let cpu = run(false);
    let gpu = run(true);
    // SAFETY: handle from calibrl_config_new.
    unsafe { calibrl_config_free(cfg) };
    (cpu, gpu)
}

const CONFIGS: &[&str] = &[
    r#"{"preset":"paper"}"#,
    r#"{"preset":"reference"}"#,
    r#"{"preset":"grpo"}"#,
    r#"{"preset":"paper","loss":"luffy"}"#,
    r#"{"preset":"paper","loss":"rlplus"}"#,
    r#"{"preset":"paper","activation":"relu","agg":"seq-mean-token-sum"}"#,
    r#"{"preset":"paper","activation":"tanh","agg":"seq-mean-token-mean","length_normalize":true}"#,
    r#"{"preset":"reference","activation":"sigmoid","agg":"seq-mean-token-sum-norm","t_norm":512}"#,
    r#"{"preset":"reference","activation":"huber","baseline":"ref_policy"}"#,
    r#"{"preset":"paper","baseline":"ref_policy","length_normalize":true,"alpha":0.3}"#,
    r#"{"preset":"paper","kl_coef":0.05,"kl_kind":"k3","entropy_coef":0.01}"#,
    r#"{"preset":"reference","kl_coef":0.1,"kl_kind":"k1","entropy_coef":0.02,"rarity_weighting":false}"#,
    r#"{"preset":"paper","kl_coef":0.1,"kl_kind":"abs","dual_clip":0.0,"clip_high":0.28}"#,
    r#"{"preset":"paper","kl_coef":0.1,"kl_kind":"k2","lambda":0.5}"#,
    // token-sum; empty rows (batch() makes some) under length-normalised Δ (SPEC §4.5)
    r#"{"preset":"paper","agg":"token-sum","length_normalize":true}"#,
    r#"{"preset":"reference","agg":"token-sum","kl_coef":0.05,"entropy_coef":0.01}"#,
    r#"{"preset":"paper","agg":"seq-mean-token-sum","length_normalize":true,"baseline":"ref_policy"}"#,
    // SPEC §4.7 (expert rows in the batch, some rollouts without an expert)
    r#"{"preset":"authors"}"#,
    r#"{"preset":"authors","kl_coef":0.05,"kl_kind":"k2","entropy_coef":0.01}"#,
    r#"{"preset":"authors","delta_mode":"sequence","agg":"seq-mean-token-mean"}"#,
    // the authors' dual clip at c_dual ≤ 1, two pairs of denominators with every aggregation
    r#"{"preset":"authors","dual_clip":0.5,"kl_coef":0.05,"entropy_coef":0.01,"agg":"seq-mean-token-sum"}"#,
];

fn compare(label: &str, cpu: &Outputs, gpu: &Outputs, dt: Dt) {
    let scale = cpu.metrics.loss.abs();
    close(
        &format!("{label} grad_logprobs"),
        &cpu.grad,
        &gpu.grad,
        dt,
        0.0,
    );
    close(
        &format!("{label} grad_entropy"),
        &cpu.grad_entropy,
        &gpu.grad_entropy,
        dt,
        0.0,
    );
    close(
        &format!("{label} metrics tensor"),
        &cpu.metrics_tensor,
        &gpu.metrics_tensor,
        Dt::F64,
        scale,
    );
    close(
        &format!("{label} host metrics"),
        &cpu.metrics.to_array(),
        &gpu.metrics.to_array(),
        Dt::F64,
        scale,
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn loss_matches_cpu_for_every_configuration() {
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(11);
    for (ci, cfg) in CONFIGS.iter().enumerate() {
        let expert_rows =
            cfg.contains("luffy") || cfg.contains("rlplus") || cfg.contains("authors");
        for (rows, padded, dt) in [
            (1, false, Dt::F64),
            (7, true, Dt::F32),
            (100, false, Dt::Bf16),
            (33, true, Dt::F64),
        ] {
            let b = batch(&mut rng, rows, padded, expert_rows);
            // With expert rows, every row's counts too (the `authors` preset needs them).
            let norm = (ci % 2 == 0).then_some(CalibrlNormalizers {
                all_token_count: if expert_rows { 1201.0 } else { 0.0 },
                all_seq_count: if expert_rows { 377.0 } else { 0.0 },
                ..CalibrlNormalizers::new(977.0, 301.0)
            });
            let (cpu, gpu) = run_both(g, cfg, &b, dt, norm);
            compare(
                &format!("{cfg} rows={rows} padded={padded} {dt:?}"),
                &cpu,
                &gpu,
                dt,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn loss_is_bitwise_deterministic() {
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(12);
    let b = batch(&mut rng, 257, false, false);
    let (_, first) = run_both(g, CONFIGS[0], &b, Dt::F32, None);
    let (_, second) = run_both(g, CONFIGS[0], &b, Dt::F32, None);
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first.grad), bits(&second.grad));
    assert_eq!(
        bits(&first.metrics.to_array()),
        bits(&second.metrics.to_array())
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn large_batch_matches_cpu() {
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(13);
    let b = batch(&mut rng, 5000, false, false);
    let (cpu, gpu) = run_both(g, CONFIGS[1], &b, Dt::F32, None);
    compare("5000 rows", &cpu, &gpu, Dt::F32);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn large_batch_token_pass_shapes_match_cpu() {
    // The token pass's geometry (issue 34): blocks own runs of 2048·k consecutive tokens, so
    // rows of 4095…4097 tokens cross block and tile boundaries; few long rows (8 × 4096, and
    // 256 × 4096 reduced to 24 rows) and many short ones (65536 × 16 reduced to 4096 rows);
    // one-token rows and runs of empty rows longer than the 256 rows a block stages at a time
    // (a tile then takes several chunks); base addresses 4 or 2 bytes off 16-byte alignment
    // (the scalar fallback of the vector loads and stores). Each against the CPU backend,
    // with a row pass (sequence Δ, seq-mean-token-mean) and without, and bitwise repeatable.
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(18);
    let mut empty_runs = vec![5];
    empty_runs.extend(std::iter::repeat(0).take(600));
    empty_runs.push(3000);
    empty_runs.extend(std::iter::repeat(0).take(300));
    empty_runs.extend([1, 0, 0, 700]);
    empty_runs.extend(std::iter::repeat(0).take(257));
    let shapes: Vec<(&str, Vec<usize>, bool)> = vec![
        ("8 x 4096", vec![4096; 8], true),
        (
            "8 x 4095..4097",
            (0..8).map(|i| 4095 + i % 3).collect(),
            false,
        ),
        ("24 x 4096", vec![4096; 24], false),
        ("4096 x 16", vec![16; 4096], true),
        ("3000 x 1", vec![1; 3000], false),
        ("empty runs", empty_runs, false),
    ];
    let configs = [CONFIGS[0], CONFIGS[3], CONFIGS[6], CONFIGS[10], CONFIGS[19]];
    for (si, (name, lens, padded)) in shapes.into_iter().enumerate() {
        let b = batch_of(&mut rng, lens, padded, true);
        for (ci, cfg) in configs.iter().enumerate() {
            let dt = if (si + ci) % 2 == 0 {
                Dt::F32
            } else {
                Dt::Bf16
            };
            let inputs = Inputs {
                shift: (si + ci) % 3 % 2,
                ..ALL_INPUTS
            };
            let label = format!("{cfg} {name} {dt:?} shift={}", inputs.shift);
            let (cpu, gpu) = run_both_with(g, cfg, &b, dt, None, inputs);
            compare(&label, &cpu, &gpu, dt);
            if ci == 0 {
                let (_, again) = run_both_with(g, cfg, &b, dt, None, inputs);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&gpu.grad), bits(&again.grad), "{label}: repeat");
                assert_eq!(
                    bits(&gpu.metrics.to_array()),
                    bits(&again.metrics.to_array()),
                    "{label}: repeat"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn long_rows_match_cpu() {
    // Rows of hundreds to thousands of tokens (each row kernel strides a row many times).
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(15);
    for (rows, max_len) in [(9, 300), (40, 1200), (6, 5000)] {
        for cfg in [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[10]] {
            let expert_rows = cfg.contains("luffy");
            let b = batch_with_lengths(&mut rng, rows, rows % 2 == 0, expert_rows, max_len);
            let (cpu, gpu) = run_both(g, cfg, &b, Dt::F32, None);
            compare(
                &format!("{cfg} rows={rows} max_len={max_len}"),
                &cpu,
                &gpu,
                Dt::F32,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn loss_matches_cpu_without_optional_inputs_and_with_token_weights() {
    // No mask and no expert flags: N_tok and N_seq come from the layout (no counts kernel);
    // without ref/entropy the KL and entropy paths are off; token weights scale the PG term.
    // Row lengths from 1 to 5000 cover every team size (2 … 32 threads per row).
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(16);
    let variants = [
        (true, false, false, false, false),
        (false, false, false, false, true),
        (false, true, true, true, true),
        (true, true, false, true, true),
    ];
    for (rows, max_len) in [(301, 6), (64, 40), (17, 300), (5, 5000)] {
        for (vi, &(mask, is_expert, reference, entropy, token_weights)) in
            variants.iter().enumerate()
        {
            for cfg in [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[3], CONFIGS[6]] {
                let trains_experts = cfg.contains("luffy");
                let b = batch_with_lengths(&mut rng, rows, vi % 2 == 1, trains_experts, max_len);
                let inputs = Inputs {
                    mask,
                    is_expert,
                    reference,
                    entropy,
                    token_weights,
                    expert: true,
                    old_dtype: None,
                    shift: 0,
                };
                for dt in [Dt::F32, Dt::Bf16] {
                    let (cpu, gpu) = run_both_with(g, cfg, &b, dt, None, inputs);
                    compare(
                        &format!("{cfg} rows={rows} max_len={max_len} variant={vi} {dt:?}"),
                        &cpu,
                        &gpu,
                        dt,
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn loss_matches_cpu_for_f16_and_mixed_dtypes() {
    // `calibrl_loss_f16`, and `calibrl_loss_any` (ℓold in another dtype than ℓ and ∂L/∂ℓ).
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(17);
    for cfg in [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[10], CONFIGS[17]] {
        let expert_rows = cfg.contains("luffy") || cfg.contains("authors");
        for (rows, padded, dt, old_dtype) in [
            (9, false, Dt::F16, None),
            (40, true, Dt::F16, None),
            (33, false, Dt::F32, Some(Dt::Bf16)),
            (12, true, Dt::Bf16, Some(Dt::F64)),
            (20, false, Dt::F16, Some(Dt::F32)),
        ] {
            let b = batch(&mut rng, rows, padded, expert_rows);
            let inputs = Inputs {
                old_dtype,
                ..ALL_INPUTS
            };
            let (cpu, gpu) = run_both_with(g, cfg, &b, dt, None, inputs);
            compare(
                &format!("{cfg} rows={rows} padded={padded} {dt:?} old {old_dtype:?}"),
                &cpu,
                &gpu,
                dt,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn advantages_match_cpu() {
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(14);
    for (rows, groups, cfg) in [
        (1usize, 1usize, r#"{}"#),
        (40, 5, r#"{"norm_by_std":true}"#),
        (
            1000,
            97,
            r#"{"rarity_weighting":false,"correct_threshold":0.5}"#,
        ),
        (4, 4, r#"{"norm_by_std":true}"#), // groups of one rollout
    ] {
        let cfgp = config(cfg);
        let rewards: Vec<f64> = (0..rows)
            .map(|_| {
                if rng.below(3) == 0 {
                    rng.uniform()
                } else {
                    rng.below(2) as f64
                }
            })
            .collect();
        // Every group gets at least one rollout; some rows are expert rows.
        let gid: Vec<f64> = (0..rows)
            .map(|i| {
                if i < groups {
                    i as f64
                } else {
                    rng.below(groups) as f64
                }
            })
            .collect();
        let expert: Vec<f64> = (0..rows)
            .map(|i| (i >= groups && rng.below(8) == 0) as u8 as f64)
            .collect();
        let correct: Vec<f64> = (0..rows).map(|_| rng.below(2) as f64).collect();
        for explicit in [false, true] {
            let mut t_r = Pair::new(g, Dt::F32, &rewards, &[rows]);
            let mut t_g = Pair::new(g, Dt::I64, &gid, &[rows]);
            let mut t_e = Pair::new(g, Dt::U8, &expert, &[rows]);
            let mut t_c = Pair::new(g, Dt::U8, &correct, &[rows]);
            let mut outs: Vec<Vec<Vec<f64>>> = Vec::new();
            for on_gpu in [false, true] {
                let nan = vec![f64::NAN; rows];
                let (mut a, mut w, mut s) = (
                    Pair::new(g, Dt::F64, &nan, &[rows]),
                    Pair::new(g, Dt::F32, &nan, &[rows]),
                    Pair::new(g, Dt::F32, &nan, &[rows]),
                );
                let args = CalibrlAdvantageArgs {
                    rewards: t_r.desc(on_gpu),
                    group_ids: t_g.desc(on_gpu),
                    num_groups: groups as i64,
                    correct: if explicit { t_c.desc(on_gpu) } else { null() },
                    is_expert: t_e.desc(on_gpu),
                    advantages: a.desc(on_gpu),
                    weights: w.desc(on_gpu),
                    signs: s.desc(on_gpu),
                };
                // SAFETY: live descriptors.
                let st = unsafe {
                    calibrl_group_advantages(cfgp, &args, g.stream.cu_stream() as *mut c_void)
                };
                assert_eq!(st, CalibrlStatus::Ok, "{}", last_error());
                g.stream.synchronize().unwrap();
                outs.push(if on_gpu {
                    vec![a.dev_values(g), w.dev_values(g), s.dev_values(g)]
                } else {
                    vec![a.host_values(), w.host_values(), s.host_values()]
                });
            }
            for (j, name) in ["advantages", "weights", "signs"].iter().enumerate() {
                let dt = if j == 0 { Dt::F64 } else { Dt::F32 };
                close(
                    &format!("{cfg} rows={rows} {name}"),
                    &outs[0][j],
                    &outs[1][j],
                    dt,
                    0.0,
                );
            }
        }
        // SAFETY: handle from calibrl_config_new.
        unsafe { calibrl_config_free(cfgp) };
    }
}

#[test]
fn all_equal_groups_get_exact_zeros_on_gpu() {
    let (g, _guard) = require_gpu!();
    // SPEC §3: a group whose rewards are all equal has A = 0 exactly.
    let mut rewards = vec![1.2155; 8];
    rewards.extend([0.3, 0.3, 1.0]);
    let mut gid = vec![0.0; 8];
    gid.extend([1.0, 1.0, 1.0]);
    let rows = rewards.len();
    let cfgp = config(r#"{"norm_by_std":true}"#);
    let mut t_r = Pair::new(g, Dt::F64, &rewards, &[rows]);
    let mut t_g = Pair::new(g, Dt::I64, &gid, &[rows]);
    let nan = vec![f64::NAN; rows];
    let (mut a, mut w, mut s) = (
        Pair::new(g, Dt::F64, &nan, &[rows]),
        Pair::new(g, Dt::F64, &nan, &[rows]),
        Pair::new(g, Dt::F64, &nan, &[rows]),
    );
    let args = CalibrlAdvantageArgs {
        rewards: t_r.desc(true),
        group_ids: t_g.desc(true),
        num_groups: 2,
        correct: null(),
        is_expert: null(),
        advantages: a.desc(true),
        weights: w.desc(true),
        signs: s.desc(true),
    };
    // SAFETY: live descriptors.
    let st = unsafe { calibrl_group_advantages(cfgp, &args, g.stream.cu_stream() as *mut c_void) };
    assert_eq!(st, CalibrlStatus::Ok, "{}", last_error());
    g.stream.synchronize().unwrap();
    let (av, wv) = (a.dev_values(g), w.dev_values(g));
    for i in 0..8 {
        assert_eq!(av[i], 0.0, "row {i}: {}", av[i]);
        assert_eq!(wv[i], 0.0);
    }
    assert!(av[8] != 0.0);
    // SAFETY: handle from calibrl_config_new.
    unsafe { calibrl_config_free(cfgp) };
}

// ------------------------------------------------------------ Clip-Cov and KL-Cov (SPEC §4.6)
//
// The CUDA backend must select the same tokens as the CPU backend (src/cuda/cov.rs): a token
// selected on one backend only would change its gradient by its whole policy-gradient term
// (Clip-Cov) or by β/N_tok (KL-Cov), far outside the tolerances of `compare`.

/// Entropy-control configurations: alone (GRPO) and with the CalibRL term, both controls, the
/// call's own or caller-given means and count.
const COV_CONFIGS: &[&str] = &[
    r#"{"preset":"grpo","entropy_control":"clip_cov","clip_cov_ratio":0.1,"clip_cov_lb":-0.5,"clip_cov_ub":0.5}"#,
    r#"{"preset":"paper","entropy_control":"clip_cov","clip_cov_ratio":0.2,"clip_cov_lb":-0.3,"clip_cov_ub":0.4,"cov_seed":7}"#,
    r#"{"preset":"reference","entropy_control":"clip_cov","clip_cov_ratio":0.5,"clip_cov_lb":-1.0,"clip_cov_ub":1.0,"cov_seed":12345,"kl_coef":0.05,"entropy_coef":0.01}"#,
    r#"{"preset":"grpo","entropy_control":"kl_cov","kl_cov_ratio":0.1}"#,
    r#"{"preset":"paper","entropy_control":"kl_cov","kl_cov_ratio":0.2,"kl_cov_coef":0.5}"#,
    r#"{"preset":"reference","entropy_control":"kl_cov","kl_cov_ratio":0.3,"agg":"seq-mean-token-mean"}"#,
    r#"{"preset":"paper","entropy_control":"clip_cov","clip_cov_ratio":0.05,"clip_cov_lb":-0.5,"clip_cov_ub":0.5,"cov_adv_mean":0.05,"cov_logprob_mean":-0.9,"cov_token_count":5000}"#,
    r#"{"preset":"reference","entropy_control":"kl_cov","kl_cov_ratio":0.01,"cov_adv_mean":-0.1,"cov_logprob_mean":-2.5,"cov_token_count":20000}"#,
    r#"{"preset":"grpo","entropy_control":"kl_cov","kl_cov_ratio":1.0}"#,
    r#"{"preset":"grpo","entropy_control":"clip_cov","clip_cov_ratio":1.0,"clip_cov_lb":-5,"clip_cov_ub":5}"#,
];

/// `compare`, and the selected fraction is the CPU's exactly (the same tokens).
fn compare_cov(label: &str, cpu: &Outputs, gpu: &Outputs, dt: Dt) {
    compare(label, cpu, gpu, dt);
    assert_eq!(
        cpu.metrics.cov_selected_frac, gpu.metrics.cov_selected_frac,
        "{label}: cov_selected_frac"
    );
    assert_eq!(
        cpu.metrics_tensor[15], gpu.metrics_tensor[15],
        "{label}: metrics[15]"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn entropy_control_matches_cpu() {
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(21);
    for cfg in COV_CONFIGS {
        for (rows, padded, dt) in [
            (1, false, Dt::F32),
            (9, true, Dt::Bf16),
            (60, false, Dt::F32),
            (150, true, Dt::F64),
            (400, false, Dt::Bf16),
        ] {
            let b = batch(&mut rng, rows, padded, true);
            let (cpu, gpu) = run_both(g, cfg, &b, dt, None);
            let label = format!("{cfg} rows={rows} padded={padded} {dt:?}");
            compare_cov(&label, &cpu, &gpu, dt);
            if rows >= 60 {
                assert!(cpu.metrics.cov_selected_frac > 0.0, "{label}: selects");
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn entropy_control_non_finite_covariances_match_cpu() {
    // Issue 30, item 1: log-probs of −1e308 with a caller-given mean of 1e308, or of −DBL_MAX
    // with the call's own mean (its sum overflows): non-finite covariances are never selected,
    // on either backend.
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(23);
    for (tiny, cfg) in [
        (
            -1e308,
            r#"{"preset":"grpo","entropy_control":"kl_cov","kl_cov_ratio":0.2,"cov_adv_mean":0.05,"cov_logprob_mean":1e308,"cov_token_count":500}"#,
        ),
        (
            -f64::MAX,
            r#"{"preset":"grpo","entropy_control":"kl_cov","kl_cov_ratio":0.2}"#,
        ),
        (
            -1e308,
            r#"{"preset":"grpo","entropy_control":"clip_cov","clip_cov_ratio":0.3,"clip_cov_lb":-1e300,"clip_cov_ub":1e300,"cov_adv_mean":0.05,"cov_logprob_mean":1e308,"cov_token_count":500}"#,
        ),
    ] {
        for (rows, padded) in [(30, false), (120, true)] {
            let mut b = batch(&mut rng, rows, padded, true);
            for (k, l) in b.logprobs.iter_mut().enumerate() {
                if k % 4 == 1 {
                    *l = tiny;
                    b.old[k] = tiny;
                }
            }
            // Only the inputs the policy term reads: the exploration sums, entropy and KL of
            // such log-probs overflow (the CPU backend then rightly reports NON_FINITE), and
            // this test is about the selection.
            let inputs = Inputs {
                is_expert: false,
                reference: false,
                entropy: false,
                expert: false,
                ..ALL_INPUTS
            };
            let (cpu, gpu) = run_both_with(g, cfg, &b, Dt::F64, None, inputs);
            compare_cov(&format!("{cfg} rows={rows}"), &cpu, &gpu, Dt::F64);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn entropy_control_ties_match_cpu() {
    // Equal advantages (0.1: not a binary fraction, so A − mean A is a rounding residue that
    // only the same summation order reproduces) or three values, and log-probs from a few
    // values: most covariances tie, so KL-Cov's order is decided by position.
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(22);
    for (ai, advs) in [[0.1, 0.1, 0.1], [-0.7, 0.1, 1.3]].iter().enumerate() {
        for (rows, padded, dt) in [(30, false, Dt::F32), (200, true, Dt::Bf16)] {
            let mut b = batch(&mut rng, rows, padded, true);
            for (i, a) in b.advantages.iter_mut().enumerate() {
                *a = advs[i % 3];
            }
            for (k, l) in b.logprobs.iter_mut().enumerate() {
                *l = -(((k * 7919) % 6 + 1) as f64) / 3.0;
                b.old[k] = *l + 0.1 * ((k % 5) as f64 - 2.0); // some ratios clipped
            }
            for cfg in [
                r#"{"preset":"grpo","entropy_control":"kl_cov","kl_cov_ratio":0.1}"#,
                r#"{"preset":"paper","entropy_control":"kl_cov","kl_cov_ratio":0.35}"#,
                r#"{"preset":"grpo","entropy_control":"clip_cov","clip_cov_ratio":0.2,"clip_cov_lb":-0.5,"clip_cov_ub":0.5,"cov_seed":3}"#,
            ] {
                let (cpu, gpu) = run_both(g, cfg, &b, dt, None);
                compare_cov(
                    &format!("{cfg} advantages {ai} rows={rows} {dt:?}"),
                    &cpu,
                    &gpu,
                    dt,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn entropy_control_large_batch_matches_cpu_and_is_bitwise_deterministic() {
    // About 100 000 tokens: many tiles and blocks, three bytes of flat index in the select.
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(23);
    // Under compute-sanitizer (CALIBRL_GPU_TEST_QUICK=1) a tenth: still several tiles and two
    // bytes of flat index.
    let quick = std::env::var("CALIBRL_GPU_TEST_QUICK").is_ok_and(|v| v == "1");
    let rows = if quick { 500 } else { 5000 };
    let b = batch(&mut rng, rows, false, true);
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for cfg in [COV_CONFIGS[1], COV_CONFIGS[4]] {
        let (cpu, first) = run_both(g, cfg, &b, Dt::F32, None);
        compare_cov(&format!("{cfg} {rows} rows"), &cpu, &first, Dt::F32);
        let (_, second) = run_both(g, cfg, &b, Dt::F32, None);
        assert_eq!(bits(&first.grad), bits(&second.grad), "{cfg}");
        assert_eq!(
            bits(&first.metrics.to_array()),
            bits(&second.metrics.to_array()),
            "{cfg}"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a GPU machine (scripts/gpu-check.sh does)"]
fn entropy_control_with_other_inputs_matches_cpu() {
    // Global normalisers (no counts kernel) with per-token importance weights ρ; and neither a
    // mask nor expert flags (every position counts, every row is a rollout).
    let (g, _guard) = require_gpu!();
    let mut rng = Rng::new(24);
    let weighted = Inputs {
        token_weights: true,
        ..ALL_INPUTS
    };
    let plain = Inputs {
        mask: false,
        is_expert: false,
        ..ALL_INPUTS
    };
    for (inputs, norm) in [
        (weighted, Some(CalibrlNormalizers::new(977.0, 301.0))),
        (plain, None),
    ] {
        for cfg in [COV_CONFIGS[2], COV_CONFIGS[5], COV_CONFIGS[7]] {
            for (rows, padded, dt) in [(33, true, Dt::F32), (120, false, Dt::Bf16)] {
                let b = batch(&mut rng, rows, padded, true);
                let (cpu, gpu) = run_both_with(g, cfg, &b, dt, norm, inputs);
                compare_cov(
                    &format!("{cfg} rows={rows} {dt:?} mask={}", inputs.mask),
                    &cpu,
                    &gpu,
                    dt,
                );
            }
        }
    }
}
