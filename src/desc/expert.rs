//! The scheduler's expert helper as an operation (SPEC §7): gather each selected expert's
//! log-probs from a packed no-grad output into the packed expert tensor `[T*]`, and sum them
//! per slot (`E_g`, `[P*]`). The plan-dependent part (where each slot starts) is resolved by
//! the caller, so backends see only tensors and two index tables.

use crate::error::{Error, Result};
use crate::tensor::{common_device, require_disjoint, try_vec, Device, Tensor};

/// Validated arguments of the expert collection.
pub struct CollectExperts<'a> {
    /// 1-D float: the packed no-grad output of one rank or of all ranks.
    pub nograd_logprobs: Tensor<'a>,
    /// Response tokens that part of the no-grad output holds.
    pub nograd_len: usize,
    /// Per expert slot: where it starts in `nograd_logprobs`, or −1 when that part lacks it.
    pub source: Vec<i64>,
    /// `[slots + 1]` offsets of the packed expert tensor (the plan's `expert_offsets`).
    pub offsets: Vec<i64>,
    /// Optional `[T*]` float output.
    pub expert_logprobs: Option<Tensor<'a>>,
    /// Optional `[P*]` float output.
    pub expert_sums: Option<Tensor<'a>>,
    /// Divide each `E_g` by the expert's token count.
    pub length_normalize: bool,
}

impl CollectExperts<'_> {
    pub fn slots(&self) -> usize {
        self.source.len()
    }

    pub fn total_tokens(&self) -> usize {
        *self.offsets.last().unwrap_or(&0) as usize
    }

    pub fn validate(&self) -> Result<Device> {
        let device = common_device(&[
            Some(&self.nograd_logprobs),
            self.expert_logprobs.as_ref(),
            self.expert_sums.as_ref(),
        ])?;
        self.nograd_logprobs.require_float()?;
        self.nograd_logprobs.require_shape(&[self.nograd_len])?;
        if let Some(t) = &self.expert_logprobs {
            t.require_float()?;
            t.require_shape(&[self.total_tokens()])?;
        }
        if let Some(t) = &self.expert_sums {
            t.require_float()?;
            t.require_shape(&[self.slots()])?;
        }
        require_disjoint(
            &[self.expert_logprobs.as_ref(), self.expert_sums.as_ref()],
            &[Some(&self.nograd_logprobs)],
        )?;
        Ok(device)
    }
}

/// The packed expert tensor from host values of the no-grad output; slots whose `source` is
/// −1 stay 0. Copied values must be finite.
pub fn gather_slots(source: &[i64], offsets: &[i64], nograd: &[f64]) -> Result<Vec<f64>> {
    let total = *offsets.last().unwrap_or(&0) as usize;
    let mut packed = try_vec(total, 0.0, "expert_logprobs")?;
    for (slot, &start) in source.iter().enumerate() {
        if start < 0 {
            continue;
        }
        let start = start as usize;
        let (o0, o1) = (offsets[slot] as usize, offsets[slot + 1] as usize);
        let src = &nograd[start..start + (o1 - o0)];
        if let Some((j, &v)) = src.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::non_finite("nograd_logprobs", start + j, v));
        }
        packed[o0..o1].copy_from_slice(src);
    }
    Ok(packed)
}

/// `E_g` per slot from the packed expert tensor: `Σ_t ℓ*[g,t]`, or divided by `n*_g`.
pub fn slot_sums(offsets: &[i64], packed: &[f64], length_normalize: bool) -> Vec<f64> {
    offsets
        .windows(2)
        .map(|w| {
            let seg = &packed[w[0] as usize..w[1] as usize];
            slot_value(seg.iter().sum(), seg.len(), length_normalize)
        })
        .collect()
}

/// `slot_sums(offsets, &gather_slots(source, offsets, nograd)?, length_normalize)` (the same
/// values and the same first error) without the packed buffer, for a call that wants only the
/// sums: its memory does not grow with the number of expert tokens, which the plan's input
/// declares but no tensor of the call holds. A slot whose `source` is −1 sums zeros.
pub fn slot_sums_from_source(
    source: &[i64],
    offsets: &[i64],
    nograd: &[f64],
    length_normalize: bool,
) -> Result<Vec<f64>> {
    let mut sums = try_vec(source.len(), 0.0, "expert_sums")?;
    for (slot, &start) in source.iter().enumerate() {
        let len = (offsets[slot + 1] - offsets[slot]) as usize;
        let sum: f64 = if start < 0 {
            std::iter::repeat(0.0).take(len).sum()
        } else {
            let start = start as usize;
            let src = &nograd[start..start + len];
            if let Some((j, &v)) = src.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::non_finite("nograd_logprobs", start + j, v));
            }
            src.iter().sum()
        };
        sums[slot] = slot_value(sum, len, length_normalize);
    }
    Ok(sums)
}

fn slot_value(sum: f64, len: usize, length_normalize: bool) -> f64 {
    if length_normalize {
        sum / len as f64
    } else {
        sum
    }
}
