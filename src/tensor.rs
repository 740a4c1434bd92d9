//! Borrowed DLPack tensors: the `DLTensor` descriptor every ABI call takes, and `Tensor`, a
//! validated view of one that knows its argument name (so every error can name it).
//!
//! The structs are layout-identical to DLPack's (`dlpack.h`, v0.6 through v1.x): a caller
//! that already has a `DLTensor` from PyTorch, JAX or CuPy passes it as is.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::ffi::c_void;

/// DLPack device: `device_type` 1 = CPU, 2 = CUDA, 3 = CUDA pinned host, 13 = CUDA managed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

/// DLPack dtype: `code` 0 = int, 1 = uint, 2 = float, 4 = bfloat, 6 = bool.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

/// DLPack tensor descriptor, borrowed for the duration of one call.
#[repr(C)]
#[derive(Debug)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    /// NULL means compact row-major.
    pub strides: *mut i64,
    pub byte_offset: u64,
}

/// The top of the user address space: no tensor's bytes may reach past it (a view there cannot
/// be valid memory, whatever its data pointer). Linux hands user space addresses below 2^47 on
/// x86-64 (also with 5-level paging, unless a program maps above it on purpose) and below 2^48
/// on AArch64 with its default 48-bit virtual addresses; other 64-bit targets get 2^48 too.
/// CUDA's unified addresses lie in the same range.
#[cfg(target_arch = "x86_64")]
pub(crate) const USER_ADDRESS_LIMIT: usize = 1 << 47;
#[cfg(all(target_pointer_width = "64", not(target_arch = "x86_64")))]
pub(crate) const USER_ADDRESS_LIMIT: usize = 1 << 48;
#[cfg(not(target_pointer_width = "64"))]
pub(crate) const USER_ADDRESS_LIMIT: usize = usize::MAX;

pub const DL_CPU: i32 = 1;
pub const DL_CUDA: i32 = 2;
pub const DL_CUDA_HOST: i32 = 3;
pub const DL_CUDA_MANAGED: i32 = 13;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
    I32,
    I64,
    U8,
    I8,
    Bool,
}

impl DType {
    fn from_dl(dt: DLDataType) -> Option<DType> {
        if dt.lanes != 1 {
            return None;
        }
        Some(match (dt.code, dt.bits) {
            (2, 16) => DType::F16,
            (4, 16) => DType::BF16,
            (2, 32) => DType::F32,
            (2, 64) => DType::F64,
            (0, 32) => DType::I32,
            (0, 64) => DType::I64,
            (0, 8) => DType::I8,
            (1, 8) => DType::U8,
            (6, 8) => DType::Bool,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::U8 | DType::I8 | DType::Bool => 1,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::I64)
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::Bool => "bool",
        }
    }
}

/// Where a tensor's memory lives, as far as the backends care.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory the CPU can read (plain CPU, CUDA pinned host).
    Cpu,
    /// CUDA device memory of the given ordinal (managed memory counts as device memory).
    Cuda(i32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A validated, borrowed view of a `DLTensor`.
#[derive(Clone, Debug)]
pub struct Tensor<'a> {
    pub name: &'static str,
    /// Data pointer with `byte_offset` already applied.
    pub ptr: *mut u8,
    pub dtype: DType,
    pub device: Device,
    pub shape: Vec<usize>,
    /// Strides in elements (always filled in, compact row-major when the descriptor had none).
    pub strides: Vec<isize>,
    _borrow: std::marker::PhantomData<&'a DLTensor>,
}

// A `Tensor` is a borrowed view used within one call; the CPU backend splits the rows of a call
// across scoped threads that each touch disjoint elements.
unsafe impl Send for Tensor<'_> {}
unsafe impl Sync for Tensor<'_> {}

