//! Shared test helpers: a seeded PRNG, owned DLPack tensors built by hand (own `#[repr(C)]`
//! structs, layout-identical to dlpack.h), random loss batches, and thin wrappers that call the
//! library through its C ABI exports (linked through the rlib).

#![allow(dead_code, clippy::needless_range_loop)]

pub mod reference;

use calibrl::ffi::loss::CalibrlLossArgs;
use calibrl::Config;
use half::{bf16, f16};
use reference::{RefBatch, RefExpert};
use std::ffi::{c_void, CStr, CString};

// ---------------------------------------------------------------------------------------------
// PRNG (splitmix64)
// ---------------------------------------------------------------------------------------------

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }
    /// Uniform integer in [lo, hi).
    pub fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }
    pub fn bool(&mut self, p: f64) -> bool {
        self.f64() < p
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = self.f64().max(1e-300);
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

// ---------------------------------------------------------------------------------------------
// DLPack tensors, declared here as a consumer would
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

#[repr(C)]
#[derive(Debug)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    pub strides: *mut i64,
    pub byte_offset: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F64,
    F32,
    BF16,
    F16,
    I64,
    I32,
    U8,
    Bool,
}

impl Dt {
    pub fn dl(self) -> DLDataType {
        let (code, bits) = match self {
            Dt::F64 => (2, 64),
            Dt::F32 => (2, 32),
            Dt::BF16 => (4, 16),
            Dt::F16 => (2, 16),
            Dt::I64 => (0, 64),
            Dt::I32 => (0, 32),
            Dt::U8 => (1, 8),
            Dt::Bool => (6, 8),
        };
        DLDataType {
            code,
            bits,
            lanes: 1,
        }
    }
    pub fn size(self) -> usize {
        match self {
            Dt::F64 | Dt::I64 => 8,
            Dt::F32 | Dt::I32 => 4,
            Dt::BF16 | Dt::F16 => 2,
            Dt::U8 | Dt::Bool => 1,
        }
    }
}

/// Rounds a value to what a tensor of dtype `dt` stores.
pub fn quant(v: f64, dt: Dt) -> f64 {
    match dt {
        Dt::F64 => v,
        Dt::F32 => v as f32 as f64,
        Dt::BF16 => bf16::from_f64(v).to_f64(),
        Dt::F16 => f16::from_f64(v).to_f64(),
        Dt::I64 | Dt::I32 | Dt::U8 | Dt::Bool => v,
    }
}

pub fn quant_vec(v: &[f64], dt: Dt) -> Vec<f64> {
    v.iter().map(|&x| quant(x, dt)).collect()
}

/// An owned host tensor and its descriptor. Storage is u64-aligned.
pub struct Tensor {
    store: Vec<u64>,
    shape: Vec<i64>,
    pub dt: Dt,
    pub n: usize,
    pub desc: DLTensor,
}

