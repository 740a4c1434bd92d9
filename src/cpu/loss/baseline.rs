//! Where the exploration term's baseline Δ comes from: the expert sums, zero, or a reference
//! (SPEC §4.3).

use super::batch::{ExpertBaseline, LossBatch};
use super::terms::{fsum, masked};
use crate::config::{Baseline, Config};
use crate::error::Result;
use crate::tensor::try_collect;

/// Where Δ's baseline comes from, resolved once per call.
pub(super) enum BaselineSource<'a> {
    /// Per-slot expert sums E_g (already length-normalised when configured). With
    /// `zero_when_missing` (the authors' arithmetic) a row without an expert explores against 0.
    Expert {
        expert: &'a ExpertBaseline,
        sums: Vec<f64>,
        zero_when_missing: bool,
    },
    /// The authors' arithmetic with no expert selected in the call: ℓ* = 0 everywhere.
    Zero,
    Reference(&'a [f64]),
}

pub(super) fn explore_baseline<'a>(
    cfg: &Config,
    batch: &'a LossBatch,
    authors: bool,
) -> Result<Option<BaselineSource<'a>>> {
    Ok(match cfg.baseline {
        Baseline::RefPolicy => batch.ref_logprobs.as_deref().map(BaselineSource::Reference),
        Baseline::Expert if authors && batch.expert.is_none() => Some(BaselineSource::Zero),
        Baseline::Expert => match batch.expert.as_ref() {
            None => None,
            Some(e) => {
                let sums = try_collect(
                    e.rows.iter().map(|r| {
                        let s = fsum(r.clone().map(|k| masked(e.mask[k], e.logprobs[k])));
                        let n = fsum(e.mask[r.clone()].iter().copied());
                        if cfg.length_normalize {
                            if n > 0.0 {
                                s / n
                            } else {
                                0.0
                            }
                        } else {
                            s
                        }
                    }),
                    "expert_logprobs",
                )?;
                Some(BaselineSource::Expert {
                    expert: e,
                    sums,
                    zero_when_missing: authors,
                })
            }
        },
    })
}

impl BaselineSource<'_> {
    /// The sequence-mode baseline of row i, or None when its prompt has no expert.
    pub(super) fn sequence(&self, cfg: &Config, batch: &LossBatch, i: usize) -> Option<f64> {
        match self {
            BaselineSource::Expert {
                expert,
                sums,
                zero_when_missing,
            } => {
                let slot = expert.index[i];
                if slot >= 0 {
                    Some(sums[slot as usize])
                } else {
                    zero_when_missing.then_some(0.0)
                }
            }
            BaselineSource::Zero => Some(0.0),
            BaselineSource::Reference(r) => {
                let rows = batch.rows[i].clone();
                let n = fsum(batch.mask[rows.clone()].iter().copied());
                let s = fsum(rows.map(|k| masked(batch.mask[k], r[k])));
                Some(if cfg.length_normalize {
                    if n > 0.0 {
                        s / n
                    } else {
                        0.0
                    }
                } else {
                    s
                })
            }
        }
    }

    /// The token-aligned baseline at position t (flat index k) of row i: ℓ*[g, t], taken as 0
    /// past the expert's length or at masked expert positions.
    pub(super) fn token(&self, i: usize, t: usize, k: usize) -> Option<f64> {
        match self {
            BaselineSource::Zero => Some(0.0),
            BaselineSource::Expert {
                expert,
                zero_when_missing,
                ..
            } => {
                let slot = expert.index[i];
                if slot < 0 {
                    return zero_when_missing.then_some(0.0);
                }
                let r = &expert.rows[slot as usize];
                Some(if t < r.len() {
                    masked(expert.mask[r.start + t], expert.logprobs[r.start + t])
                } else {
                    0.0
                })
            }
            BaselineSource::Reference(r) => Some(r[k]),
        }
    }
}
