//! Which views share memory: outputs must not overlap themselves, each other or an input.

use super::view::Tensor;
use crate::error::{Error, Result};

impl Tensor<'_> {
    /// Byte range `[start, end)` this tensor's elements can touch (for aliasing checks).
    pub fn byte_span(&self) -> (usize, usize) {
        if self.numel() == 0 {
            return (self.ptr as usize, self.ptr as usize);
        }
        let mut lo = 0isize;
        let mut hi = 0isize;
        for (&e, &s) in self.shape.iter().zip(&self.strides) {
            let reach = (e as isize - 1) * s;
            if reach < 0 {
                lo += reach
            } else {
                hi += reach
            }
        }
        let sz = self.dtype.size() as isize;
        let base = self.ptr as isize;
        ((base + lo * sz) as usize, (base + (hi + 1) * sz) as usize)
    }

    /// True when the two tensors may share a byte: exact when their byte ranges are disjoint
    /// or when both step through memory with one common stride (interleaved columns of one
    /// buffer do not overlap); otherwise any intersection of the byte ranges counts.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        let (a0, a1) = self.byte_span();
        let (b0, b1) = other.byte_span();
        if self.numel() == 0 || other.numel() == 0 || !(a0 < b1 && b0 < a1) {
            return false;
        }
        match (self.byte_step(), other.byte_step()) {
            (Some(s), Some(t)) if s == t && s >= self.dtype.size().max(other.dtype.size()) => {
                // Element i of each occupies [base + i·s, base + i·s + size): offsets modulo s.
                let d = (self.ptr as usize).abs_diff(other.ptr as usize) % s;
                let (first, second) = if (other.ptr as usize) >= (self.ptr as usize) {
                    (self.dtype.size(), other.dtype.size())
                } else {
                    (other.dtype.size(), self.dtype.size())
                };
                d < first || d + second > s
            }
            _ => true,
        }
    }

    /// The byte distance between consecutive elements when the view has at most one dimension
    /// of extent > 1 (`None` otherwise; the element size for a single element).
    fn byte_step(&self) -> Option<usize> {
        let mut dims = self.shape.iter().zip(&self.strides).filter(|(&e, _)| e > 1);
        match (dims.next(), dims.next()) {
            (None, _) => Some(self.dtype.size()),
            (Some((_, &s)), None) => Some(s.unsigned_abs() * self.dtype.size()),
            _ => None,
        }
    }

    /// True when two different elements of the view share memory (a stride of 0 along a
    /// dimension of extent > 1, or dimensions that interleave). Conservative: a layout is
    /// accepted when, with its dimensions ordered by stride, each stride steps past everything
    /// the smaller ones reach.
    pub fn self_overlaps(&self) -> bool {
        let mut dims: Vec<(usize, usize)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(&e, _)| e > 1)
            .map(|(&e, &s)| (s.unsigned_abs(), e))
            .collect();
        dims.sort_unstable();
        // Elements reached by the dimensions so far (validated to fit by `from_raw`).
        let mut reach = 1usize;
        for (s, e) in dims {
            if s < reach {
                return true;
            }
            reach += s * (e - 1);
        }
        false
    }
}

/// Rejects outputs that share memory with themselves, with each other or with an input: a
/// call writes every output element once, from inputs it has finished reading. (In-place
/// pairs an operation documents are left out of `inputs` by its caller.)
pub fn require_disjoint(outputs: &[Option<&Tensor>], inputs: &[Option<&Tensor>]) -> Result<()> {
    let outputs: Vec<&Tensor> = outputs.iter().flatten().copied().collect();
    for (i, o) in outputs.iter().enumerate() {
        if o.self_overlaps() {
            return Err(Error::invalid(
                o.name,
                format!(
                    "its elements share memory (shape {:?}, strides {:?}): every output element \
                     needs its own memory",
                    o.shape, o.strides
                ),
            ));
        }
        let others = outputs[..i].iter().map(|t| (*t, "output"));
        let ins = inputs.iter().flatten().map(|t| (*t, "input"));
        if let Some((t, what)) = others.chain(ins).find(|(t, _)| o.overlaps(t)) {
            return Err(Error::invalid(
                o.name,
                format!(
                    "shares memory with the {what} `{}`: outputs must not overlap each other or \
                     an input",
                    t.name
                ),
            ));
        }
    }
    Ok(())
}
