//! `Tensor`: a validated, borrowed view of a `DLTensor` that knows its argument name, with
//! the checks operations make on shapes, dtypes, layouts and devices.

use super::dlpack::{
    DLTensor, DType, Device, DL_CPU, DL_CUDA, DL_CUDA_HOST, DL_CUDA_MANAGED, USER_ADDRESS_LIMIT,
};
use crate::error::{Error, Result};

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
    pub(super) fn offset_of(&self, mut flat: usize) -> isize {
        let mut off = 0isize;
        for d in (0..self.ndim()).rev() {
            let e = self.shape[d].max(1);
            off += (flat % e) as isize * self.strides[d];
            flat /= e;
        }
        off
    }
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
