//! Library-wide exports: version, last error, configuration handles.

use super::{c_str, deref, guard, LAST_ERROR};
use crate::config::Config;
use crate::error::{CalibrlStatus, Error};
use std::ffi::{c_char, CStr};

/// The ABI version: bumped whenever a signature, struct layout or status number changes.
/// Bindings check it before any other call.
pub const CALIBRL_ABI_VERSION: u32 = 4;

/// The library version as a static NUL-terminated string, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn calibrl_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The ABI version this library implements (compare with `CALIBRL_ABI_VERSION` in the header).
#[no_mangle]
pub extern "C" fn calibrl_abi_version() -> u32 {
    CALIBRL_ABI_VERSION
}

/// The message of the last failed call on this thread ("" after a success). The pointer stays
/// valid until the next calibrl call on this thread.
#[no_mangle]
pub extern "C" fn calibrl_last_error_message() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A short static name of a status, e.g. "CALIBRL_STATUS_SHAPE_MISMATCH";
/// "CALIBRL_STATUS_UNKNOWN" for a number that is no status. Takes the number as an integer:
/// a C enum may hold any value, and a Rust enum parameter holding an unknown one would be
/// undefined behaviour.
#[no_mangle]
pub extern "C" fn calibrl_status_name(status: i32) -> *const c_char {
    const ALL: [CalibrlStatus; 13] = [
        CalibrlStatus::Ok,
        CalibrlStatus::NullArgument,
        CalibrlStatus::InvalidArgument,
        CalibrlStatus::ShapeMismatch,
        CalibrlStatus::DtypeMismatch,
        CalibrlStatus::DeviceMismatch,
        CalibrlStatus::NonFinite,
        CalibrlStatus::InvalidConfig,
        CalibrlStatus::CudaUnavailable,
        CalibrlStatus::CudaError,
        CalibrlStatus::Panic,
        CalibrlStatus::BufferTooSmall,
        CalibrlStatus::LayoutUnsupported,
    ];
    let Some(&status) = ALL.iter().find(|&&s| s as i32 == status) else {
        return c"CALIBRL_STATUS_UNKNOWN".as_ptr();
    };
    let s: &'static CStr = match status {
        CalibrlStatus::Ok => c"CALIBRL_STATUS_OK",
        CalibrlStatus::NullArgument => c"CALIBRL_STATUS_NULL_ARGUMENT",
        CalibrlStatus::InvalidArgument => c"CALIBRL_STATUS_INVALID_ARGUMENT",
        CalibrlStatus::ShapeMismatch => c"CALIBRL_STATUS_SHAPE_MISMATCH",
        CalibrlStatus::DtypeMismatch => c"CALIBRL_STATUS_DTYPE_MISMATCH",
        CalibrlStatus::DeviceMismatch => c"CALIBRL_STATUS_DEVICE_MISMATCH",
        CalibrlStatus::NonFinite => c"CALIBRL_STATUS_NON_FINITE",
        CalibrlStatus::InvalidConfig => c"CALIBRL_STATUS_INVALID_CONFIG",
        CalibrlStatus::CudaUnavailable => c"CALIBRL_STATUS_CUDA_UNAVAILABLE",
        CalibrlStatus::CudaError => c"CALIBRL_STATUS_CUDA_ERROR",
        CalibrlStatus::Panic => c"CALIBRL_STATUS_PANIC",
        CalibrlStatus::BufferTooSmall => c"CALIBRL_STATUS_BUFFER_TOO_SMALL",
        CalibrlStatus::LayoutUnsupported => c"CALIBRL_STATUS_LAYOUT_UNSUPPORTED",
    };
    s.as_ptr()
}

/// Opaque configuration handle.
pub struct CalibrlConfig {
    pub(crate) inner: Config,
}

/// Builds a configuration from JSON (`{"preset": "paper", "lambda": 0.2, ...}`; NULL or "{}"
/// gives the `paper` preset). On success `*out` owns a new handle; free it with
/// `calibrl_config_free`.
///
/// # Safety
/// `json` is NULL or a NUL-terminated string; `out` is a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn calibrl_config_new(
    json: *const c_char,
    out: *mut *mut CalibrlConfig,
) -> CalibrlStatus {
    guard(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let cfg = if json.is_null() {
            Config::default()
        } else {
            Config::from_json(c_str(json, "json")?)?
        };
        *out = Box::into_raw(Box::new(CalibrlConfig { inner: cfg }));
        Ok(())
    })
}

/// Releases a configuration handle (NULL is a no-op).
///
/// # Safety
/// `cfg` is NULL or a handle from `calibrl_config_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn calibrl_config_free(cfg: *mut CalibrlConfig) {
    if !cfg.is_null() {
        let _ = std::panic::catch_unwind(|| drop(Box::from_raw(cfg)));
    }
}

/// Writes the full configuration as JSON (NUL-terminated) into `buf` of `capacity` bytes and
/// the length without the NUL into `*len` (written even when the buffer is too small, so a
/// caller can size a second call; then the status is `CALIBRL_STATUS_BUFFER_TOO_SMALL`).
///
/// # Safety
/// `cfg` is a valid handle; `buf` is NULL or valid for `capacity` bytes; `len` is valid.
#[no_mangle]
pub unsafe extern "C" fn calibrl_config_to_json(
    cfg: *const CalibrlConfig,
    buf: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> CalibrlStatus {
    guard(|| {
        let cfg = deref(cfg, "cfg")?;
        if len.is_null() {
            return Err(Error::null("len"));
        }
        let json = cfg.inner.to_json();
        *len = json.len();
        if buf.is_null() || capacity < json.len() + 1 {
            return Err(Error::new(
                CalibrlStatus::BufferTooSmall,
                format!(
                    "`buf`: needs {} bytes, capacity is {capacity}",
                    json.len() + 1
                ),
            ));
        }
        std::ptr::copy_nonoverlapping(json.as_ptr(), buf as *mut u8, json.len());
        *buf.add(json.len()) = 0;
        Ok(())
    })
}
