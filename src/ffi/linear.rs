//! C ABI of the fused linear path: from hidden states and the LM head to log-prob, entropy and
//! lse per token, and back to the gradients of both, in chunks of tokens through a caller-owned
//! workspace instead of an `[N, V]` logits tensor. See `crate::desc::linear` for the
//! conventions.

use super::{deref, guard};
use crate::desc::linear::{
    LinearBackward, LinearForward, LinearForwardBackward, LinearGrads, LinearInput,
    LinearShardStats,
};
use crate::desc::Stream;
use crate::error::{CalibrlStatus, Error};
use crate::ops::linear;
use crate::tensor::{DLTensor, Tensor};

/// The inputs every fused linear call takes. `hidden [N, H]`, `weight [V, H]` (this rank's
/// vocabulary shard in the vocabulary-parallel form) and `bias [V]` (NULL: none) share one
/// dtype (bf16, f16 or f32); the logits are `z = hidden·weightᵀ + bias`, scaled by
/// 1/`temperature` as in `calibrl_logits_forward`. `labels [N]` int32/int64 are global ids
/// (negative: ignored row). `vocab_start` is the shard's first id (0 for the full vocabulary).
/// `chunk_size` tokens go through per GEMM, and `workspace` (any contiguous tensor on the
/// call's device, 16-byte aligned) holds at least `calibrl_fused_linear_workspace_size` bytes
/// for that chunk size; its contents are scratch.
#[repr(C)]
pub struct CalibrlLinearInput {
    pub hidden: *const DLTensor,
    pub weight: *const DLTensor,
    pub bias: *const DLTensor,
    pub labels: *const DLTensor,
    pub temperature: f64,
    pub vocab_start: i64,
    pub chunk_size: i64,
    pub workspace: *mut DLTensor,
}

unsafe fn input<'a>(raw: *const CalibrlLinearInput) -> crate::error::Result<LinearInput<'a>> {
    let a = deref(raw, "input")?;
    LinearInput::new(
        Tensor::from_raw(a.hidden, "hidden")?,
        Tensor::from_raw(a.weight, "weight")?,
        Tensor::optional(a.bias, "bias")?,
        Tensor::from_raw(a.labels, "labels")?,
        a.temperature,
        a.vocab_start,
        a.chunk_size,
        Tensor::from_raw(a.workspace, "workspace")?,
    )
}

unsafe fn grads<'a>(
    d_hidden: *mut DLTensor,
    d_weight: *mut DLTensor,
    d_bias: *mut DLTensor,
    accumulate: i32,
) -> crate::error::Result<LinearGrads<'a>> {
    Ok(LinearGrads {
        d_hidden: Tensor::from_raw(d_hidden, "d_hidden")?,
        d_weight: Tensor::from_raw(d_weight, "d_weight")?,
        d_bias: Tensor::optional(d_bias, "d_bias")?,
        accumulate: accumulate != 0,
    })
}

/// Writes into `*bytes` the workspace size for chunks of `chunk_size` tokens of
/// `hidden [N, H]` against `weight [V, H]` on their device (the CPU backend: chunk_size·V·4).
///
/// # Safety
/// `hidden` and `weight` are valid `DLTensor`s (their data is not read); `bytes` is valid.
#[no_mangle]
pub unsafe extern "C" fn calibrl_fused_linear_workspace_size(
    hidden: *const DLTensor,
    weight: *const DLTensor,
    chunk_size: i64,
    bytes: *mut usize,
) -> CalibrlStatus {
    guard(|| {
        if bytes.is_null() {
            return Err(Error::null("bytes"));
        }
        let size = linear::workspace_size(
            &Tensor::from_raw(hidden, "hidden")?,
            &Tensor::from_raw(weight, "weight")?,
            chunk_size,
        )?;
        *bytes = size;
        Ok(())
    })
}

