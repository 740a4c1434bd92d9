//! Kernel launches on a foreign stream with a typed argument list.

use super::device::{driver_error, Device, Function};
use crate::desc::Stream;
use crate::error::{Error, Result};
use cudarc::driver::{result as drv, sys};
use std::ffi::c_void;

#[cfg(target_endian = "big")]
compile_error!("kernel argument slots assume a little-endian host");

/// One kernel argument; the variant must match the kernel's C parameter type exactly.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// Any pointer (`const T*`, `void*`); may be NULL.
    Ptr(*const u8),
    /// `long long`
    I64(i64),
    /// `int`
    I32(i32),
    /// `float`
    F32(f32),
}

impl Arg {
    /// The value's bytes in an 8-byte slot (little-endian: the driver reads the first
    /// `sizeof(param)` bytes).
    fn slot(self) -> u64 {
        match self {
            Arg::Ptr(p) => p as usize as u64,
            Arg::I64(v) => v as u64,
            Arg::I32(v) => v as u32 as u64,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }
}

/// Launch geometry: 1-D grid and block, static shared memory only.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub blocks: u32,
    pub threads: u32,
}

/// Launches `f` on `stream` (NULL = legacy default stream) within the device's primary context.
/// Asynchronous: errors of the kernel itself surface at the caller's next synchronisation.
pub(crate) fn launch(
    dev: &Device,
    f: Function,
    name: &str,
    geometry: Geometry,
    stream: Stream,
    args: &[Arg],
) -> Result<()> {
    let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
    let mut params: Vec<*mut c_void> = slots
        .iter_mut()
        .map(|s| s as *mut u64 as *mut c_void)
        .collect();
    // SAFETY: one live slot per kernel parameter, in order, each holding the parameter's value.
    unsafe { launch_raw(dev, f, name, geometry, stream, &mut params) }
}

/// Launches `f` with a caller-built parameter array (e.g. one `#[repr(C)]` struct passed by
/// value, as the loss kernels take).
///
/// # Safety
/// `params` holds one pointer per kernel parameter, each to a live value of that parameter's
/// exact C type and layout.
pub(crate) unsafe fn launch_raw(
    dev: &Device,
    f: Function,
    name: &str,
    geometry: Geometry,
    stream: Stream,
    params: &mut [*mut c_void],
) -> Result<()> {
    if geometry.blocks == 0 || geometry.threads == 0 || geometry.threads > 1024 {
        return Err(Error::cuda(format!(
            "{name}: invalid launch geometry {geometry:?}"
        )));
    }
    let _ctx = dev.activate()?;
    drv::launch_kernel(
        f.raw(),
        (geometry.blocks, 1, 1),
        (geometry.threads, 1, 1),
        0,
        stream as sys::CUstream,
        params,
    )
    .map_err(|e| driver_error(&format!("cuLaunchKernel({name})"), e))
}

/// A launch of 1-D thread-block clusters of `cluster` CTAs (sm_90+), each with `smem_bytes` of
/// dynamic shared memory (the function's limit is raised to it first), through cuLaunchKernelEx.
pub(crate) struct ClusterLaunch {
    pub geometry: Geometry,
    pub cluster: u32,
    pub smem_bytes: u32,
}

/// Launches `f` as [`ClusterLaunch`] says, with `launch`'s typed argument list.
pub(crate) fn launch_cluster(
    dev: &Device,
    f: Function,
    name: &str,
    how: ClusterLaunch,
    stream: Stream,
    args: &[Arg],
) -> Result<()> {
    let g = how.geometry;
    if g.blocks == 0 || g.threads == 0 || g.threads > 1024 || how.cluster == 0 {
        return Err(Error::cuda(format!(
            "{name}: invalid launch geometry {g:?}, cluster {}",
            how.cluster
        )));
    }
    let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
    let mut params: Vec<*mut c_void> = slots
        .iter_mut()
        .map(|s| s as *mut u64 as *mut c_void)
        .collect();
    let _ctx = dev.activate()?;
    // SAFETY: `f` is a loaded function of the current context.
    unsafe {
        sys::cuFuncSetAttribute(
            f.raw(),
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            how.smem_bytes as i32,
        )
    }
    .result()
    .map_err(|e| driver_error(&format!("cuFuncSetAttribute({name})"), e))?;
    // SAFETY: an all-zero CUlaunchAttribute is a valid value (plain data).
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = how.cluster;
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: g.blocks,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: g.threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: how.smem_bytes,
        hStream: stream as sys::CUstream,
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: one live slot per kernel parameter, in order (as `launch`); `config` and `attr`
    // outlive the call.
    unsafe { sys::cuLaunchKernelEx(&config, f.raw(), params.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .map_err(|e| driver_error(&format!("cuLaunchKernelEx({name})"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_hold_the_value_bytes_first() {
        assert_eq!(
            Arg::I32(-1).slot().to_le_bytes()[..4],
            (-1i32).to_le_bytes()
        );
        assert_eq!(
            Arg::F32(1.5).slot().to_le_bytes()[..4],
            1.5f32.to_le_bytes()
        );
        assert_eq!(Arg::I64(-3).slot(), (-3i64) as u64);
        assert_eq!(Arg::Ptr(std::ptr::null()).slot(), 0);
    }
}