impl<'a> Tensor<'a> {
    /// Validates a descriptor pointer: non-NULL, known dtype and device, sane shape.
    ///
    /// # Safety
    /// `raw` must be NULL or point to a `DLTensor` whose `shape` (and `strides`, when non-NULL)
    /// arrays hold `ndim` elements, valid for `'a`.
    pub unsafe fn from_raw(raw: *const DLTensor, name: &'static str) -> Result<Tensor<'a>> {
        let t = raw.as_ref().ok_or_else(|| Error::null(name))?;
        let dtype = DType::from_dl(t.dtype).ok_or_else(|| {
            Error::dtype(
                name,
                format!(
                    "unsupported DLPack dtype (code {}, bits {}, lanes {})",
                    t.dtype.code, t.dtype.bits, t.dtype.lanes
                ),
            )
        })?;
        let device = match t.device.device_type {
            DL_CPU | DL_CUDA_HOST => Device::Cpu,
            DL_CUDA | DL_CUDA_MANAGED => Device::Cuda(t.device.device_id),
            other => {
                return Err(Error::device(
                    name,
                    format!("unsupported DLPack device type {other} (expected CPU=1 or CUDA=2)"),
                ))
            }
        };
        if !(0..=8).contains(&t.ndim) {
            return Err(Error::shape(
                name,
                format!("ndim {} is out of range 0..=8", t.ndim),
            ));
        }
        let ndim = t.ndim as usize;
        if ndim > 0 && t.shape.is_null() {
            return Err(Error::null(name).with_suffix(".shape"));
        }
        let mut shape = Vec::with_capacity(ndim);
        for d in 0..ndim {
            let e = *t.shape.add(d);
            if e < 0 {
                return Err(Error::shape(
                    name,
                    format!("dimension {d} is negative ({e})"),
                ));
            }
            shape.push(e as usize);
        }
        let compact = checked_compact_strides(&shape).ok_or_else(|| too_large(name, &shape))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &e| acc.checked_mul(e))
            .ok_or_else(|| too_large(name, &shape))?;
        // A tensor without elements has no layout to respect: its strides (NumPy reports
        // (0, 0) for a (0, 5) array) are ignored and it counts as contiguous.
        let strides = if t.strides.is_null() || numel == 0 {
            compact
        } else {
            (0..ndim).map(|d| *t.strides.add(d) as isize).collect()
        };
        // The byte extent of every element the view can reach: it must fit in the address
        // space (an `isize`, as for any Rust object) before anything is read or allocated.
        let (lo, hi) =
            element_reach(&shape, &strides, dtype.size()).ok_or_else(|| too_large(name, &shape))?;
        if numel == 0 {
            // Never dereferenced: any data pointer (NULL included) is acceptable.
            return Ok(Tensor {
                name,
                ptr: (t.data as *mut u8).wrapping_add(t.byte_offset as usize),
                dtype,
                device,
                shape,
                strides,
                _borrow: std::marker::PhantomData,
            });
        }
        if t.data.is_null() {
            return Err(Error::null(name).with_suffix(".data"));
        }
        // Beyond overflow: every byte the view reaches must lie below the top of the user
        // address space (`USER_ADDRESS_LIMIT`), or dereferencing it would fault.
        let base = usize::try_from(t.byte_offset)
            .ok()
            .and_then(|off| (t.data as usize).checked_add(off))
            .filter(|&b| {
                b.checked_sub(lo).is_some()
                    && b.checked_add(hi)
                        .is_some_and(|end| end <= USER_ADDRESS_LIMIT)
            })
            .ok_or_else(|| {
                Error::invalid(
                    name,
                    format!(
                        "byte_offset {} puts the tensor outside the address space (data {:#x}; \
                         its bytes must end below {USER_ADDRESS_LIMIT:#x})",
                        t.byte_offset, t.data as usize
                    ),
                )
            })?;
        if base % dtype.size() != 0 {
            return Err(Error::layout(
                name,
                format!(
                    "data + byte_offset ({:#x} + {}) is not aligned to its {}-byte {} elements",
                    t.data as usize,
                    t.byte_offset,
                    dtype.size(),
                    dtype.name()
                ),
            ));
        }
        let ptr = (t.data as *mut u8).wrapping_add(t.byte_offset as usize);
        Ok(Tensor {
            name,
            ptr,
            dtype,
            device,
            shape,
            strides,
            _borrow: std::marker::PhantomData,
        })
    }

