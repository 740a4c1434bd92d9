//! C ABI of the group advantages (SPEC §3) and the loss on log-prob inputs (SPEC §4).

use super::common::CalibrlConfig;
use super::{deref, guard};
use crate::desc::loss::{Advantages, Loss, LossTensors};
use crate::desc::metrics::{CalibrlMetrics, CalibrlNormalizers, METRICS_LEN};
use crate::desc::Stream;
use crate::error::{CalibrlStatus, Error};
use crate::ops::loss;
use crate::tensor::{DLTensor, Tensor};

/// Length of the `metrics` output tensor (the fields of `calibrl_metrics`, in order).
pub const CALIBRL_METRICS_LEN: usize = 16;
const _: () = assert!(CALIBRL_METRICS_LEN == METRICS_LEN);

/// Arguments of `calibrl_group_advantages`. Optional fields may be NULL.
#[repr(C)]
pub struct CalibrlAdvantageArgs {
    /// `[B]` float rewards.
    pub rewards: *const DLTensor,
    /// `[B]` int32/int64 group (prompt) ids in `[0, num_groups)`.
    pub group_ids: *const DLTensor,
    pub num_groups: i64,
    /// Optional `[B]` bool/uint8/int: non-zero = correct. NULL: correct iff reward > τ.
    pub correct: *const DLTensor,
    /// Optional `[B]`: expert rows, excluded from the group statistics.
    pub is_expert: *const DLTensor,
    /// Output `[B]` float advantages A.
    pub advantages: *mut DLTensor,
    /// Output `[B]` float rarity weights |A| (1 with rarity weighting off).
    pub weights: *mut DLTensor,
    /// Output `[B]` float correctness signs (+1 / −1).
    pub signs: *mut DLTensor,
}

/// Arguments of `calibrl_loss`. Optional fields may be NULL; see docs/abi.md.
#[repr(C)]
pub struct CalibrlLossArgs {
    /// Policy log-probs ℓ: `[T]` packed (with `seq_offsets`) or `[B, S]` padded.
    pub logprobs: *const DLTensor,
    /// `[B + 1]` int32/int64 row offsets (packed layout only).
    pub seq_offsets: *const DLTensor,
    /// Optional, shape of `logprobs`: non-zero = the token counts.
    pub mask: *const DLTensor,
    /// Optional behaviour-policy log-probs (NULL: on-policy, ratio 1).
    pub old_logprobs: *const DLTensor,
    /// Optional reference log-probs (KL term, `ref_policy` baseline).
    pub ref_logprobs: *const DLTensor,
    /// Optional token entropy H (required when `entropy_coef != 0`).
    pub entropy: *const DLTensor,
    /// `[B]` advantages A.
    pub advantages: *const DLTensor,
    /// `[B]` rarity weights w.
    pub weights: *const DLTensor,
    /// `[B]` correctness signs c (±1).
    pub signs: *const DLTensor,
    /// Optional `[B]`: expert rows (trained by LUFFY / RL-PLUS, masked otherwise).
    pub is_expert: *const DLTensor,
    /// Expert responses' log-probs: `[T*]` packed (with `expert_offsets`) or `[P, S*]` padded.
    pub expert_logprobs: *const DLTensor,
    /// `[P + 1]` expert row offsets (packed layout only).
    pub expert_offsets: *const DLTensor,
    /// Optional expert token mask, shape of `expert_logprobs`.
    pub expert_mask: *const DLTensor,
    /// `[B]` int32/int64: each row's expert slot, −1 for none.
    pub expert_index: *const DLTensor,
    /// Optional global normalisers of the mini-batch (NULL: this call's own counts).
    pub normalizers: *const CalibrlNormalizers,
    /// Optional output ∂L/∂ℓ, shape of `logprobs`.
    pub grad_logprobs: *mut DLTensor,
    /// Optional output ∂L/∂H, shape of `logprobs`.
    pub grad_entropy: *mut DLTensor,
    /// Optional output `[CALIBRL_METRICS_LEN]` float metrics on the call's device.
    pub metrics: *mut DLTensor,
    /// Optional per-token importance weights ρ ≥ 0, shape of `logprobs` (NULL: all 1). Each
    /// token's policy-gradient term and its gradient are multiplied by ρ (verl's
    /// `rollout_is_weights`); no gradient flows into ρ. Last field: older callers that zero the
    /// struct keep working.
    pub token_weights: *const DLTensor,
}

