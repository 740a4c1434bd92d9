//! Shared harness of the fuzz targets: a reader of fuzz bytes, DLPack tensors built from them
//! in heap blocks exactly the size their descriptors claim (so AddressSanitizer sees any read or
//! write past them), and the invariants every call must keep:
//! - the status is a known one and never `CALIBRL_STATUS_PANIC`;
//! - on error, nothing was written (every buffer byte-identical) and a message was recorded;
//! - on success, inputs are unmodified, outputs are finite, and bytes of an output's buffer
//!   outside its view were not touched.

use calibrl::tensor::{DLDataType, DLDevice, DLTensor};
use half::{bf16, f16};
use std::ffi::CStr;

pub const OK: i32 = 0;
pub const PANIC: i32 = 10;
/// The highest status number the library defines.
pub const LAST_STATUS: i32 = 12;
/// Largest tensor buffer the harness allocates; bigger (but representable) shapes are skipped.
pub const MAX_BYTES: u128 = 1 << 20;
/// Most elements of a view the harness builds (a stride-0 view may have many in few bytes).
pub const MAX_ELEMENTS: i128 = 1 << 16;

/// Reads fuzz bytes; once they run out every read gives 0.
pub struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, at: 0 }
    }
    pub fn u8(&mut self) -> u8 {
        let v = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        v
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.u16() as usize % n
        }
    }
    /// True with probability about 1/`one_in` (false once the bytes run out).
    pub fn rare(&mut self, one_in: u8) -> bool {
        self.u8() % one_in.max(2) == 1
    }
    /// Mostly moderate values, sometimes the edge cases of every float format.
    pub fn float(&mut self) -> f64 {
        const SPECIAL: [f64; 28] = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            5e-324,
            1e-40,
            1e-30,
            1e38,
            3.4e38,
            -3.4e38,
            65504.0,
            70000.0,
            -70000.0,
            1e300,
            -1e300,
            1e5,
            -1e5,
            88.8,
            -150.0,
            1e-8,
            0.5,
            -0.5,
        ];
        match self.u8() {
            0..=191 => self.u16() as i16 as f64 / 256.0,
            192..=223 => -(self.u8() as f64) / 16.0,
            b => SPECIAL[(b as usize - 224 + self.u8() as usize) % SPECIAL.len()],
        }
    }
    /// A count: mostly small, sometimes the edges of its type.
    pub fn count(&mut self, small: usize) -> i64 {
        match self.u8() % 16 {
            0 => -(self.u8() as i64) - 1,
            1 => 1i64 << (self.u8() % 63),
            2 => i64::MAX - self.u8() as i64,
            3 => self.u32() as i64,
            _ => self.below(small + 1) as i64,
        }
    }
}

/// DLPack dtypes: (code, bits).
pub const F16: (u8, u8) = (2, 16);
pub const BF16: (u8, u8) = (4, 16);
pub const F32: (u8, u8) = (2, 32);
pub const F64: (u8, u8) = (2, 64);
pub const I32: (u8, u8) = (0, 32);
pub const I64: (u8, u8) = (0, 64);
pub const U8: (u8, u8) = (1, 8);
pub const BOOL: (u8, u8) = (6, 8);
pub const FLOATS: [(u8, u8); 4] = [F32, F64, BF16, F16];
pub const ALL: [(u8, u8); 9] = [F32, F64, BF16, F16, I32, I64, U8, BOOL, (0, 8)];

/// A host tensor the fuzz bytes described, in a buffer of exactly its extent.
pub struct FTensor {
    buf: Vec<u8>,
    shape: Vec<i64>,
    strides: Option<Vec<i64>>,
    pub desc: DLTensor,
    /// Byte position in `buf` of each element of the view (row-major order) when the
    /// descriptor is one the library must accept as far as memory goes.
    elems: Vec<usize>,
    elem_size: usize,
    /// An output that the call may write.
    pub output: bool,
    /// Address of the buffer `elems` index into (another tensor's, for an alias).
    origin: usize,
    /// A second descriptor of another tensor's memory (owns no buffer).
    alias: bool,
}

