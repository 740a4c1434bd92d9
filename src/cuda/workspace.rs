//! Device memory the library owns: a cached workspace per (device, stream), and the launch of
//! kernels that take a parameter struct.
//!
//! Each (device, stream) pair gets one buffer, grown on demand and never freed while the
//! process lives (a captured CUDA graph may still point at an old one). Calls on one stream are
//! ordered, so they can share it. Make one call outside stream capture before capturing, so the
//! allocation happens then.

use super::compile::KernelSource;
use super::device::{driver_error, Device};
use super::launch::{launch_raw, Geometry};
use crate::desc::Stream;
use crate::error::Result;
use cudarc::driver::{result as drv, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

const MAX_BLOCKS: usize = 1 << 20;

/// (device ordinal, stream) → (buffer, size in bytes).
type WorkspaceCache = HashMap<(i32, usize), (sys::CUdeviceptr, usize)>;

/// A grow-only device buffer per (device, stream).
pub(crate) fn workspace(
    dev: &Device,
    ordinal: i32,
    stream: Stream,
    bytes: usize,
) -> Result<sys::CUdeviceptr> {
    static CACHE: OnceLock<Mutex<WorkspaceCache>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let key = (ordinal, stream as usize);
    if let Some(&(ptr, size)) = cache.get(&key) {
        if size >= bytes {
            return Ok(ptr);
        }
    }
    let size = bytes.max(1 << 16).next_power_of_two();
    let _ctx = dev.activate()?;
    // SAFETY: the device's context is current. The old buffer is deliberately leaked: a captured
    // graph may still reference it.
    let ptr = unsafe { drv::malloc_sync(size) }
        .map_err(|e| driver_error("cuMemAlloc (calibrl workspace)", e))?;
    cache.insert(key, (ptr, size));
    Ok(ptr)
}

/// A small zeroed device buffer per (device, stream) for the kernels' "last block" tickets.
/// Kernels leave every ticket at zero when they finish, so it is zeroed once, at allocation.
pub(crate) fn tickets(dev: &Device, ordinal: i32, stream: Stream) -> Result<sys::CUdeviceptr> {
    const BYTES: usize = 256;
    static CACHE: OnceLock<Mutex<HashMap<(i32, usize), sys::CUdeviceptr>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let key = (ordinal, stream as usize);
    if let Some(&ptr) = cache.get(&key) {
        return Ok(ptr);
    }
    let _ctx = dev.activate()?;
    // SAFETY: the device's context is current; the buffer lives as long as the process (a
    // captured graph may reference it).
    let ptr = unsafe {
        let ptr =
            drv::malloc_sync(BYTES).map_err(|e| driver_error("cuMemAlloc (calibrl tickets)", e))?;
        drv::memset_d8_sync(ptr, 0, BYTES)
            .map_err(|e| driver_error("cuMemsetD8 (calibrl tickets)", e))?;
        ptr
    };
    cache.insert(key, ptr);
    Ok(ptr)
}

/// Launches a kernel of `src` that takes one `#[repr(C)]` struct `P` by value (the loss and
/// expert families), with a 1-D grid (capped: the kernels loop grid-stride).
pub(crate) fn launch_struct<P>(
    dev: &Device,
    src: &'static KernelSource,
    kernel: &'static str,
    blocks: usize,
    threads: u32,
    stream: Stream,
    params: &mut P,
) -> Result<()> {
    let f = dev.function(src, kernel)?;
    let mut slots = [params as *mut P as *mut c_void];
    let geometry = Geometry {
        blocks: blocks.clamp(1, MAX_BLOCKS) as u32,
        threads,
    };
    // SAFETY: the kernel takes exactly one parameter, whose layout `P` mirrors.
    unsafe { launch_raw(dev, f, kernel, geometry, stream, &mut slots) }
}
