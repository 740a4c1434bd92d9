//! The DLPack descriptor structs, and the dtypes and devices calibrl accepts in them.

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
    pub(super) fn from_dl(dt: DLDataType) -> Option<DType> {
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