/// Forward over the full vocabulary (`vocab_start` 0): writes `logprobs[N]`, `entropy[N]`
/// (may be NULL) and `lse[N]` (save it for the backward), as `calibrl_logits_forward` on
/// `hidden·weightᵀ + bias`.
///
/// # Safety
/// Every non-NULL pointer is a valid `DLTensor` (or `calibrl_linear_input`) whose memory lives
/// on its stated device; `stream` is NULL or a `CUstream` of the tensors' CUDA context.
#[no_mangle]
pub unsafe extern "C" fn calibrl_fused_linear_forward(
    input: *const CalibrlLinearInput,
    logprobs: *mut DLTensor,
    entropy: *mut DLTensor,
    lse: *mut DLTensor,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let args = LinearForward {
            input: self::input(input)?,
            logprobs: Tensor::from_raw(logprobs, "logprobs")?,
            entropy: Tensor::optional(entropy, "entropy")?,
            lse: Tensor::from_raw(lse, "lse")?,
        };
        linear::forward(&args, stream)
    })
}

/// Phase 1 of the vocabulary-parallel forward: `stats[N, 4]` (f32) of this rank's weight shard,
/// exactly as `calibrl_logits_shard_stats` of the shard's logits. All-gather them into
/// `[R, N, 4]`, call `calibrl_logits_shard_finish`, and run the backward per shard.
///
/// # Safety
/// As `calibrl_fused_linear_forward`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_fused_linear_shard_stats(
    input: *const CalibrlLinearInput,
    stats: *mut DLTensor,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let args = LinearShardStats {
            input: self::input(input)?,
            stats: Tensor::from_raw(stats, "stats")?,
        };
        linear::shard_stats(&args, stream)
    })
}

/// Backward from `grad_logprobs = ∂L/∂ℓ` and `grad_entropy = ∂L/∂H` (may be NULL; then
/// `entropy` may be NULL too) with the saved `lse` (and `entropy`), recomputing each chunk's
/// logits. Writes `d_hidden [N, H]` (any float dtype, overwritten; with a vocabulary shard it is
/// this shard's part: sum it over the group), and `d_weight [V, H]` and `d_bias [V]` (float32,
/// `d_bias` may be NULL), overwritten or, when `accumulate` is non-zero, added to.
///
/// # Safety
/// As `calibrl_fused_linear_forward`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_fused_linear_backward(
    input: *const CalibrlLinearInput,
    lse: *const DLTensor,
    entropy: *const DLTensor,
    grad_logprobs: *const DLTensor,
    grad_entropy: *const DLTensor,
    d_hidden: *mut DLTensor,
    d_weight: *mut DLTensor,
    d_bias: *mut DLTensor,
    accumulate: i32,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let args = LinearBackward {
            input: self::input(input)?,
            lse: Tensor::from_raw(lse, "lse")?,
            entropy: Tensor::optional(entropy, "entropy")?,
            grad_logprobs: Tensor::from_raw(grad_logprobs, "grad_logprobs")?,
            grad_entropy: Tensor::optional(grad_entropy, "grad_entropy")?,
            grads: grads(d_hidden, d_weight, d_bias, accumulate)?,
        };
        linear::backward(&args, stream)
    })
}

/// Forward and backward in one pass (3 GEMMs per chunk), for losses whose `∂L/∂ℓ` and `∂L/∂H`
/// are known per token before the call. Full vocabulary only. Writes `logprobs` (and
/// `entropy`, `lse` when non-NULL; float32 or wider) and the gradients as
/// `calibrl_fused_linear_backward`.
///
/// # Safety
/// As `calibrl_fused_linear_forward`.
#[no_mangle]
pub unsafe extern "C" fn calibrl_fused_linear_forward_backward(
    input: *const CalibrlLinearInput,
    grad_logprobs: *const DLTensor,
    grad_entropy: *const DLTensor,
    logprobs: *mut DLTensor,
    entropy: *mut DLTensor,
    lse: *mut DLTensor,
    d_hidden: *mut DLTensor,
    d_weight: *mut DLTensor,
    d_bias: *mut DLTensor,
    accumulate: i32,
    stream: Stream,
) -> CalibrlStatus {
    guard(|| {
        let args = LinearForwardBackward {
            input: self::input(input)?,
            grad_logprobs: Tensor::from_raw(grad_logprobs, "grad_logprobs")?,
            grad_entropy: Tensor::optional(grad_entropy, "grad_entropy")?,
            logprobs: Tensor::from_raw(logprobs, "logprobs")?,
            entropy: Tensor::optional(entropy, "entropy")?,
            lse: Tensor::optional(lse, "lse")?,
            grads: grads(d_hidden, d_weight, d_bias, accumulate)?,
        };
        linear::forward_backward(&args, stream)
    })
}