    /// Like `from_raw`, but NULL gives `None`.
    ///
    /// # Safety
    /// As `from_raw`.
    pub unsafe fn optional(raw: *const DLTensor, name: &'static str) -> Result<Option<Tensor<'a>>> {
        if raw.is_null() {
            Ok(None)
        } else {
            Tensor::from_raw(raw, name).map(Some)
        }
    }

    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_contiguous(&self) -> bool {
        self.strides == compact_strides(&self.shape)
            || self.shape.iter().filter(|&&e| e != 1).count() <= 1 && self.inner_dense()
    }
    fn inner_dense(&self) -> bool {
        // A tensor with at most one non-trivial dimension is contiguous when that dimension has
        // stride 1 (strides of size-1 dimensions do not matter).
        self.shape
            .iter()
            .zip(&self.strides)
            .all(|(&e, &s)| e <= 1 || s == 1)
    }

    pub fn require_contiguous(&self) -> Result<()> {
        if self.is_contiguous() {
            Ok(())
        } else {
            Err(Error::layout(
                self.name,
                format!(
                    "must be contiguous (row-major), got shape {:?} strides {:?}",
                    self.shape, self.strides
                ),
            ))
        }
    }

    pub fn require_dtype(&self, allowed: &[DType]) -> Result<()> {
        if allowed.contains(&self.dtype) {
            Ok(())
        } else {
            let names: Vec<_> = allowed.iter().map(|d| d.name()).collect();
            Err(Error::dtype(
                self.name,
                format!(
                    "dtype {} is not accepted (expected one of {})",
                    self.dtype.name(),
                    names.join(", ")
                ),
            ))
        }
    }

    pub fn require_float(&self) -> Result<()> {
        self.require_dtype(&[DType::F32, DType::F64, DType::BF16, DType::F16])
    }

    pub fn require_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape == expected {
            Ok(())
        } else {
            Err(Error::shape(
                self.name,
                format!("expected shape {:?}, got {:?}", expected, self.shape),
            ))
        }
    }

    pub fn require_ndim(&self, ndim: usize) -> Result<()> {
        if self.ndim() == ndim {
            Ok(())
        } else {
            Err(Error::shape(
                self.name,
                format!(
                    "expected {ndim}-D, got {}-D shape {:?}",
                    self.ndim(),
                    self.shape
                ),
            ))
        }
    }

    pub fn require_device(&self, device: Device) -> Result<()> {
        if self.device == device {
            Ok(())
        } else {
            Err(Error::device(
                self.name,
                format!(
                    "is on {}, but the call's tensors are on {}",
                    self.device, device
                ),
            ))
        }
    }

    /// Element offset (in elements, may be negative for negative strides) of a flat row-major
    /// index.
    fn offset_of(&self, mut flat: usize) -> isize {
        let mut off = 0isize;
        for d in (0..self.ndim()).rev() {
            let e = self.shape[d].max(1);
            off += (flat % e) as isize * self.strides[d];
            flat /= e;
        }
        off
    }

    fn require_host(&self) -> Result<()> {
        if self.device == Device::Cpu {
            Ok(())
        } else {
            Err(Error::device(
                self.name,
                format!("is on {}, expected host memory", self.device),
            ))
        }
    }

