//! C ABI of the fused logits path (SPEC §6); see `crate::desc::logits` for the conventions.

use super::guard;
use crate::desc::logits::{
    Backward, Forward, ForwardBackward, LogitsInput, ShardFinish, ShardStats,
};
use crate::desc::Stream;
use crate::error::CalibrlStatus;
use crate::ops::logits;
use crate::tensor::{DLTensor, Tensor};

/// Forward over full-vocabulary logits `[N, V]`: writes `logprobs[N]`, `entropy[N]` (may be
/// NULL) and `lse[N]` (save it for the backward). Negative labels mark ignored rows.
///
/// # Safety
/// Every non-NULL pointer is a valid `DLTensor` whose memory lives on its stated device;
/// `stream` is NULL or a `CUstream` of the tensors' CUDA context.
#[no_mangle]
pub unsafe extern "C" fn calibrl_logits_forward(
    logits: *const DLTensor,
    labels: *const DLTensor,
    temperature: f64,
    logprobs: *mut DLTensor,
    entropy: *mut DLTensor,
    lse: *mut DLTensor,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let args = Forward {
            input: LogitsInput::new(
                Tensor::from_raw(logits, "logits")?,
                Tensor::from_raw(labels, "labels")?,
                temperature,
                0,
            )?,
            logprobs: Tensor::from_raw(logprobs, "logprobs")?,
            entropy: Tensor::optional(entropy, "entropy")?,
            lse: Tensor::from_raw(lse, "lse")?,
        };
        logits::forward(&args, stream)
    })
}

/// Backward: writes `grad_logits = ∂L/∂z` given `grad_logprobs = ∂L/∂ℓ` and optionally
/// `grad_entropy = ∂L/∂H` (then `entropy` is required). `grad_logits` may be `logits` itself
/// (in place). `vocab_start` is 0 for full-vocabulary logits, or the shard's first id.
///
/// # Safety
/// As `calibrl_logits_forward`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_logits_backward(
    logits: *const DLTensor,
    labels: *const DLTensor,
    temperature: f64,
    vocab_start: i64,
    lse: *const DLTensor,
    entropy: *const DLTensor,
    grad_logprobs: *const DLTensor,
    grad_entropy: *const DLTensor,
    grad_logits: *mut DLTensor,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let args = Backward {
            input: LogitsInput::new(
                Tensor::from_raw(logits, "logits")?,
                Tensor::from_raw(labels, "labels")?,
                temperature,
                vocab_start,
            )?,
            lse: Tensor::from_raw(lse, "lse")?,
            entropy: Tensor::optional(entropy, "entropy")?,
            grad_logprobs: Tensor::from_raw(grad_logprobs, "grad_logprobs")?,
            grad_entropy: Tensor::optional(grad_entropy, "grad_entropy")?,
            grad_logits: Tensor::from_raw(grad_logits, "grad_logits")?,
        };
        logits::backward(&args, stream)
    })
}

/// Forward and backward in one call, for losses whose `∂L/∂ℓ` (`grad_logprobs`) and `∂L/∂H`
/// (`grad_entropy`, may be NULL; then `entropy` may be NULL too) are known per token before
/// the call (token-local losses with their normalisers given). Writes `logprobs`, `entropy`
/// (may be NULL unless `grad_entropy` is given) and `lse`, each `[N]` float32 or float64, and
/// `grad_logits` (the logits' dtype; may be `logits` itself, in place): the same values as
/// `calibrl_logits_forward` followed by `calibrl_logits_backward` with its saved `lse` and
/// `entropy`. Full vocabulary only. On CUDA sm_90+ one kernel reads each logits row once where
/// the row fits a thread-block cluster; elsewhere the two steps run in turn.
///
/// # Safety
/// As `calibrl_logits_forward`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_logits_forward_backward(
    logits: *const DLTensor,
    labels: *const DLTensor,
    temperature: f64,
    grad_logprobs: *const DLTensor,
    grad_entropy: *const DLTensor,
    logprobs: *mut DLTensor,
    entropy: *mut DLTensor,
    lse: *mut DLTensor,
    grad_logits: *mut DLTensor,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let args = ForwardBackward {
            input: LogitsInput::new(
                Tensor::from_raw(logits, "logits")?,
                Tensor::from_raw(labels, "labels")?,
                temperature,
                0,
            )?,
            grad_logprobs: Tensor::from_raw(grad_logprobs, "grad_logprobs")?,
            grad_entropy: Tensor::optional(grad_entropy, "grad_entropy")?,
            logprobs: Tensor::from_raw(logprobs, "logprobs")?,
            entropy: Tensor::optional(entropy, "entropy")?,
            lse: Tensor::from_raw(lse, "lse")?,
            grad_logits: Tensor::from_raw(grad_logits, "grad_logits")?,
        };
        logits::forward_backward(&args, stream)
    })
}

/// Phase 1 of the vocabulary-parallel forward: `stats[N, 4]` (f32) of the shard
/// `logits[:, vocab_start : vocab_start + V_local]`. All-gather them across the tensor-parallel
/// group into `[R, N, 4]` and call `calibrl_logits_shard_finish`.
///
/// # Safety
/// As `calibrl_logits_forward`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_logits_shard_stats(
    logits: *const DLTensor,
    labels: *const DLTensor,
    temperature: f64,
    vocab_start: i64,
    stats: *mut DLTensor,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let args = ShardStats {
            input: LogitsInput::new(
                Tensor::from_raw(logits, "logits")?,
                Tensor::from_raw(labels, "labels")?,
                temperature,
                vocab_start,
            )?,
            stats: Tensor::from_raw(stats, "stats")?,
        };
        logits::shard_stats(&args, stream)
    })
}

/// Phase 2: combines all-gathered statistics `[R, N, 4]` into `logprobs`, `entropy` (may be
/// NULL) and `lse`, each `[N]`. The backward then runs per shard with `calibrl_logits_backward`.
///
/// # Safety
/// As `calibrl_logits_forward`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_logits_shard_finish(
    stats: *const DLTensor,
    labels: *const DLTensor,
    logprobs: *mut DLTensor,
    entropy: *mut DLTensor,
    lse: *mut DLTensor,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let args = ShardFinish::new(
            Tensor::from_raw(stats, "stats")?,
            Tensor::from_raw(labels, "labels")?,
            Tensor::from_raw(logprobs, "logprobs")?,
            Tensor::optional(entropy, "entropy")?,
            Tensor::from_raw(lse, "lse")?,
        )?;
        logits::shard_finish(&args, stream)
    })
}