/// Group-normalised advantages, rarity weights and correctness signs (SPEC §3).
///
/// # Safety
/// `cfg` is a live handle; `args` points to a struct whose tensor pointers are NULL (optional
/// fields) or valid `DLTensor`s; `stream` is NULL or a `CUstream`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_group_advantages(
    cfg: *const CalibrlConfig,
    args: *const CalibrlAdvantageArgs,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let cfg = &deref(cfg, "cfg")?.inner;
        let a = deref(args, "args")?;
        let num_groups = usize::try_from(a.num_groups)
            .map_err(|_| Error::invalid("num_groups", format!("{} is negative", a.num_groups)))?;
        let args = Advantages {
            rewards: Tensor::from_raw(a.rewards, "rewards")?,
            group_ids: Tensor::from_raw(a.group_ids, "group_ids")?,
            num_groups,
            correct: Tensor::optional(a.correct, "correct")?,
            is_expert: Tensor::optional(a.is_expert, "is_expert")?,
            advantages: Tensor::from_raw(a.advantages, "advantages")?,
            weights: Tensor::from_raw(a.weights, "weights")?,
            signs: Tensor::from_raw(a.signs, "signs")?,
        };
        loss::group_advantages(cfg, &args, stream)
    })
}

/// The CalibRL loss (SPEC §4): value, gradients and metrics. `host_metrics` may be NULL; when
/// given it is filled on the host (for CUDA tensors this synchronises `stream`).
///
/// # Safety
/// As `calibrl_group_advantages`; `host_metrics` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn calibrl_loss(
    cfg: *const CalibrlConfig,
    args: *const CalibrlLossArgs,
    host_metrics: *mut CalibrlMetrics,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let cfg = &deref(cfg, "cfg")?.inner;
        let a = deref(args, "args")?;
        let (policy, expert) = Loss::rows(LossTensors {
            logprobs: Tensor::from_raw(a.logprobs, "logprobs")?,
            seq_offsets: Tensor::optional(a.seq_offsets, "seq_offsets")?,
            mask: Tensor::optional(a.mask, "mask")?,
            expert_logprobs: Tensor::optional(a.expert_logprobs, "expert_logprobs")?,
            expert_offsets: Tensor::optional(a.expert_offsets, "expert_offsets")?,
            expert_mask: Tensor::optional(a.expert_mask, "expert_mask")?,
        })?;
        let args = Loss {
            policy,
            old_logprobs: Tensor::optional(a.old_logprobs, "old_logprobs")?,
            ref_logprobs: Tensor::optional(a.ref_logprobs, "ref_logprobs")?,
            entropy: Tensor::optional(a.entropy, "entropy")?,
            token_weights: Tensor::optional(a.token_weights, "token_weights")?,
            advantages: Tensor::from_raw(a.advantages, "advantages")?,
            weights: Tensor::from_raw(a.weights, "weights")?,
            signs: Tensor::from_raw(a.signs, "signs")?,
            is_expert: Tensor::optional(a.is_expert, "is_expert")?,
            expert,
            expert_index: Tensor::optional(a.expert_index, "expert_index")?,
            normalizers: a.normalizers.as_ref().copied(),
            grad_logprobs: Tensor::optional(a.grad_logprobs, "grad_logprobs")?,
            grad_entropy: Tensor::optional(a.grad_entropy, "grad_entropy")?,
            metrics: Tensor::optional(a.metrics, "metrics")?,
        };
        loss::loss(cfg, &args, host_metrics.as_mut(), stream)
    })
}
