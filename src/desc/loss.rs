//! The loss on log-prob inputs (SPEC §4) and the group advantages (SPEC §3): validated
//! arguments shared by both backends, and the dispatch.

use super::metrics::{CalibrlNormalizers, METRICS_LEN};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::tensor::{common_device, require_disjoint, DType, Device, Tensor};

const FLOATS: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];
const MASKS: [DType; 9] = [
    DType::Bool,
    DType::U8,
    DType::I8,
    DType::I32,
    DType::I64,
    DType::F32,
    DType::F64,
    DType::BF16,
    DType::F16,
];

/// How token rows are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[T]` tokens and `[B+1]` offsets.
    Packed,
    /// `[B, S]`.
    Padded { seq_len: usize },
}

/// A token tensor with its row structure (policy rows or expert rows).
pub struct Rows<'a> {
    pub values: Tensor<'a>,
    pub offsets: Option<Tensor<'a>>,
    pub mask: Option<Tensor<'a>>,
    pub layout: Layout,
    pub rows: usize,
}

impl<'a> Rows<'a> {
    fn new(
        values: Tensor<'a>,
        offsets: Option<Tensor<'a>>,
        mask: Option<Tensor<'a>>,
        offsets_name: &str,
    ) -> Result<Self> {
        values.require_dtype(&FLOATS)?;
        values.require_contiguous()?;
        let (layout, rows) = match (values.ndim(), &offsets) {
            (1, Some(o)) => {
                o.require_dtype(&[DType::I32, DType::I64])?;
                o.require_ndim(1)?;
                o.require_contiguous()?;
                if o.shape[0] == 0 {
                    return Err(Error::shape(o.name, "needs at least one element (B + 1)"));
                }
                (Layout::Packed, o.shape[0] - 1)
            }
            (1, None) => {
                return Err(Error::null(offsets_name)
                    .with_reason(&format!("`{}` is 1-D (packed layout)", values.name)))
            }
            (2, None) => (
                Layout::Padded {
                    seq_len: values.shape[1],
                },
                values.shape[0],
            ),
            (2, Some(o)) => {
                return Err(Error::invalid(
                    o.name,
                    format!("must be NULL when `{}` is 2-D (padded layout)", values.name),
                ))
            }
            _ => {
                return Err(Error::shape(
                    values.name,
                    format!(
                        "expected 1-D (packed) or 2-D (padded), got shape {:?}",
                        values.shape
                    ),
                ))
            }
        };
        if let Some(m) = &mask {
            m.require_dtype(&MASKS)?;
            m.require_shape(&values.shape)?;
            m.require_contiguous()?;
        }
        Ok(Rows {
            values,
            offsets,
            mask,
            layout,
            rows,
        })
    }

    fn all(&self) -> Vec<Option<&Tensor<'a>>> {
        vec![
            Some(&self.values),
            self.offsets.as_ref(),
            self.mask.as_ref(),
        ]
    }

    /// Row ranges in flat token indices (host). Checks the offsets.
    pub fn ranges(&self) -> Result<Vec<std::ops::Range<usize>>> {
        match self.layout {
            Layout::Padded { seq_len } => {
                // An empty `[rows, 0]` tensor may declare any number of rows: holding them is
                // an error when the memory cannot be had, never a panic or an abort.
                let mut r = Vec::new();
                r.try_reserve_exact(self.rows).map_err(|_| {
                    Error::invalid(
                        self.values.name,
                        format!("{} rows cannot be held in memory", self.rows),
                    )
                })?;
                r.extend((0..self.rows).map(|i| i * seq_len..(i + 1) * seq_len));
                Ok(r)
            }
            Layout::Packed => {
                let o = self.offsets.as_ref().expect("packed layout has offsets");
                let off = o.read_i64()?;
                let total = self.values.shape[0] as i64;
                if off[0] != 0 || off[self.rows] != total {
                    return Err(Error::invalid(
                        o.name,
                        format!(
                            "must start at 0 and end at the token count {total}, got {} … {}",
                            off[0], off[self.rows]
                        ),
                    ));
                }
                if let Some(i) = (0..self.rows).find(|&i| off[i + 1] < off[i]) {
                    return Err(Error::invalid(
                        o.name,
                        format!("decreases at index {i} ({} > {})", off[i], off[i + 1]),
                    ));
                }
                crate::tensor::try_collect(
                    (0..self.rows).map(|i| off[i] as usize..off[i + 1] as usize),
                    o.name,
                )
            }
        }
    }

    /// The mask as 0/1 values (all ones when absent). Host.
    pub fn mask_values(&self) -> Result<Vec<f64>> {
        match &self.mask {
            None => crate::tensor::try_vec(self.values.numel(), 1.0, self.values.name),
            Some(m) => Ok(m
                .read_f64()?
                .into_iter()
                .map(|v| if v != 0.0 { 1.0 } else { 0.0 })
                .collect()),
        }
    }
}