impl Tensor {
    fn alloc(shape: &[usize], dt: Dt) -> Tensor {
        let n: usize = shape.iter().product();
        let words = (n * dt.size()).div_ceil(8).max(1);
        let mut t = Tensor {
            store: vec![0u64; words],
            shape: shape.iter().map(|&s| s as i64).collect(),
            dt,
            n,
            desc: DLTensor {
                data: std::ptr::null_mut(),
                device: DLDevice {
                    device_type: 1,
                    device_id: 0,
                },
                ndim: shape.len() as i32,
                dtype: dt.dl(),
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
        };
        t.desc.data = t.store.as_mut_ptr() as *mut c_void;
        t.desc.shape = t.shape.as_mut_ptr();
        t
    }
    /// Views the same elements with another shape: the descriptor's `shape` array and `ndim`
    /// change together, so the library never reads past the shape array.
    pub fn set_shape(&mut self, shape: &[usize]) {
        self.shape = shape.iter().map(|&s| s as i64).collect();
        self.desc.shape = self.shape.as_mut_ptr();
        self.desc.ndim = shape.len() as i32;
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.n * self.dt.size();
        unsafe { std::slice::from_raw_parts_mut(self.store.as_mut_ptr() as *mut u8, len) }
    }
    pub fn bytes(&self) -> &[u8] {
        let len = self.n * self.dt.size();
        unsafe { std::slice::from_raw_parts(self.store.as_ptr() as *const u8, len) }
    }
    pub fn set(&mut self, i: usize, v: f64) {
        let p = self.store.as_mut_ptr() as *mut u8;
        unsafe {
            match self.dt {
                Dt::F64 => *(p as *mut f64).add(i) = v,
                Dt::F32 => *(p as *mut f32).add(i) = v as f32,
                Dt::BF16 => *(p as *mut bf16).add(i) = bf16::from_f64(v),
                Dt::F16 => *(p as *mut f16).add(i) = f16::from_f64(v),
                Dt::I64 => *(p as *mut i64).add(i) = v as i64,
                Dt::I32 => *(p as *mut i32).add(i) = v as i32,
                Dt::U8 | Dt::Bool => *p.add(i) = v as u8,
            }
        }
    }
    pub fn get(&self, i: usize) -> f64 {
        let p = self.store.as_ptr() as *const u8;
        unsafe {
            match self.dt {
                Dt::F64 => *(p as *const f64).add(i),
                Dt::F32 => *(p as *const f32).add(i) as f64,
                Dt::BF16 => (*(p as *const bf16).add(i)).to_f64(),
                Dt::F16 => (*(p as *const f16).add(i)).to_f64(),
                Dt::I64 => *(p as *const i64).add(i) as f64,
                Dt::I32 => *(p as *const i32).add(i) as f64,
                Dt::U8 | Dt::Bool => *p.add(i) as f64,
            }
        }
    }
    pub fn new(vals: &[f64], shape: &[usize], dt: Dt) -> Tensor {
        let mut t = Tensor::alloc(shape, dt);
        assert_eq!(vals.len(), t.n, "values vs shape {shape:?}");
        for (i, &v) in vals.iter().enumerate() {
            t.set(i, v);
        }
        t
    }
    pub fn ints(vals: &[i64], shape: &[usize], dt: Dt) -> Tensor {
        let mut t = Tensor::alloc(shape, dt);
        assert_eq!(vals.len(), t.n);
        let p = t.store.as_mut_ptr() as *mut u8;
        for (i, &v) in vals.iter().enumerate() {
            unsafe {
                match dt {
                    Dt::I64 => *(p as *mut i64).add(i) = v,
                    Dt::I32 => *(p as *mut i32).add(i) = v as i32,
                    _ => *p.add(i) = v as u8,
                }
            }
        }
        t
    }
    /// A tensor filled with `v` (a sentinel for outputs).
    pub fn filled(v: f64, shape: &[usize], dt: Dt) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::new(&vec![v; n], shape, dt)
    }
    pub fn to_vec(&self) -> Vec<f64> {
        (0..self.n).map(|i| self.get(i)).collect()
    }
    pub fn ptr(&self) -> *const DLTensor {
        &self.desc
    }
    pub fn mptr(&mut self) -> *mut DLTensor {
        &mut self.desc
    }
    pub fn lib(&self) -> *const calibrl::tensor::DLTensor {
        &self.desc as *const DLTensor as *const calibrl::tensor::DLTensor
    }
    pub fn lib_mut(&mut self) -> *mut calibrl::tensor::DLTensor {
        &mut self.desc as *mut DLTensor as *mut calibrl::tensor::DLTensor
    }
}