    /// Reads every element (row-major order) as f64. Host tensors only.
    pub fn read_f64(&self) -> Result<Vec<f64>> {
        self.require_host()?;
        let n = self.numel();
        let mut out = Vec::new();
        if n == 0 {
            return Ok(out); // an empty tensor's data pointer may be NULL: never touched
        }
        out.try_reserve_exact(n).map_err(|_| {
            Error::invalid(
                self.name,
                format!("{n} elements cannot be read into memory"),
            )
        })?;
        let contiguous = self.is_contiguous();
        unsafe {
            macro_rules! read {
                ($t:ty, $conv:expr) => {{
                    let base = self.ptr as *const $t;
                    if contiguous {
                        let s = std::slice::from_raw_parts(base, n);
                        out.extend(s.iter().map(|&v| $conv(v)));
                    } else {
                        for i in 0..n {
                            out.push($conv(*base.offset(self.offset_of(i))));
                        }
                    }
                }};
            }
            match self.dtype {
                DType::F16 => read!(f16, |v: f16| v.to_f64()),
                DType::BF16 => read!(bf16, |v: bf16| v.to_f64()),
                DType::F32 => read!(f32, |v: f32| v as f64),
                DType::F64 => read!(f64, |v: f64| v),
                DType::I32 => read!(i32, |v: i32| v as f64),
                DType::I64 => read!(i64, |v: i64| v as f64),
                DType::U8 | DType::Bool => read!(u8, |v: u8| v as f64),
                DType::I8 => read!(i8, |v: i8| v as f64),
            }
        }
        Ok(out)
    }

