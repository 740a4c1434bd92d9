//! Logit element types (f32, bf16, f16 rows converted to and from f32 in bulk) and the
//! row-parallel plumbing: scratch rows, chunk sizes, a pointer shared across threads.

use crate::cpu::parallel::for_row_chunks_with_scratch;
use crate::desc::logits::LogitsInput;
use crate::error::{Error, Result};
use half::{bf16, f16};

/// Logit element types: bulk conversion of a row to and from f32 (vectorised by `half`).
pub(super) trait Elem: Copy + Send + Sync {
    fn load_row(src: &[Self], dst: &mut [f32]);
    fn store_row(src: &[f32], dst: &mut [Self]);
    /// NaN or +inf (−inf is allowed: a masked vocabulary entry).
    fn any_bad(row: &[Self]) -> bool;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    fn load_row(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn store_row(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }
    fn any_bad(row: &[Self]) -> bool {
        row.iter()
            .fold(false, |bad, &x| bad | (x.is_nan() | (x == f32::INFINITY)))
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    fn load_row(src: &[Self], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    fn store_row(src: &[f32], dst: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
    fn any_bad(row: &[Self]) -> bool {
        // Exponent all ones with any mantissa (NaN), or exactly +inf.
        row.iter().fold(false, |bad, x| {
            let b = x.to_bits();
            bad | ((b & 0x7fff) > 0x7f80) | (b == 0x7f80)
        })
    }
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Elem for f16 {
    fn load_row(src: &[Self], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    fn store_row(src: &[f32], dst: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
    fn any_bad(row: &[Self]) -> bool {
        row.iter().fold(false, |bad, x| {
            let b = x.to_bits();
            bad | ((b & 0x7fff) > 0x7c00) | (b == 0x7c00)
        })
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// The error when a scratch row of `v` logits cannot be allocated.
pub(super) fn scratch_error(v: usize) -> Error {
    Error::invalid(
        "logits",
        format!("a working row of {v} vocabulary entries cannot be allocated"),
    )
}

/// Row chunks in parallel, each with a scratch row of `v` f32 (allocated before any row is
/// touched; an allocation failure is an error, not an abort).
pub(super) fn for_rows_with_scratch(
    n: usize,
    v: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Result<()> {
    for_row_chunks_with_scratch(n, rows_per_thread(v), v, f).map_err(|_| scratch_error(v))
}

/// The largest element as f32 (NaN entries are skipped, as by `f32::max`). Eight independent
/// lanes let the compiler vectorise the reduction.
pub(super) fn lane_max<T: Elem>(u: &[T]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = u.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..8 {
            lanes[j] = lanes[j].max(c[j].to_f32());
        }
    }
    tail.iter()
        .map(|&x| x.to_f32())
        .chain(lanes)
        .fold(f32::NEG_INFINITY, |a, b| a.max(b))
}

/// Rows per thread so that each thread gets at least ~64k logits: spawning threads for less
/// costs more than it saves.
pub(super) fn rows_per_thread(v: usize) -> usize {
    (1 << 16) / v.max(1) + 1
}

#[derive(Clone, Copy)]
pub(super) struct SyncPtr<T>(pub(super) *mut T);

unsafe impl<T> Send for SyncPtr<T> {}

unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

pub(super) unsafe fn rows<'a, T>(input: &LogitsInput, ptr: *mut u8, k: usize) -> &'a mut [T] {
    std::slice::from_raw_parts_mut((ptr as *mut T).add(k * input.row_stride), input.v)
}