fn size_of((code, bits): (u8, u8)) -> usize {
    let _ = code;
    (bits as usize / 8).max(1)
}

fn store(buf: &mut [u8], at: usize, dt: (u8, u8), v: f64) {
    let b: Vec<u8> = match dt {
        F16 => f16::from_f64(v).to_le_bytes().to_vec(),
        BF16 => bf16::from_f64(v).to_le_bytes().to_vec(),
        F32 => (v as f32).to_le_bytes().to_vec(),
        F64 => v.to_le_bytes().to_vec(),
        I32 => (v as i32).to_le_bytes().to_vec(),
        I64 => (v as i64).to_le_bytes().to_vec(),
        (_, 8) => vec![v as i64 as u8],
        (_, bits) => vec![0x5a; bits as usize / 8],
    };
    buf[at..at + b.len()].copy_from_slice(&b);
}

fn load(buf: &[u8], at: usize, dt: (u8, u8)) -> Option<f64> {
    Some(match dt {
        F16 => f16::from_le_bytes([buf[at], buf[at + 1]]).to_f64(),
        BF16 => bf16::from_le_bytes([buf[at], buf[at + 1]]).to_f64(),
        F32 => f32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as f64,
        F64 => f64::from_le_bytes(buf[at..at + 8].try_into().unwrap()),
        I32 => i32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as f64,
        I64 => i64::from_le_bytes(buf[at..at + 8].try_into().unwrap()) as f64,
        U8 | BOOL => buf[at] as f64,
        (0, 8) => buf[at] as i8 as f64,
        _ => return None,
    })
}

/// What a target wants a tensor to be; the bytes may perturb any part of it.
pub struct Want<'v> {
    pub dtypes: Vec<(u8, u8)>,
    pub shape: Vec<usize>,
    /// Row-major values for the wanted shape (None: drawn from the bytes).
    pub values: Option<&'v [f64]>,
    pub output: bool,
}

impl<'v> Want<'v> {
    pub fn input(dtypes: &[(u8, u8)], shape: &[usize]) -> Want<'v> {
        Want {
            dtypes: dtypes.to_vec(),
            shape: shape.to_vec(),
            values: None,
            output: false,
        }
    }
    pub fn output(dtypes: &[(u8, u8)], shape: &[usize]) -> Want<'v> {
        Want {
            output: true,
            ..Want::input(dtypes, shape)
        }
    }
    pub fn with(mut self, values: &'v [f64]) -> Want<'v> {
        self.values = Some(values);
        self
    }
}