    /// Reads a float tensor and rejects NaN or infinity, naming the first bad element.
    pub fn read_finite_f64(&self) -> Result<Vec<f64>> {
        let v = self.read_f64()?;
        if let Some((i, &x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(Error::non_finite(self.name, i, x));
        }
        Ok(v)
    }

    /// Reads an integer tensor (int32 / int64) as i64. Host tensors only.
    pub fn read_i64(&self) -> Result<Vec<i64>> {
        self.require_dtype(&[DType::I32, DType::I64])?;
        self.require_host()?;
        let n = self.numel();
        let mut out = Vec::new();
        out.try_reserve_exact(n).map_err(|_| {
            Error::invalid(
                self.name,
                format!("{n} elements cannot be read into memory"),
            )
        })?;
        unsafe {
            for i in 0..n {
                let off = self.offset_of(i);
                out.push(match self.dtype {
                    DType::I32 => *(self.ptr as *const i32).offset(off) as i64,
                    _ => *(self.ptr as *const i64).offset(off),
                });
            }
        }
        Ok(out)
    }

    /// Reads a boolean-like tensor (bool, uint8, int8, int32, int64): non-zero is true.
    pub fn read_bool(&self) -> Result<Vec<bool>> {
        self.require_dtype(&[DType::Bool, DType::U8, DType::I8, DType::I32, DType::I64])?;
        let values = self.read_f64()?;
        let mut out = Vec::new();
        out.try_reserve_exact(values.len())
            .map_err(|_| out_of_memory(self.name, values.len(), 1))?;
        out.extend(values.into_iter().map(|v| v != 0.0));
        Ok(out)
    }

    /// Writes `values` (row-major order) converting to the tensor's float dtype. Host only.
    /// Callers validate everything first: this is the last step of an operation.
    pub fn write_f64(&self, values: &[f64]) -> Result<()> {
        self.require_host()?;
        if values.len() != self.numel() {
            return Err(Error::shape(
                self.name,
                format!(
                    "has {} elements, {} values to write",
                    self.numel(),
                    values.len()
                ),
            ));
        }
        if values.is_empty() {
            return Ok(()); // an empty tensor's data pointer may be NULL: never touched
        }
        let contiguous = self.is_contiguous();
        unsafe {
            macro_rules! write {
                ($t:ty, $conv:expr) => {{
                    let base = self.ptr as *mut $t;
                    if contiguous {
                        let s = std::slice::from_raw_parts_mut(base, values.len());
                        for (d, &v) in s.iter_mut().zip(values) {
                            *d = $conv(v);
                        }
                    } else {
                        for (i, &v) in values.iter().enumerate() {
                            *base.offset(self.offset_of(i)) = $conv(v);
                        }
                    }
                }};
            }
            match self.dtype {
                DType::F16 => write!(f16, f16::from_f64),
                DType::BF16 => write!(bf16, bf16::from_f64),
                DType::F32 => write!(f32, |v: f64| v as f32),
                DType::F64 => write!(f64, |v: f64| v),
                other => {
                    return Err(Error::dtype(
                        self.name,
                        format!("output dtype {} is not a float dtype", other.name()),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Fails unless every value is finite and stays finite in this tensor's dtype (so that a
    /// call returning OK never writes NaN or infinity, and an overflow writes nothing).
    pub fn require_representable(&self, values: &[f64]) -> Result<()> {
        // Values a hair past MAX still round to MAX; anything well beyond is infinite.
        let limit = match self.dtype {
            DType::F16 => f16::MAX.to_f64() * (1.0 + f64::EPSILON),
            DType::BF16 => bf16::MAX.to_f64() * (1.0 + f64::EPSILON),
            DType::F32 => f32::MAX as f64 * (1.0 + f64::EPSILON),
            _ => f64::MAX,
        };
        match values.iter().position(|v| !v.is_finite() || v.abs() > limit) {
            None => Ok(()),
            Some(i) => Err(Error::new(
                crate::error::CalibrlStatus::NonFinite,
                format!(
                    "`{}`: result element {i} is {}, which is not a finite {} (inputs out of range)",
                    self.name,
                    values[i],
                    self.dtype.name()
                ),
            )),
        }
    }

    /// Byte range `[start, end)` this tensor's elements can touch (for aliasing checks).
    pub fn byte_span(&self) -> (usize, usize) {
        if self.numel() == 0 {
            return (self.ptr as usize, self.ptr as usize);
        }
        let mut lo = 0isize;
        let mut hi = 0isize;
        for (&e, &s) in self.shape.iter().zip(&self.strides) {
            let reach = (e as isize - 1) * s;
            if reach < 0 {
                lo += reach
            } else {
                hi += reach
            }
        }
        let sz = self.dtype.size() as isize;
        let base = self.ptr as isize;
        ((base + lo * sz) as usize, (base + (hi + 1) * sz) as usize)
    }

    /// True when the two tensors may share a byte: exact when their byte ranges are disjoint
    /// or when both step through memory with one common stride (interleaved columns of one
    /// buffer do not overlap); otherwise any intersection of the byte ranges counts.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        let (a0, a1) = self.byte_span();
        let (b0, b1) = other.byte_span();
        if self.numel() == 0 || other.numel() == 0 || !(a0 < b1 && b0 < a1) {
            return false;
        }
        match (self.byte_step(), other.byte_step()) {
            (Some(s), Some(t)) if s == t && s >= self.dtype.size().max(other.dtype.size()) => {
                // Element i of each occupies [base + i·s, base + i·s + size): offsets modulo s.
                let d = (self.ptr as usize).abs_diff(other.ptr as usize) % s;
                let (first, second) = if (other.ptr as usize) >= (self.ptr as usize) {
                    (self.dtype.size(), other.dtype.size())
                } else {
                    (other.dtype.size(), self.dtype.size())
                };
                d < first || d + second > s
            }
            _ => true,
        }
    }

    /// The byte distance between consecutive elements when the view has at most one dimension
    /// of extent > 1 (`None` otherwise; the element size for a single element).
    fn byte_step(&self) -> Option<usize> {
        let mut dims = self.shape.iter().zip(&self.strides).filter(|(&e, _)| e > 1);
        match (dims.next(), dims.next()) {
            (None, _) => Some(self.dtype.size()),
            (Some((_, &s)), None) => Some(s.unsigned_abs() * self.dtype.size()),
            _ => None,
        }
    }

    /// True when two different elements of the view share memory (a stride of 0 along a
    /// dimension of extent > 1, or dimensions that interleave). Conservative: a layout is
    /// accepted when, with its dimensions ordered by stride, each stride steps past everything
    /// the smaller ones reach.
    pub fn self_overlaps(&self) -> bool {
        let mut dims: Vec<(usize, usize)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(&e, _)| e > 1)
            .map(|(&e, &s)| (s.unsigned_abs(), e))
            .collect();
        dims.sort_unstable();
        // Elements reached by the dimensions so far (validated to fit by `from_raw`).
        let mut reach = 1usize;
        for (s, e) in dims {
            if s < reach {
                return true;
            }
            reach += s * (e - 1);
        }
        false
    }
}

/// Rejects outputs that share memory with themselves, with each other or with an input: a
/// call writes every output element once, from inputs it has finished reading. (In-place
/// pairs an operation documents are left out of `inputs` by its caller.)
pub fn require_disjoint(outputs: &[Option<&Tensor>], inputs: &[Option<&Tensor>]) -> Result<()> {
    let outputs: Vec<&Tensor> = outputs.iter().flatten().copied().collect();
    for (i, o) in outputs.iter().enumerate() {
        if o.self_overlaps() {
            return Err(Error::invalid(
                o.name,
                format!(
                    "its elements share memory (shape {:?}, strides {:?}): every output element \
                     needs its own memory",
                    o.shape, o.strides
                ),
            ));
        }
        let others = outputs[..i].iter().map(|t| (*t, "output"));
        let ins = inputs.iter().flatten().map(|t| (*t, "input"));
        if let Some((t, what)) = others.chain(ins).find(|(t, _)| o.overlaps(t)) {
            return Err(Error::invalid(
                o.name,
                format!(
                    "shares memory with the {what} `{}`: outputs must not overlap each other or \
                     an input",
                    t.name
                ),
            ));
        }
    }
    Ok(())
}

impl Error {
    fn with_suffix(mut self, suffix: &str) -> Self {
        // `name` is NULL -> `name.data` is NULL
        self.message = self
            .message
            .replacen("` is NULL", &format!("{suffix}` is NULL"), 1);
        self
    }
}

/// Row-major strides of a validated shape (`Tensor::from_raw` checked that they fit).
pub fn compact_strides(shape: &[usize]) -> Vec<isize> {
    checked_compact_strides(shape).expect("shape validated by Tensor::from_raw")
}

/// Row-major strides, or `None` when the product of the extents overflows an `isize`.
fn checked_compact_strides(shape: &[usize]) -> Option<Vec<isize>> {
    let mut strides = vec![0isize; shape.len()];
    let mut acc = 1isize;
    for d in (0..shape.len()).rev() {
        strides[d] = acc;
        acc = acc.checked_mul(isize::try_from(shape[d].max(1)).ok()?)?;
    }
    Some(strides)
}

/// Bytes below and above the base pointer (the latter through the end of the last element)
/// that a view may touch, or `None` when they do not fit in an `isize`.
fn element_reach(shape: &[usize], strides: &[isize], elem: usize) -> Option<(usize, usize)> {
    if shape.contains(&0) {
        return Some((0, 0));
    }
    let (mut lo, mut hi) = (0usize, 0usize);
    for (&e, &s) in shape.iter().zip(strides) {
        let reach = (e - 1).checked_mul(s.unsigned_abs())?;
        if s < 0 {
            lo = lo.checked_add(reach)?;
        } else {
            hi = hi.checked_add(reach)?;
        }
    }
    let lo = lo.checked_mul(elem)?;
    let hi = hi.checked_add(1)?.checked_mul(elem)?;
    (lo <= isize::MAX as usize && hi <= isize::MAX as usize).then_some((lo, hi))
}

fn too_large(name: &str, shape: &[usize]) -> Error {
    Error::shape(
        name,
        format!("shape {shape:?} is too large: its extent does not fit in the address space"),
    )
}

/// The error when `n` elements of `size` bytes of working memory cannot be allocated.
pub fn out_of_memory(name: &str, n: usize, size: usize) -> Error {
    Error::invalid(
        name,
        format!(
            "out of memory: needs {n} elements ({} bytes) of working memory, which could not be \
             allocated",
            n.saturating_mul(size)
        ),
    )
}

/// A zero-filled vector of `n` values, or an error naming `name` when the memory cannot be
/// had (an error status, never an abort).
pub fn try_vec<T: Clone>(n: usize, value: T, name: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| out_of_memory(name, n, std::mem::size_of::<T>()))?;
    v.resize(n, value);
    Ok(v)
}

/// Collects `items` (of known length) into a vector whose memory is requested fallibly: an
/// error naming `name` when it cannot be had, never an abort.
pub fn try_collect<T>(items: impl ExactSizeIterator<Item = T>, name: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    let n = items.len();
    v.try_reserve_exact(n)
        .map_err(|_| out_of_memory(name, n, std::mem::size_of::<T>()))?;
    v.extend(items);
    Ok(v)
}

/// Writes several outputs of one call: all of them, or (when any value is not finite in its
/// tensor's dtype) none.
pub fn write_all(outputs: &[(Option<&Tensor>, &[f64])]) -> Result<()> {
    for (t, values) in outputs {
        if let Some(t) = t {
            t.require_representable(values)?;
        }
    }
    for (t, values) in outputs {
        if let Some(t) = t {
            t.write_f64(values)?;
        }
    }
    Ok(())
}

/// The single device of a call: every given tensor must be on it.
pub fn common_device(tensors: &[Option<&Tensor>]) -> Result<Device> {
    let mut first: Option<&Tensor> = None;
    for t in tensors.iter().flatten() {
        match first {
            None => first = Some(t),
            Some(f) if f.device != t.device => {
                return Err(Error::device(
                    t.name,
                    format!("is on {}, but `{}` is on {}", t.device, f.name, f.device),
                ))
            }
            _ => {}
        }
    }
    Ok(first.map(|t| t.device).unwrap_or(Device::Cpu))
}

/// Owned host tensor helper for Rust callers and tests: builds a `DLTensor` over a slice.
pub struct HostTensor {
    pub shape: Vec<i64>,
    pub desc: DLTensor,
}

impl HostTensor {
    fn new(data: *mut c_void, dtype: DLDataType, shape: &[usize]) -> Box<HostTensor> {
        let mut b = Box::new(HostTensor {
            shape: shape.iter().map(|&s| s as i64).collect(),
            desc: DLTensor {
                data,
                device: DLDevice {
                    device_type: DL_CPU,
                    device_id: 0,
                },
                ndim: shape.len() as i32,
                dtype,
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
        });
        b.desc.shape = b.shape.as_mut_ptr();
        b
    }
    /// A descriptor over `data` viewed with `shape`. The caller keeps `data` alive.
    pub fn f64(data: &mut [f64], shape: &[usize]) -> Box<HostTensor> {
        Self::new(
            data.as_mut_ptr() as _,
            DLDataType {
                code: 2,
                bits: 64,
                lanes: 1,
            },
            shape,
        )
    }
    pub fn f32(data: &mut [f32], shape: &[usize]) -> Box<HostTensor> {
        Self::new(
            data.as_mut_ptr() as _,
            DLDataType {
                code: 2,
                bits: 32,
                lanes: 1,
            },
            shape,
        )
    }
    pub fn bf16(data: &mut [bf16], shape: &[usize]) -> Box<HostTensor> {
        Self::new(
            data.as_mut_ptr() as _,
            DLDataType {
                code: 4,
                bits: 16,
                lanes: 1,
            },
            shape,
        )
    }
    pub fn f16(data: &mut [f16], shape: &[usize]) -> Box<HostTensor> {
        Self::new(
            data.as_mut_ptr() as _,
            DLDataType {
                code: 2,
                bits: 16,
                lanes: 1,
            },
            shape,
        )
    }
    pub fn i64(data: &mut [i64], shape: &[usize]) -> Box<HostTensor> {
        Self::new(
            data.as_mut_ptr() as _,
            DLDataType {
                code: 0,
                bits: 64,
                lanes: 1,
            },
            shape,
        )
    }
    pub fn i32(data: &mut [i32], shape: &[usize]) -> Box<HostTensor> {
        Self::new(
            data.as_mut_ptr() as _,
            DLDataType {
                code: 0,
                bits: 32,
                lanes: 1,
            },
            shape,
        )
    }
    pub fn u8(data: &mut [u8], shape: &[usize]) -> Box<HostTensor> {
        Self::new(
            data.as_mut_ptr() as _,
            DLDataType {
                code: 1,
                bits: 8,
                lanes: 1,
            },
            shape,
        )
    }
    pub fn as_ptr(&self) -> *const DLTensor {
        &self.desc
    }
    pub fn as_mut_ptr(&mut self) -> *mut DLTensor {
        &mut self.desc
    }
}
