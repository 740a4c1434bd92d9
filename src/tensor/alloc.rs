//! Working memory asked for fallibly: an error naming the argument when it cannot be had,
//! never an abort.

use crate::error::{Error, Result};

/// The error when `n` elements of `size` bytes of working memory cannot be allocated.
pub fn out_of_memory(name: &str, n: usize, size: usize) -> Error {
    Error::invalid(
        name,
        format!(
            "out of memory: needs {n} elements ({} bytes) of working memory, which could not be \
             allocated",
            n.saturating_mul(size)
        ),
    )
}

/// A zero-filled vector of `n` values, or an error naming `name` when the memory cannot be
/// had (an error status, never an abort).
pub fn try_vec<T: Clone>(n: usize, value: T, name: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| out_of_memory(name, n, std::mem::size_of::<T>()))?;
    v.resize(n, value);
    Ok(v)
}

/// Collects `items` (of known length) into a vector whose memory is requested fallibly: an
/// error naming `name` when it cannot be had, never an abort.
pub fn try_collect<T>(items: impl ExactSizeIterator<Item = T>, name: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    let n = items.len();
    v.try_reserve_exact(n)
        .map_err(|_| out_of_memory(name, n, std::mem::size_of::<T>()))?;
    v.extend(items);
    Ok(v)
}
