//! Kernel arguments of the logits family: the dtype codes and pointers of the `[N]` tensors,
//! the kernel name's dtype suffix, and the layout checks the kernels rely on.

use crate::cuda::launch::Arg;
use crate::desc::logits::{Backward, LogitsInput};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// dtype codes of the `[N]` tensors (`CODE_*` in `cuda/logits.cu`).
pub(super) fn scalar_code(t: &Tensor) -> Result<i32> {
    match t.dtype {
        DType::F32 => Ok(0),
        DType::F64 => Ok(1),
        DType::BF16 => Ok(2),
        DType::F16 => Ok(3),
        other => Err(Error::dtype(
            t.name,
            format!("dtype {} is not a float dtype", other.name()),
        )),
    }
}

pub(super) fn optional_code(t: &Option<Tensor>) -> Result<i32> {
    t.as_ref().map(scalar_code).unwrap_or(Ok(0))
}

pub(super) fn ptr(t: &Tensor) -> Arg {
    Arg::Ptr(t.ptr as *const u8)
}

pub(super) fn optional_ptr(t: &Option<Tensor>) -> Arg {
    Arg::Ptr(
        t.as_ref()
            .map(|t| t.ptr as *const u8)
            .unwrap_or(std::ptr::null()),
    )
}

pub(super) fn labels_are_i64(input: &LogitsInput) -> Arg {
    Arg::I32((input.labels.dtype == DType::I64) as i32)
}

pub(super) fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

pub(super) fn require_element_aligned(t: &Tensor) -> Result<()> {
    if (t.ptr as usize) % t.dtype.size() != 0 {
        return Err(Error::layout(
            t.name,
            format!(
                "data pointer {:p} is not aligned to its {}-byte elements",
                t.ptr,
                t.dtype.size()
            ),
        ));
    }
    Ok(())
}

pub(super) fn i64_arg(name: &str, v: usize) -> Result<Arg> {
    i64::try_from(v)
        .map(Arg::I64)
        .map_err(|_| Error::shape(name, format!("extent {v} does not fit in int64")))
}

/// Row stride of `grad_logits` in elements (the logits' own in place).
pub(super) fn grad_row_stride(args: &Backward) -> Result<usize> {
    let input = &args.input;
    if args.in_place() || input.n <= 1 {
        return Ok(input.row_stride);
    }
    let s = args.grad_logits.strides[0];
    if s < input.v as isize {
        return Err(Error::layout(
            "grad_logits",
            format!(
                "row stride {s} is smaller than the vocabulary size {}",
                input.v
            ),
        ));
    }
    Ok(s as usize)
}
