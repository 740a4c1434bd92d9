//! Errors: every failure carries a stable status number (the C ABI's `calibrl_status`) and a
//! message that names the argument and what was wrong with it.

use std::fmt;

/// Status codes returned by every C ABI function. The numbers are stable: never renumber,
/// only append.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibrlStatus {
    /// Success; outputs were written.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument had an invalid value (out of range, inconsistent with another argument).
    InvalidArgument = 2,
    /// A tensor had the wrong number of dimensions or the wrong extent.
    ShapeMismatch = 3,
    /// A tensor had a dtype the operation does not accept.
    DtypeMismatch = 4,
    /// A tensor lives on the wrong device, or tensors of one call live on different devices.
    DeviceMismatch = 5,
    /// An input held NaN or infinity where a finite value is required.
    NonFinite = 6,
    /// The configuration JSON was malformed, had an unknown key, a wrong type or a bad value.
    InvalidConfig = 7,
    /// CUDA tensors were passed but the CUDA driver or NVRTC could not be loaded.
    CudaUnavailable = 8,
    /// A CUDA driver or NVRTC call failed.
    CudaError = 9,
    /// A Rust panic was caught at the ABI boundary (a library bug; please report it).
    Panic = 10,
    /// A caller-provided buffer (string or workspace) was too small.
    BufferTooSmall = 11,
    /// A tensor's memory layout (strides) is not supported by the operation.
    LayoutUnsupported = 12,
}

/// The library's error: a status and a human-readable message.
#[derive(Clone, Debug, PartialEq)]
pub struct Error {
    pub status: CalibrlStatus,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(status: CalibrlStatus, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }
    pub fn null(arg: &str) -> Self {
        Self::new(CalibrlStatus::NullArgument, format!("`{arg}` is NULL"))
    }
    pub fn invalid(arg: &str, what: impl fmt::Display) -> Self {
        Self::new(CalibrlStatus::InvalidArgument, format!("`{arg}`: {what}"))
    }
    pub fn shape(arg: &str, what: impl fmt::Display) -> Self {
        Self::new(CalibrlStatus::ShapeMismatch, format!("`{arg}`: {what}"))
    }
    pub fn dtype(arg: &str, what: impl fmt::Display) -> Self {
        Self::new(CalibrlStatus::DtypeMismatch, format!("`{arg}`: {what}"))
    }
    pub fn device(arg: &str, what: impl fmt::Display) -> Self {
        Self::new(CalibrlStatus::DeviceMismatch, format!("`{arg}`: {what}"))
    }
    pub fn non_finite(arg: &str, index: usize, value: f64) -> Self {
        Self::new(
            CalibrlStatus::NonFinite,
            format!("`{arg}`: element {index} is {value}, expected a finite value"),
        )
    }
    /// A configuration error naming `key` (shortened: a key may be any length).
    pub fn config(key: &str, what: impl fmt::Display) -> Self {
        Self::new(
            CalibrlStatus::InvalidConfig,
            format!("config key `{}`: {what}", shorten(key)),
        )
    }
    pub fn layout(arg: &str, what: impl fmt::Display) -> Self {
        Self::new(CalibrlStatus::LayoutUnsupported, format!("`{arg}`: {what}"))
    }
    pub fn cuda(what: impl fmt::Display) -> Self {
        Self::new(CalibrlStatus::CudaError, format!("CUDA: {what}"))
    }
    pub fn cuda_unavailable(what: impl fmt::Display) -> Self {
        Self::new(CalibrlStatus::CudaUnavailable, what.to_string())
    }
}

/// Longest caller-given text (a JSON key or value) a message quotes in full.
pub(crate) const QUOTE_MAX: usize = 64;

/// `text` as a message quotes it: in full up to [`QUOTE_MAX`] bytes, else its start and its
/// length, so that a message stays short whatever the caller passed.
pub fn shorten(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= QUOTE_MAX {
        return text.into();
    }
    let mut end = QUOTE_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len()).into()
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.status, self.message)
    }
}

impl std::error::Error for Error {}

impl Error {
    /// Appends why a NULL argument is required ("`x` is NULL but …").
    pub(crate) fn with_reason(mut self, reason: &str) -> Self {
        self.message = self
            .message
            .replace("is NULL", &format!("is NULL but {reason}"));
        self
    }
}