/// Clip-Cov / KL-Cov (SPEC §4.6) add their covariance means in an order fixed by the flat
/// positions alone, the same on both backends, so that both select the same tokens
/// (`cpu::cov::fixed_order_sum`, and `calibrl_cov_prepare` in cuda/loss.cu, whose
/// COV_THREADS and COV_PER_THREAD these are): threads of COV_SUM_PER_THREAD consecutive
/// positions, in tiles of COV_SUM_THREADS threads.
pub const COV_SUM_THREADS: usize = 256;
pub const COV_SUM_PER_THREAD: usize = 8;
pub const COV_SUM_TILE: usize = COV_SUM_THREADS * COV_SUM_PER_THREAD;

/// Bytes of per-group statistics (count, sum, square sum as f64) a backend may allocate.
const GROUP_STAT_BYTES: usize = 3 * 8;

/// Group advantages arguments (SPEC §3).
pub struct Advantages<'a> {
    pub rewards: Tensor<'a>,
    pub group_ids: Tensor<'a>,
    pub num_groups: usize,
    pub correct: Option<Tensor<'a>>,
    pub is_expert: Option<Tensor<'a>>,
    pub advantages: Tensor<'a>,
    pub weights: Tensor<'a>,
    pub signs: Tensor<'a>,
}

impl Advantages<'_> {
    pub fn validate(&self) -> Result<Device> {
        // A backend may keep three f64 statistics per group id: they must fit in memory's
        // address space (checked before anything is allocated).
        if self.num_groups > isize::MAX as usize / GROUP_STAT_BYTES {
            return Err(Error::invalid(
                "num_groups",
                format!(
                    "{} is too large: {GROUP_STAT_BYTES} bytes of statistics per group do not fit \
                     in the address space",
                    self.num_groups
                ),
            ));
        }
        self.rewards.require_dtype(&FLOATS)?;
        self.rewards.require_ndim(1)?;
        let b = self.rewards.shape[0];
        self.group_ids.require_dtype(&[DType::I32, DType::I64])?;
        self.group_ids.require_shape(&[b])?;
        for t in [self.correct.as_ref(), self.is_expert.as_ref()]
            .into_iter()
            .flatten()
        {
            t.require_dtype(&[DType::Bool, DType::U8, DType::I8, DType::I32, DType::I64])?;
            t.require_shape(&[b])?;
        }
        for t in [&self.advantages, &self.weights, &self.signs] {
            t.require_dtype(&FLOATS)?;
            t.require_shape(&[b])?;
        }
        let device = common_device(&[
            Some(&self.rewards),
            Some(&self.group_ids),
            self.correct.as_ref(),
            self.is_expert.as_ref(),
            Some(&self.advantages),
            Some(&self.weights),
            Some(&self.signs),
        ])?;
        require_disjoint(
            &[
                Some(&self.advantages),
                Some(&self.weights),
                Some(&self.signs),
            ],
            &[
                Some(&self.rewards),
                Some(&self.group_ids),
                self.correct.as_ref(),
                self.is_expert.as_ref(),
            ],
        )?;
        Ok(device)
    }
}

/// Loss arguments (SPEC §4); see docs/abi.md for every field.
pub struct Loss<'a> {
    pub policy: Rows<'a>,
    pub old_logprobs: Option<Tensor<'a>>,
    pub ref_logprobs: Option<Tensor<'a>>,
    pub entropy: Option<Tensor<'a>>,
    /// Per-token importance weights ρ on the policy-gradient term (verl's `rollout_is_weights`).
    pub token_weights: Option<Tensor<'a>>,
    pub advantages: Tensor<'a>,
    pub weights: Tensor<'a>,
    pub signs: Tensor<'a>,
    pub is_expert: Option<Tensor<'a>>,
    pub expert: Option<Rows<'a>>,
    pub expert_index: Option<Tensor<'a>>,
    pub normalizers: Option<CalibrlNormalizers>,
    pub grad_logprobs: Option<Tensor<'a>>,
    pub grad_entropy: Option<Tensor<'a>>,
    pub metrics: Option<Tensor<'a>>,
}