pub fn opt_lib(t: &Option<Tensor>) -> *const calibrl::tensor::DLTensor {
    t.as_ref().map(|t| t.lib()).unwrap_or(std::ptr::null())
}
pub fn opt_lib_mut(t: &mut Option<Tensor>) -> *mut calibrl::tensor::DLTensor {
    t.as_mut()
        .map(|t| t.lib_mut())
        .unwrap_or(std::ptr::null_mut())
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

pub fn close(got: f64, want: f64, rtol: f64, atol: f64) -> bool {
    (got - want).abs() <= atol + rtol * want.abs().max(got.abs())
}

#[track_caller]
pub fn assert_close(what: &str, got: f64, want: f64, rtol: f64, atol: f64) {
    assert!(
        close(got, want, rtol, atol),
        "{what}: got {got:.17e}, want {want:.17e} (diff {:.3e}, rtol {rtol:e}, atol {atol:e})",
        (got - want).abs()
    );
}

#[track_caller]
pub fn assert_vec_close(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            close(g, w, rtol, atol),
            "{what}[{i}]: got {g:.17e}, want {w:.17e} (diff {:.3e})",
            (g - w).abs()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Random loss cases
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Packed,
    Padded,
}

#[derive(Clone, Debug)]
pub struct Gen {
    pub b: usize,
    pub layout: Layout,
    /// Max row length.
    pub max_len: usize,
    pub zero_len: bool,
    /// Random holes in the mask.
    pub holes: bool,
    pub old: bool,
    pub refl: bool,
    pub ent: bool,
    /// Number of expert slots (0: no expert data).
    pub experts: usize,
    pub expert_layout: Layout,
    /// Some rows without an expert (index −1).
    pub missing_expert: bool,
    /// Some rows are expert rows (is_expert).
    pub expert_rows: bool,
    /// Logprobs strictly negative (RL-PLUS needs π < 1).
    pub ratio_spread: f64,
}

impl Default for Gen {
    fn default() -> Self {
        Gen {
            b: 5,
            layout: Layout::Packed,
            max_len: 7,
            zero_len: true,
            holes: true,
            old: true,
            refl: true,
            ent: true,
            experts: 2,
            expert_layout: Layout::Packed,
            missing_expert: true,
            expert_rows: false,
            ratio_spread: 1.3,
        }
    }
}

/// A loss call: the reference batch plus how it is laid out in tensors.
#[derive(Clone, Debug)]
pub struct Case {
    pub b: RefBatch,
    pub layout: Layout,
    /// Padded: S; packed: offsets.
    pub seq_len: usize,
    pub offsets: Vec<i64>,
    pub expert_layout: Layout,
    pub expert_seq_len: usize,
    pub expert_offsets: Vec<i64>,
    /// Pass a mask tensor (otherwise every position counts).
    pub mask_given: bool,
    pub expert_mask_given: bool,
    pub is_expert_given: bool,
}

fn make_rows(
    rng: &mut Rng,
    lens: &[usize],
    layout: Layout,
) -> (Vec<std::ops::Range<usize>>, usize, Vec<i64>) {
    match layout {
        Layout::Packed => {
            let mut off = vec![0i64];
            let mut rows = vec![];
            for &l in lens {
                let s = *off.last().unwrap() as usize;
                rows.push(s..s + l);
                off.push((s + l) as i64);
            }
            (rows, 0, off)
        }
        Layout::Padded => {
            let s = lens.iter().cloned().max().unwrap_or(0) + rng.int(0, 2);
            let rows = (0..lens.len()).map(|i| i * s..(i + 1) * s).collect();
            (rows, s, vec![])
        }
    }
}

pub fn gen_case(rng: &mut Rng, g: &Gen) -> Case {
    let lens: Vec<usize> = (0..g.b)
        .map(|_| {
            if g.zero_len && rng.bool(0.15) {
                0
            } else {
                rng.int(1, g.max_len + 1)
            }
        })
        .collect();
    let (rows, seq_len, offsets) = make_rows(rng, &lens, g.layout);
    let total = match g.layout {
        Layout::Packed => lens.iter().sum(),
        Layout::Padded => g.b * seq_len,
    };
    let mut mask = vec![0.0; total];
    for (i, r) in rows.iter().enumerate() {
        for (p, t) in r.clone().enumerate() {
            let inside = p < lens[i];
            mask[t] = if inside && !(g.holes && rng.bool(0.15)) {
                1.0
            } else {
                0.0
            };
        }
    }
    let mask_given = g.holes || g.layout == Layout::Padded || rng.bool(0.5);
    if !mask_given {
        mask.iter_mut().for_each(|m| *m = 1.0);
    }
    // Policy log-probs in (−3, −0.02): π < 1 for RL-PLUS.
    let logp: Vec<f64> = (0..total).map(|_| rng.range(-3.0, -0.02)).collect();
    let old = g.old.then(|| {
        logp.iter()
            .map(|&l| l + rng.range(-g.ratio_spread, g.ratio_spread))
            .collect::<Vec<_>>()
    });
    let refl = g.refl.then(|| {
        logp.iter()
            .map(|&l| l + rng.range(-3.0, 1.5))
            .collect::<Vec<_>>()
    });
    let ent = g
        .ent
        .then(|| (0..total).map(|_| rng.range(0.0, 3.0)).collect::<Vec<_>>());
    let adv: Vec<f64> = (0..g.b).map(|_| rng.range(-1.5, 1.5)).collect();
    let w: Vec<f64> = adv.iter().map(|a| a.abs() + rng.range(0.0, 0.3)).collect();
    let c: Vec<f64> = (0..g.b)
        .map(|_| if rng.bool(0.5) { 1.0 } else { -1.0 })
        .collect();
    let is_expert: Vec<bool> = (0..g.b).map(|i| g.expert_rows && i % 3 == 1).collect();
    let mut expert_seq_len = 0;
    let mut expert_offsets = vec![];
    let mut expert_mask_given = false;
    let expert = (g.experts > 0).then(|| {
        let elens: Vec<usize> = (0..g.experts).map(|_| rng.int(1, g.max_len + 3)).collect();
        let (erows, es, eoff) = make_rows(rng, &elens, g.expert_layout);
        expert_seq_len = es;
        expert_offsets = eoff;
        let etotal = match g.expert_layout {
            Layout::Packed => elens.iter().sum(),
            Layout::Padded => g.experts * es,
        };
        let mut emask = vec![0.0; etotal];
        for (i, r) in erows.iter().enumerate() {
            for (p, t) in r.clone().enumerate() {
                emask[t] = if p < elens[i] && !(g.holes && rng.bool(0.1)) {
                    1.0
                } else {
                    0.0
                };
            }
        }
        expert_mask_given = g.holes || g.expert_layout == Layout::Padded;
        if !expert_mask_given {
            emask.iter_mut().for_each(|m| *m = 1.0);
        }
        let elogp: Vec<f64> = (0..etotal).map(|_| rng.range(-2.5, -0.05)).collect();
        let index: Vec<i64> = (0..g.b)
            .map(|_| {
                if g.missing_expert && rng.bool(0.2) {
                    -1
                } else {
                    rng.int(0, g.experts) as i64
                }
            })
            .collect();
        RefExpert {
            rows: erows,
            logp: elogp,
            mask: emask,
            index,
        }
    });
    Case {
        b: RefBatch {
            rows,
            logp,
            mask,
            old,
            refl,
            ent,
            adv,
            w,
            c,
            is_expert,
            expert,
            norm: None,
            sg_logp: None,
            tw: None,
        },
        layout: g.layout,
        seq_len,
        offsets,
        expert_layout: g.expert_layout,
        expert_seq_len,
        expert_offsets,
        mask_given,
        expert_mask_given,
        is_expert_given: g.expert_rows,
    }
}

impl Case {
    /// Rounds every float input to what a tensor of `dt` holds (token floats) and `row_dt`
    /// (per-row floats), so the reference sees exactly what the library reads.
    pub fn quantize(&mut self, dt: Dt, row_dt: Dt) {
        let b = &mut self.b;
        b.logp = quant_vec(&b.logp, dt);
        for v in [&mut b.old, &mut b.refl, &mut b.ent].into_iter().flatten() {
            *v = quant_vec(v, dt);
        }
        if let Some(e) = &mut b.expert {
            e.logp = quant_vec(&e.logp, dt);
        }
        b.adv = quant_vec(&b.adv, row_dt);
        b.w = quant_vec(&b.w, row_dt);
    }
    pub fn token_shape(&self) -> Vec<usize> {
        match self.layout {
            Layout::Packed => vec![self.b.logp.len()],
            Layout::Padded => vec![self.b.rows.len(), self.seq_len],
        }
    }
    pub fn expert_shape(&self) -> Vec<usize> {
        let e = self.b.expert.as_ref().unwrap();
        match self.expert_layout {
            Layout::Packed => vec![e.logp.len()],
            Layout::Padded => vec![e.rows.len(), self.expert_seq_len],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Calling the library (C ABI exports through the rlib)
// ---------------------------------------------------------------------------------------------

pub struct Cfg(pub *mut calibrl::ffi::common::CalibrlConfig);

impl Drop for Cfg {
    fn drop(&mut self) {
        unsafe { calibrl::ffi::common::calibrl_config_free(self.0) }
    }
}

pub fn last_error() -> String {
    unsafe {
        CStr::from_ptr(calibrl::ffi::common::calibrl_last_error_message())
            .to_string_lossy()
            .into_owned()
    }
}

/// `calibrl_plan_new` over `prompts` and their rollouts' lengths (no rewards): the status and
/// the plan (NULL unless the status is 0).
pub fn plan_new(
    cfg: &calibrl::ffi::scheduler::CalibrlSchedulerConfig,
    prompts: &[calibrl::ffi::scheduler::CalibrlPromptDesc],
    rollout_lens: &[u32],
) -> (i32, *mut calibrl::ffi::scheduler::CalibrlPlan) {
    let mut plan = std::ptr::null_mut();
    let st = unsafe {
        calibrl::ffi::scheduler::calibrl_plan_new(
            cfg,
            prompts.as_ptr(),
            prompts.len(),
            rollout_lens.as_ptr(),
            rollout_lens.len(),
            std::ptr::null(),
            &mut plan,
        )
    };
    (st as i32, plan)
}

/// A config handle from JSON (panics with the library's message on failure).
pub fn cfg_new(json: &str) -> Cfg {
    let c = CString::new(json).unwrap();
    let mut out = std::ptr::null_mut();
    let st = unsafe { calibrl::ffi::common::calibrl_config_new(c.as_ptr(), &mut out) };
    assert_eq!(st as i32, 0, "config {json}: {}", last_error());
    Cfg(out)
}

pub fn config(json: &str) -> Config {
    Config::from_json(json).unwrap_or_else(|e| panic!("{json}: {}", e.message))
}

#[derive(Clone, Copy, Debug)]
pub struct CallOpts {
    pub dt: Dt,
    pub row_dt: Dt,
    pub grad_dt: Dt,
    pub idx_dt: Dt,
    pub mask_dt: Dt,
    pub grad_h: bool,
    pub metrics_tensor: bool,
    /// With `RefBatch::norm`: the all-row counts (SPEC §4.7) of the normalisers (0: the same).
    pub norm_all: Option<(f64, f64)>,
}

impl Default for CallOpts {
    fn default() -> Self {
        CallOpts {
            dt: Dt::F64,
            row_dt: Dt::F64,
            grad_dt: Dt::F64,
            idx_dt: Dt::I64,
            mask_dt: Dt::U8,
            grad_h: true,
            metrics_tensor: true,
            norm_all: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LibLoss {
    pub grad_l: Vec<f64>,
    pub grad_h: Vec<f64>,
    pub metrics: [f64; 16],
    /// The same metrics from the `metrics` output tensor.
    pub metrics_tensor: Option<Vec<f64>>,
}

/// Builds the tensors of `case` and calls `calibrl_loss`. Err: (status, message).
pub fn lib_loss(cfg_json: &str, case: &Case, o: &CallOpts) -> Result<LibLoss, (i32, String)> {
    let cfg = cfg_new(cfg_json);
    lib_loss_cfg(&cfg, case, o)
}

pub fn lib_loss_cfg(cfg: &Cfg, case: &Case, o: &CallOpts) -> Result<LibLoss, (i32, String)> {
    let b = &case.b;
    let shape = case.token_shape();
    let nrow = b.rows.len();
    let logp = Tensor::new(&b.logp, &shape, o.dt);
    let offsets =
        (case.layout == Layout::Packed).then(|| Tensor::ints(&case.offsets, &[nrow + 1], o.idx_dt));
    let mask = case
        .mask_given
        .then(|| Tensor::new(&b.mask, &shape, o.mask_dt));
    let old = b.old.as_ref().map(|v| Tensor::new(v, &shape, o.dt));
    let refl = b.refl.as_ref().map(|v| Tensor::new(v, &shape, o.dt));
    let ent = b.ent.as_ref().map(|v| Tensor::new(v, &shape, o.dt));
    let tw = b.tw.as_ref().map(|v| Tensor::new(v, &shape, o.dt));
    let adv = Tensor::new(&b.adv, &[nrow], o.row_dt);
    let w = Tensor::new(&b.w, &[nrow], o.row_dt);
    let c = Tensor::new(&b.c, &[nrow], o.row_dt);
    let is_expert = case.is_expert_given.then(|| {
        let v: Vec<f64> = b.is_expert.iter().map(|&e| e as u8 as f64).collect();
        Tensor::new(&v, &[nrow], Dt::Bool)
    });
    let (elogp, eoff, emask, eidx) = match &b.expert {
        Some(e) => {
            let es = case.expert_shape();
            (
                Some(Tensor::new(&e.logp, &es, o.dt)),
                (case.expert_layout == Layout::Packed)
                    .then(|| Tensor::ints(&case.expert_offsets, &[e.rows.len() + 1], o.idx_dt)),
                case.expert_mask_given
                    .then(|| Tensor::new(&e.mask, &es, o.mask_dt)),
                Some(Tensor::ints(&e.index, &[nrow], o.idx_dt)),
            )
        }
        None => (None, None, None, None),
    };
    let norm = b.norm.map(|(t, s)| {
        let (all_token_count, all_seq_count) = o.norm_all.unwrap_or((0.0, 0.0));
        calibrl::desc::metrics::CalibrlNormalizers {
            token_count: t,
            seq_count: s,
            all_token_count,
            all_seq_count,
        }
    });
    let mut grad_l = Some(Tensor::filled(f64::NAN, &shape, o.grad_dt));
    let mut grad_h = o
        .grad_h
        .then(|| Tensor::filled(f64::NAN, &shape, o.grad_dt));
    let mut mt = o
        .metrics_tensor
        .then(|| Tensor::filled(f64::NAN, &[16], Dt::F64));
    let args = CalibrlLossArgs {
        logprobs: logp.lib(),
        seq_offsets: opt_lib(&offsets),
        mask: opt_lib(&mask),
        old_logprobs: opt_lib(&old),
        ref_logprobs: opt_lib(&refl),
        entropy: opt_lib(&ent),
        advantages: adv.lib(),
        weights: w.lib(),
        signs: c.lib(),
        is_expert: opt_lib(&is_expert),
        expert_logprobs: opt_lib(&elogp),
        expert_offsets: opt_lib(&eoff),
        expert_mask: opt_lib(&emask),
        expert_index: opt_lib(&eidx),
        normalizers: norm
            .as_ref()
            .map(|n| n as *const _)
            .unwrap_or(std::ptr::null()),
        grad_logprobs: opt_lib_mut(&mut grad_l),
        grad_entropy: opt_lib_mut(&mut grad_h),
        metrics: opt_lib_mut(&mut mt),
        token_weights: opt_lib(&tw),
    };
    let mut hm = calibrl::desc::metrics::CalibrlMetrics::default();
    let st =
        unsafe { calibrl::ffi::loss::calibrl_loss(cfg.0, &args, &mut hm, std::ptr::null_mut()) };
    if st as i32 != 0 {
        return Err((st as i32, last_error()));
    }
    Ok(LibLoss {
        grad_l: grad_l.unwrap().to_vec(),
        grad_h: grad_h.map(|t| t.to_vec()).unwrap_or_default(),
        metrics: hm.to_array(),
        metrics_tensor: mt.map(|t| t.to_vec()),
    })
}

/// Central finite difference of `f` at `x[i]`.
pub fn central_diff(x: &mut [f64], i: usize, h: f64, mut f: impl FnMut(&[f64]) -> f64) -> f64 {
    let x0 = x[i];
    x[i] = x0 + h;
    let fp = f(x);
    x[i] = x0 - h;
    let fm = f(x);
    x[i] = x0;
    (fp - fm) / (2.0 * h)
}

// ---------------------------------------------------------------------------------------------
// Logits path wrappers
// ---------------------------------------------------------------------------------------------

/// Forward with f64 outputs (so a saved lse of |u| ~ 1e4 keeps its precision).
pub fn lib_logits_forward(
    logits: &Tensor,
    labels: &Tensor,
    temp: f64,
) -> Result<LibFwd, (i32, String)> {
    lib_logits_forward_dt(logits, labels, temp, Dt::F64)
}

pub struct LibFwd {
    pub logp: Vec<f64>,
    pub ent: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Forward with `[N]` outputs of dtype `out_dt`.
pub fn lib_logits_forward_dt(
    logits: &Tensor,
    labels: &Tensor,
    temp: f64,
    out_dt: Dt,
) -> Result<LibFwd, (i32, String)> {
    let n = labels.n;
    let mut lp = Tensor::filled(f64::NAN, &[n], out_dt);
    let mut en = Tensor::filled(f64::NAN, &[n], out_dt);
    let mut ls = Tensor::filled(f64::NAN, &[n], out_dt);
    let st = unsafe {
        calibrl::ffi::logits::calibrl_logits_forward(
            logits.lib(),
            labels.lib(),
            temp,
            lp.lib_mut(),
            en.lib_mut(),
            ls.lib_mut(),
            std::ptr::null_mut(),
        )
    };
    if st as i32 != 0 {
        return Err((st as i32, last_error()));
    }
    Ok(LibFwd {
        logp: lp.to_vec(),
        ent: en.to_vec(),
        lse: ls.to_vec(),
    })
}

/// Backward into `grad` (which may be the logits tensor itself when `in_place`).
#[allow(clippy::too_many_arguments)]
pub fn lib_logits_backward(
    logits: &mut Tensor,
    labels: &Tensor,
    temp: f64,
    vocab_start: i64,
    lse: &[f64],
    ent: &[f64],
    g: &[f64],
    h: Option<&[f64]>,
    grad: Option<&mut Tensor>,
) -> Result<(), (i32, String)> {
    let n = labels.n;
    let lse_t = Tensor::new(lse, &[n], Dt::F64);
    let ent_t = Tensor::new(ent, &[n], Dt::F64);
    let g_t = Tensor::new(g, &[n], Dt::F64);
    let h_t = h.map(|h| Tensor::new(h, &[n], Dt::F64));
    let logits_ptr = logits.lib();
    let out = match grad {
        Some(t) => t.lib_mut(),
        None => logits.lib_mut(),
    };
    let st = unsafe {
        calibrl::ffi::logits::calibrl_logits_backward(
            logits_ptr,
            labels.lib(),
            temp,
            vocab_start,
            lse_t.lib(),
            ent_t.lib(),
            g_t.lib(),
            opt_lib(&h_t),
            out,
            std::ptr::null_mut(),
        )
    };
    if st as i32 != 0 {
        return Err((st as i32, last_error()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The built cdylib
// ---------------------------------------------------------------------------------------------

/// `target/<profile>/libcalibrl.so`, found from the test executable
/// (`target/<profile>/deps/<test>`). `cargo test --test X` builds only the rlib, so this runs
/// `cargo build --lib` for the same profile and target directory first (a no-op when fresh);
/// that also keeps a stale library from being tested.
pub fn cdylib_path() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir");
    let profile = profile_dir.file_name().unwrap().to_str().unwrap();
    let profile = if profile == "debug" { "dev" } else { profile };
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--lib",
            "--quiet",
            "--profile",
            profile,
            "--target-dir",
        ])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build --lib");
    assert!(status.success(), "cargo build --lib failed");
    let path = profile_dir.join(format!(
        "{}calibrl{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(path.exists(), "{} not found", path.display());
    path
}

/// `<dir>/lib` laid out as scripts/install.sh installs the library: `libcalibrl.so.0` (the
/// SONAME, which linked programs record) -> `lib`, and `libcalibrl.so` -> `libcalibrl.so.0`.
pub fn installed_lib_dir(lib: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let lib_dir = dir.join("lib");
    std::fs::create_dir_all(&lib_dir).unwrap();
    for (link, to) in [
        ("libcalibrl.so.0", lib),
        ("libcalibrl.so", std::path::Path::new("libcalibrl.so.0")),
    ] {
        let _ = std::fs::remove_file(lib_dir.join(link));
        std::os::unix::fs::symlink(to, lib_dir.join(link)).unwrap();
    }
    lib_dir
}

/// The values of one kind of entry of an ELF file's dynamic section, from `readelf -d`
/// (`"Library soname"`, `"Shared library"`): `0x... (NEEDED)  Shared library: [libm.so.6]`.
pub fn readelf_dynamic(file: &std::path::Path, kind: &str) -> Vec<String> {
    let out = std::process::Command::new("readelf")
        .arg("-d")
        .arg(file)
        .output()
        .expect("run readelf (binutils) on the built library");
    assert!(out.status.success(), "readelf -d {} failed", file.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(&format!("{kind}: [")))
        .map(|(_, rest)| rest.trim_end().trim_end_matches(']').to_string())
        .collect()
}
