//! Host tensors: reading any accepted dtype as f64 (or i64, bool) and writing f64 back in the
//! tensor's dtype, and `HostTensor`, a descriptor over a Rust slice.

use super::alloc::out_of_memory;
use super::dlpack::{DLDataType, DLDevice, DLTensor, DType, Device, DL_CPU};
use super::view::Tensor;
use crate::error::{Error, Result};
use half::{bf16, f16};
use std::ffi::c_void;

impl Tensor<'_> {
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