/// Raw tensors of a loss call before their row structure is checked.
pub struct LossTensors<'a> {
    pub logprobs: Tensor<'a>,
    pub seq_offsets: Option<Tensor<'a>>,
    pub mask: Option<Tensor<'a>>,
    pub expert_logprobs: Option<Tensor<'a>>,
    pub expert_offsets: Option<Tensor<'a>>,
    pub expert_mask: Option<Tensor<'a>>,
}

impl<'a> Loss<'a> {
    /// Builds the policy and expert row structures.
    pub fn rows(t: LossTensors<'a>) -> Result<(Rows<'a>, Option<Rows<'a>>)> {
        let policy = Rows::new(t.logprobs, t.seq_offsets, t.mask, "seq_offsets")?;
        let expert = match t.expert_logprobs {
            Some(v) => Some(Rows::new(
                v,
                t.expert_offsets,
                t.expert_mask,
                "expert_offsets",
            )?),
            None => {
                if let Some(extra) = t.expert_offsets.or(t.expert_mask) {
                    return Err(Error::invalid(
                        extra.name,
                        "is given without `expert_logprobs`",
                    ));
                }
                None
            }
        };
        Ok((policy, expert))
    }

    pub fn validate(&self, cfg: &Config) -> Result<Device> {
        let shape = &self.policy.values.shape;
        for t in [
            self.old_logprobs.as_ref(),
            self.ref_logprobs.as_ref(),
            self.entropy.as_ref(),
            self.token_weights.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            t.require_dtype(&FLOATS)?;
            t.require_shape(shape)?;
            t.require_contiguous()?;
        }
        let b = self.policy.rows;
        for t in [&self.advantages, &self.weights, &self.signs] {
            t.require_dtype(&FLOATS)?;
            t.require_shape(&[b])?;
        }
        if let Some(t) = &self.is_expert {
            t.require_dtype(&[DType::Bool, DType::U8, DType::I8, DType::I32, DType::I64])?;
            t.require_shape(&[b])?;
        }
        match (&self.expert, &self.expert_index) {
            (Some(_), Some(idx)) => {
                idx.require_dtype(&[DType::I32, DType::I64])?;
                idx.require_shape(&[b])?;
            }
            (Some(_), None) => {
                return Err(Error::null("expert_index").with_reason("`expert_logprobs` is given"))
            }
            (None, Some(idx)) => {
                return Err(Error::invalid(
                    idx.name,
                    "is given without `expert_logprobs`",
                ))
            }
            (None, None) => {}
        }
        for t in [self.grad_logprobs.as_ref(), self.grad_entropy.as_ref()]
            .into_iter()
            .flatten()
        {
            t.require_dtype(&FLOATS)?;
            t.require_shape(shape)?;
            t.require_contiguous()?;
        }
        if let Some(t) = &self.metrics {
            t.require_dtype(&FLOATS)?;
            t.require_shape(&[METRICS_LEN])?;
        }
        if let Some(n) = &self.normalizers {
            for (name, v) in [
                ("normalizers.token_count", n.token_count),
                ("normalizers.seq_count", n.seq_count),
                ("normalizers.all_token_count", n.all_token_count),
                ("normalizers.all_seq_count", n.all_seq_count),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(Error::invalid(name, format!("{v} must be finite and >= 0")));
                }
            }
            // Every row's count includes the rollout rows' (0: the same count).
            for (name, all, base, base_name) in [
                (
                    "normalizers.all_token_count",
                    n.all_token_count,
                    n.token_count,
                    "token_count",
                ),
                (
                    "normalizers.all_seq_count",
                    n.all_seq_count,
                    n.seq_count,
                    "seq_count",
                ),
            ] {
                if all != 0.0 && all < base {
                    return Err(Error::invalid(
                        name,
                        format!(
                            "{all} is below {base_name} ({base}): it counts every row, the \
                             rollout rows included (0 means the same as {base_name})"
                        ),
                    ));
                }
            }
        }
        cfg.validate()?;
        let mut inputs = self.policy.all();
        inputs.extend([
            self.old_logprobs.as_ref(),
            self.ref_logprobs.as_ref(),
            self.entropy.as_ref(),
            self.token_weights.as_ref(),
            Some(&self.advantages),
            Some(&self.weights),
            Some(&self.signs),
            self.is_expert.as_ref(),
            self.expert_index.as_ref(),
        ]);
        if let Some(e) = &self.expert {
            inputs.extend(e.all());
        }
        let outputs = [
            self.grad_logprobs.as_ref(),
            self.grad_entropy.as_ref(),
            self.metrics.as_ref(),
        ];
        let device = common_device(&[inputs.as_slice(), &outputs].concat())?;
        require_disjoint(&outputs, &inputs)?;
        Ok(device)
    }
}
