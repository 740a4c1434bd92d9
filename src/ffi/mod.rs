//! The C ABI. Conventions (after rustls-ffi):
//! - every export runs inside [`guard`]: a panic becomes `CALIBRL_STATUS_PANIC`, never unwinds
//!   into C;
//! - every failure stores a message readable with `calibrl_last_error_message()` on the same
//!   thread;
//! - outputs are written only when the call returns `CALIBRL_STATUS_OK`;
//! - handles are opaque pointers created by `*_new` and released by `*_free` (NULL is a no-op).

pub mod common;
pub mod linear;
pub mod logits;
pub mod loss;
pub mod scheduler;

use crate::error::{CalibrlStatus, Error, Result};
use std::cell::RefCell;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f` behind the panic boundary, records its error message, returns its status.
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> CalibrlStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            CalibrlStatus::Ok
        }
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!(
                "internal error (panic caught at the C ABI): {what}"
            ));
            CalibrlStatus::Panic
        }
    }
}

/// Reads a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `ptr` must be NULL or a valid NUL-terminated string.
pub(crate) unsafe fn c_str<'a>(ptr: *const std::ffi::c_char, name: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(Error::null(name));
    }
    std::ffi::CStr::from_ptr(ptr)
        .to_str()
        .map_err(|_| Error::invalid(name, "is not valid UTF-8"))
}

/// Dereferences a required pointer argument.
///
/// # Safety
/// `ptr` must be NULL or valid for `'a`.
pub(crate) unsafe fn deref<'a, T>(ptr: *const T, name: &str) -> Result<&'a T> {
    ptr.as_ref().ok_or_else(|| Error::null(name))
}
