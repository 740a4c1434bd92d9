//! The expert collection on CUDA (kernel `calibrl_collect_experts` in `cuda/loss.cu`): gathers
//! each selected expert's log-probs from the packed no-grad output into the packed expert
//! tensor and sums them, on the caller's stream.
//!
//! The per-slot source offsets come from the plan (host memory): they are copied into the
//! stream's workspace first, so this call is not meant for CUDA-graph capture. As elsewhere on
//! CUDA, values are not checked (a NaN log-prob propagates into its slot's sum).

use super::device::{device, driver_error};
use super::loss::LOSS;
use super::workspace::{launch_struct, workspace};
use crate::desc::expert::CollectExperts;
use crate::desc::Stream;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use cudarc::driver::{result as drv, sys};
use std::ffi::c_void;

/// Mirrors `ExpertParams` in cuda/loss.cu (every field 8 bytes wide).
#[repr(C)]
struct ExpertParams {
    nograd: *const c_void,
    nograd_dt: i64,
    expert_logprobs: *const c_void,
    expert_dt: i64,
    expert_sums: *const c_void,
    sums_dt: i64,
    source: sys::CUdeviceptr,
    offsets: sys::CUdeviceptr,
    slots: i64,
    length_normalize: i64,
}

fn code(t: &Tensor) -> Result<i64> {
    t.require_contiguous()?;
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

/// Gathers and sums on `stream`; the descriptor was validated by the caller.
pub fn collect_experts(args: &CollectExperts, ordinal: i32, stream: Stream) -> Result<()> {
    let (source, offsets) = (&args.source, &args.offsets);
    let slots = args.slots();
    let nograd_dt = code(&args.nograd_logprobs)?;
    let (ep, edt) = match &args.expert_logprobs {
        Some(t) => (t.ptr as *const c_void, code(t)?),
        None => (std::ptr::null(), 0),
    };
    let (sp, sdt) = match &args.expert_sums {
        Some(t) => (t.ptr as *const c_void, code(t)?),
        None => (std::ptr::null(), 0),
    };
    if slots == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let table: Vec<i64> = source.iter().chain(offsets).copied().collect();
    let ws = workspace(dev, ordinal, stream, table.len() * 8)?;
    {
        let _ctx = dev.activate()?;
        // SAFETY: `ws` holds at least `table.len()` i64s; the copy is ordered on `stream` before
        // the kernel that reads it, and `table` may be dropped once the call returns (the
        // driver stages pageable host memory before returning).
        unsafe { drv::memcpy_htod_async(ws, &table, stream as sys::CUstream) }
            .map_err(|e| driver_error("cuMemcpyHtoDAsync (expert offsets)", e))?;
    }
    let mut p = ExpertParams {
        nograd: args.nograd_logprobs.ptr as *const c_void,
        nograd_dt,
        expert_logprobs: ep,
        expert_dt: edt,
        expert_sums: sp,
        sums_dt: sdt,
        source: ws,
        offsets: ws + (slots * 8) as u64,
        slots: slots as i64,
        length_normalize: args.length_normalize as i64,
    };
    launch_struct(
        dev,
        &LOSS,
        "calibrl_collect_experts",
        slots,
        256,
        stream,
        &mut p,
    )
}