impl FTensor {
    /// Builds a tensor from `want`, perturbed by the bytes (dtype, shape, ndim, strides,
    /// byte_offset, NULL data, CUDA device when `allow_cuda`). `None`: the described tensor
    /// would be larger than the harness allocates, though representable (skip the call).
    pub fn build(b: &mut Bytes, want: &Want, allow_cuda: bool) -> Option<FTensor> {
        let mut dt = want.dtypes[b.below(want.dtypes.len())];
        let mut lanes = 1u16;
        if b.rare(24) {
            dt = ALL[b.below(ALL.len())];
        }
        if b.rare(64) {
            dt = (b.u8() % 8, b.u8());
            lanes = if b.rare(2) { 2 } else { 1 };
        }
        let mut shape: Vec<i64> = want.shape.iter().map(|&s| s as i64).collect();
        let mut perturbed = false;
        if b.rare(20) {
            perturbed = true;
            match b.u8() % 4 {
                0 => {
                    shape.pop();
                }
                1 => shape.push(b.count(4)),
                2 if !shape.is_empty() => {
                    let d = b.below(shape.len());
                    shape[d] = b.count(6);
                }
                _ => shape = (0..b.below(10)).map(|_| b.count(3)).collect(),
            }
        }
        let ndim = shape.len();
        let strides: Option<Vec<i64>> = if b.rare(12) {
            Some(
                (0..ndim)
                    .map(|_| match b.u8() % 8 {
                        0 => -(b.u8() as i64 % 5),
                        1 => 1i64 << (b.u8() % 63),
                        2 => i64::MIN + b.u8() as i64,
                        _ => b.u8() as i64 % 9,
                    })
                    .collect(),
            )
        } else {
            None
        };
        let device = if allow_cuda && b.rare(40) {
            [2, 13, 99][b.below(3)]
        } else if b.rare(60) {
            3 // CUDA pinned host memory: read as host memory
        } else {
            1
        };
        let elem = size_of(dt);
        // The view's extent, in elements (i128: no overflow for any descriptor).
        let dims_ok = shape.iter().all(|&d| d >= 0);
        let numel: i128 = shape
            .iter()
            .fold(1i128, |a, &d| a.saturating_mul(d.max(0) as i128));
        let compact: Vec<i128> = {
            let mut acc = 1i128;
            let mut st = vec![0i128; ndim];
            for d in (0..ndim).rev() {
                st[d] = acc;
                acc = acc.saturating_mul(shape[d].max(1) as i128);
            }
            st
        };
        let st: Vec<i128> = match &strides {
            Some(s) => s.iter().map(|&x| x as i128).collect(),
            None => compact,
        };
        let (mut lo, mut hi) = (0i128, 0i128);
        if numel > 0 {
            for (d, &e) in shape.iter().enumerate() {
                let reach = (e as i128 - 1).saturating_mul(st[d]);
                if reach < 0 {
                    lo = lo.saturating_add(reach.saturating_neg())
                } else {
                    hi = hi.saturating_add(reach)
                }
            }
        }
        let bytes = if numel > 0 {
            lo.saturating_add(hi)
                .saturating_add(1)
                .saturating_mul(elem as i128)
        } else {
            0
        };
        let representable = dims_ok && bytes <= isize::MAX as i128 && lanes == 1;
        // Too large for the harness (bytes, elements of a broadcast view, or rows of an empty
        // view that the library would hold per row): skip the call. Descriptors that cannot
        // exist are still passed: the library must refuse them without allocating.
        let longest = shape.iter().copied().max().unwrap_or(0) as i128;
        if representable
            && (bytes as u128 > MAX_BYTES || numel > MAX_ELEMENTS || longest > MAX_ELEMENTS)
        {
            return None;
        }
        let misalign = if b.rare(24) {
            1 + b.below(elem.max(2) - 1)
        } else {
            0
        };
        let mut t = FTensor {
            buf: Vec::new(),
            shape,
            strides,
            desc: DLTensor {
                data: std::ptr::null_mut(),
                device: DLDevice {
                    device_type: device,
                    device_id: 0,
                },
                ndim: ndim as i32,
                dtype: DLDataType {
                    code: dt.0,
                    bits: dt.1,
                    lanes,
                },
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            elems: Vec::new(),
            elem_size: elem,
            output: want.output,
            origin: 0,
            alias: false,
        };
        if representable && numel > 0 {
            // Exactly the bytes the view spans (plus the misalignment shift).
            let lo_bytes = (lo * elem as i128) as usize;
            t.buf = vec![0u8; misalign + bytes as usize];
            let base = misalign + lo_bytes;
            t.desc.byte_offset = base as u64;
            for i in 0..numel as usize {
                let mut flat = i;
                let mut off = 0i128;
                for d in (0..ndim).rev() {
                    let e = t.shape[d] as usize;
                    off += (flat % e) as i128 * st[d];
                    flat /= e;
                }
                t.elems.push((base as i128 + off * elem as i128) as usize);
            }
            // Gaps of a strided view hold a pattern; elements their values.
            for x in t.buf.iter_mut() {
                *x = 0xa5;
            }
            let values: Vec<f64> = match want.values {
                Some(v) if !perturbed && v.len() == numel as usize => v.to_vec(),
                _ => (0..numel).map(|_| b.float()).collect(),
            };
            let positions = t.elems.clone();
            for (k, &at) in positions.iter().enumerate() {
                store(&mut t.buf, at, dt, values[k]);
            }
        } else if !representable {
            t.buf = vec![0xa5; 16]; // the library must refuse the descriptor before reading
        }
        t.origin = t.buf.as_ptr() as usize;
        if huge_offset(b) && numel > 0 {
            t.desc.byte_offset = u64::MAX - b.u8() as u64;
        } else if b.rare(96) && numel > 0 {
            // Past the top of the user address space, without any overflow.
            t.desc.byte_offset = 1u64 << (47 + b.below(17));
        }
        t.desc.data = if t.buf.is_empty() || b.rare(48) {
            std::ptr::null_mut()
        } else {
            t.buf.as_mut_ptr() as *mut _
        };
        t.desc.shape = t.shape.as_mut_ptr();
        t.desc.strides = t
            .strides
            .as_mut()
            .map_or(std::ptr::null_mut(), |s| s.as_mut_ptr());
        Some(t)
    }

    /// A second descriptor of `owner`'s view (same memory, shape, strides and dtype), for a
    /// call that passes one buffer twice.
    pub fn alias_of(owner: &FTensor, output: bool) -> FTensor {
        let mut t = FTensor {
            buf: Vec::new(),
            shape: owner.shape.clone(),
            strides: owner.strides.clone(),
            desc: DLTensor { ..owner.desc },
            elems: owner.elems.clone(),
            elem_size: owner.elem_size,
            output,
            origin: owner.origin,
            alias: true,
        };
        t.desc.shape = t.shape.as_mut_ptr();
        t.desc.strides = t
            .strides
            .as_mut()
            .map_or(std::ptr::null_mut(), |s| s.as_mut_ptr());
        t
    }

    pub fn ptr(&self) -> *const DLTensor {
        &self.desc
    }
    pub fn mptr(&mut self) -> *mut DLTensor {
        &mut self.desc
    }
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
    fn dtype(&self) -> (u8, u8) {
        (self.desc.dtype.code, self.desc.dtype.bits)
    }
    /// The view's values (row-major), as the library would read them.
    pub fn values(&self) -> Vec<f64> {
        self.elems
            .iter()
            .map(|&at| load(&self.buf, at, self.dtype()).unwrap_or(f64::NAN))
            .collect()
    }
    /// Overwrites the view's element `k` (a valid host tensor only).
    pub fn set(&mut self, k: usize, v: f64) {
        if let Some(&at) = self.elems.get(k) {
            let dt = self.dtype();
            store(&mut self.buf, at, dt, v);
        }
    }
    /// A one-line description (for reproducing a finding).
    pub fn describe(&self) -> String {
        format!(
            "dtype {:?} device {} shape {:?} strides {:?} offset {} data {} values {}",
            self.desc.dtype,
            self.desc.device.device_type,
            self.shape,
            self.strides,
            self.desc.byte_offset,
            if self.desc.data.is_null() {
                "NULL"
            } else {
                "set"
            },
            // An alias holds no bytes of its own (see `alias_of`).
            if self.alias {
                "(those of the tensor it aliases)".to_string()
            } else {
                format!("{:?}", self.values())
            }
        )
    }
    pub fn numel(&self) -> usize {
        self.elems.len()
    }
}

fn huge_offset(b: &mut Bytes) -> bool {
    b.rare(96)
}

/// An optional tensor: absent (NULL) or built.
pub fn optional(b: &mut Bytes, want: &Want, allow_cuda: bool) -> Option<Option<FTensor>> {
    if b.rare(3) {
        Some(None)
    } else {
        FTensor::build(b, want, allow_cuda).map(Some)
    }
}

pub fn ptr_of(t: &Option<FTensor>) -> *const DLTensor {
    t.as_ref().map_or(std::ptr::null(), |t| t.ptr())
}
pub fn mptr_of(t: &mut Option<FTensor>) -> *mut DLTensor {
    t.as_mut().map_or(std::ptr::null_mut(), |t| t.mptr())
}

/// The `[n]` outputs of a forward: log-probs, entropy (optional), lse.
pub fn row_outputs(b: &mut Bytes, n: usize) -> Option<(FTensor, Option<FTensor>, FTensor)> {
    let want = Want::output(&FLOATS, &[n]);
    let lp = FTensor::build(b, &want, true)?;
    let ent = optional(b, &want, true)?;
    let lse = FTensor::build(b, &want, true)?;
    Some((lp, ent, lse))
}

/// The bytes of every tensor of a call, before it.
pub fn snapshot(tensors: &[Option<&FTensor>]) -> Vec<Option<Vec<u8>>> {
    tensors.iter().map(|t| t.map(|t| t.buf.clone())).collect()
}

pub fn last_error() -> String {
    unsafe { CStr::from_ptr(calibrl::ffi::common::calibrl_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// Checks the invariants of one call over its tensors (`before` from [`snapshot`] of the same
/// list). `in_place`: index of an input that is also written (in-place backward).
pub fn check(
    what: &str,
    status: i32,
    tensors: &[Option<&FTensor>],
    before: &[Option<Vec<u8>>],
    in_place: Option<usize>,
) {
    let msg = last_error();
    if std::env::var_os("CALIBRL_FUZZ_DEBUG").is_some() {
        eprintln!("{what}: status {status} {msg}");
        for (i, t) in tensors.iter().enumerate() {
            if let Some(t) = t {
                eprintln!("  tensor {i}: {}", t.describe());
            }
        }
    }
    assert!(
        (OK..=LAST_STATUS).contains(&status),
        "{what}: unknown status {status} ({msg})"
    );
    assert_ne!(status, PANIC, "{what}: PANIC: {msg}");
    if status != OK {
        assert!(!msg.is_empty(), "{what}: status {status} without a message");
        for (i, (t, b)) in tensors.iter().zip(before).enumerate() {
            if let (Some(t), Some(b)) = (t, b) {
                assert!(
                    &t.buf == b,
                    "{what}: status {status} ({msg}) but tensor {i} was written"
                );
            }
        }
        return;
    }
    assert!(msg.is_empty(), "{what}: OK with a message {msg:?}");
    no_output_shares_memory(what, tensors, in_place);
    for (i, (t, b)) in tensors.iter().zip(before).enumerate() {
        let (Some(t), Some(b)) = (t, b) else { continue };
        if t.alias {
            continue; // its memory is its owner's, checked there
        }
        if !t.output && in_place != Some(i) {
            assert!(&t.buf == b, "{what}: input tensor {i} was modified");
            continue;
        }
        // Output: a float dtype, bytes outside the view untouched, values inside finite.
        assert!(
            t.elems.is_empty() || FLOATS.contains(&t.dtype()),
            "{what}: OK with a non-float output {i} ({:?})",
            t.dtype()
        );
        let mut inside = vec![false; t.buf.len()];
        for &at in &t.elems {
            for x in &mut inside[at..at + t.elem_size] {
                *x = true;
            }
        }
        for (k, (&now, &was)) in t.buf.iter().zip(b).enumerate() {
            assert!(
                inside[k] || now == was,
                "{what}: output {i} written outside its view at byte {k}"
            );
        }
        for (k, v) in t.values().iter().enumerate() {
            assert!(
                v.is_finite(),
                "{what}: OK but output {i} element {k} is {v}"
            );
        }
    }
}

/// Enumerated configuration keys and their values (one invalid value each).
const ENUM_KEYS: [(&str, &[&str]); 8] = [
    ("preset", &["paper", "reference", "grpo", "authors", "nope"]),
    ("loss", &["calibrl", "grpo", "luffy", "rlplus", "x"]),
    ("delta_mode", &["sequence", "token_aligned", "y"]),
    (
        "activation",
        &["leaky_relu", "relu", "tanh", "sigmoid", "huber", "z"],
    ),
    ("baseline", &["expert", "ref_policy", "w"]),
    (
        "agg",
        &[
            "token-mean",
            "seq-mean-token-sum",
            "seq-mean-token-mean",
            "seq-mean-token-sum-norm",
            "token-sum",
            "v",
        ],
    ),
    (
        "kl_kind",
        &["k1", "abs", "k2", "k3", "mse", "low_var_kl", "u"],
    ),
    (
        "entropy_control",
        &["none", "clip_cov", "kl_cov", "clipcov"],
    ),
];
const BOOL_KEYS: [&str; 4] = [
    "length_normalize",
    "rarity_weighting",
    "norm_by_std",
    "authors_arithmetic",
];
/// Numeric keys with values that make sense for them (drawn half the time; any float else).
const NUMBER_KEYS: [(&str, &[f64]); 19] = [
    ("alpha", &[0.0, 0.2, 0.5, 1.0]),
    ("lambda", &[0.0, 0.1, 0.3, 1.0]),
    ("clip_low", &[0.0, 0.2, 0.28]),
    ("clip_high", &[0.2, 0.28, 1.0]),
    ("dual_clip", &[0.0, 1.0, 3.0]),
    ("t_norm", &[1.0, 8.0, 4096.0]),
    ("adv_eps", &[1e-6, 1e-3]),
    ("correct_threshold", &[0.0, 0.1, 0.5]),
    ("entropy_coef", &[0.0, 0.01, -0.01]),
    ("kl_coef", &[0.0, 0.1, 1e-3]),
    ("luffy_gamma", &[0.1, 1.0]),
    ("clip_cov_ratio", &[2e-4, 0.1, 0.5, 1.0]),
    ("clip_cov_lb", &[-5.0, 0.0, 1.0]),
    ("clip_cov_ub", &[0.5, 5.0, 50.0]),
    ("kl_cov_ratio", &[2e-3, 0.2, 1.0]),
    ("kl_cov_coef", &[0.0, 1.0, 5.0]),
    ("cov_adv_mean", &[0.0, 0.3, -1.0]),
    ("cov_logprob_mean", &[-1.0, -0.2, -1e5]),
    ("cov_token_count", &[0.0, 3.0, 40.0]),
];
/// Keys taking a non-negative integer.
const INTEGER_KEYS: [&str; 1] = ["cov_seed"];

/// Every key [`config_json`] produces (the `config` target checks that these cover every key
/// `calibrl_config_to_json` writes, so a key added to the library without the generator
/// fails the smoke run).
pub fn config_keys() -> Vec<&'static str> {
    let mut keys: Vec<&str> = ENUM_KEYS.iter().map(|(k, _)| *k).collect();
    keys.extend(BOOL_KEYS);
    keys.extend(NUMBER_KEYS.iter().map(|(k, _)| *k));
    keys.extend(INTEGER_KEYS);
    keys
}

fn json_number(b: &mut Bytes, sane: &[f64]) -> String {
    let v = if b.rare(2) {
        sane[b.below(sane.len())]
    } else {
        b.float()
    };
    if v.is_finite() {
        format!("{v:e}")
    } else {
        ["1e999", "null", "NaN", "-Infinity"][b.below(4)].into()
    }
}

/// After a call that returned OK: no output element shares a byte with another element of
/// it, with another output or with an input (`in_place` is the one tensor both read and
/// written). A sweep over every element's byte range, sorted by start.
fn no_output_shares_memory(what: &str, tensors: &[Option<&FTensor>], in_place: Option<usize>) {
    let writes = |i: usize| tensors[i].is_some_and(|t| t.output) || in_place == Some(i);
    let mut spans: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let Some(t) = t else { continue };
        if t.desc.data.is_null() {
            continue;
        }
        for (k, &at) in t.elems.iter().enumerate() {
            let a = t.origin + at;
            spans.push((a, a + t.elem_size, i, k));
        }
    }
    if !(0..tensors.len()).any(writes) {
        return;
    }
    spans.sort_unstable();
    let mut active: Vec<(usize, usize, usize, usize)> = Vec::new();
    for s in spans {
        active.retain(|a| a.1 > s.0);
        for a in &active {
            assert!(
                !(writes(a.2) || writes(s.2)),
                "{what}: OK, but element {} of tensor {} and element {} of tensor {} share \
                 memory (one is an output)",
                a.3,
                a.2,
                s.3,
                s.2
            );
        }
        active.push(s);
    }
}

/// A configuration JSON drawn from the bytes: every known key with valid or invalid values,
/// the global covariance means as a group, and now and then an unknown or very long key, a key
/// given twice, a value that is no JSON, or malformed text.
pub fn config_json(b: &mut Bytes) -> String {
    let mut parts = Vec::new();
    for _ in 0..b.below(8) {
        match b.u8() % 6 {
            0 => {
                let (k, vals) = ENUM_KEYS[b.below(ENUM_KEYS.len())];
                parts.push(format!(r#""{k}":"{}""#, vals[b.below(vals.len())]));
            }
            1 => {
                let k = BOOL_KEYS[b.below(BOOL_KEYS.len())];
                parts.push(format!(r#""{k}":{}"#, b.rare(2)));
            }
            2 => {
                // The global covariance means go together (a lone one is an error).
                for k in ["cov_adv_mean", "cov_logprob_mean", "cov_token_count"] {
                    if !b.rare(16) {
                        let sane = NUMBER_KEYS.iter().find(|(n, _)| *n == k).unwrap().1;
                        parts.push(format!(r#""{k}":{}"#, json_number(b, sane)));
                    }
                }
            }
            3 => {
                let k = INTEGER_KEYS[b.below(INTEGER_KEYS.len())];
                let v = match b.u8() % 4 {
                    0 => format!("{}", b.u64()),
                    1 => format!("-{}", b.u8()),
                    2 => "0.5".into(),
                    _ => format!("{}", b.u8()),
                };
                parts.push(format!(r#""{k}":{v}"#));
            }
            4 if b.rare(4) => {
                // An unknown key: short (a typo), or long (bounded cost, short message).
                let key = if b.rare(2) {
                    "lamda".to_string()
                } else {
                    "k".repeat(1 + b.below(1 << 14))
                };
                parts.push(format!(r#""{key}":1"#));
            }
            4 if !parts.is_empty() => {
                // A key given twice.
                let again = parts[b.below(parts.len())].clone();
                parts.push(again);
            }
            _ => {
                let (k, sane) = NUMBER_KEYS[b.below(NUMBER_KEYS.len())];
                parts.push(format!(r#""{k}":{}"#, json_number(b, sane)));
            }
        }
    }
    let mut json = format!("{{{}}}", parts.join(","));
    if b.rare(32) {
        json.truncate(b.below(json.len() + 1));
    }
    json
}

/// A configuration handle (freed on drop); `None` when the JSON was refused.
pub struct Config(pub *mut calibrl::ffi::common::CalibrlConfig);

impl Config {
    pub fn new(json: &str) -> (i32, Option<Config>) {
        let c = std::ffi::CString::new(json.replace('\0', " ")).unwrap();
        let mut out = std::ptr::null_mut();
        let st = unsafe { calibrl::ffi::common::calibrl_config_new(c.as_ptr(), &mut out) } as i32;
        assert!(
            (OK..=LAST_STATUS).contains(&st) && st != PANIC,
            "config_new: {st}"
        );
        if st == OK {
            assert!(!out.is_null());
            (st, Some(Config(out)))
        } else {
            assert!(out.is_null(), "config_new wrote `out` on error");
            (st, None)
        }
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        unsafe { calibrl::ffi::common::calibrl_config_free(self.0) }
    }
}
