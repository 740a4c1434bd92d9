//! The fused linear path: from hidden states and the LM head to log-prob, entropy and lse (and
//! back to the gradients of both) without an `[N, V]` logits tensor. Tokens go through in
//! chunks: a GEMM writes the chunk's logits `z = hidden·weightᵀ + bias` into a caller-owned
//! workspace, the fused logits arithmetic of SPEC §6 runs on it, and the backward forms
//! `d_hidden = ∂L/∂z · weight` and `d_weight += (∂L/∂z)ᵀ · hidden` from it.
//!
//! Conventions (as the logits path, see [`crate::desc::logits`]):
//! - `hidden` is `[N, H]`, `weight` `[V, H]` (a vocabulary shard `[V_local, H]` in the
//!   vocabulary-parallel form), `bias` `[V]` (optional), all of one dtype among bf16, f16, f32,
//!   with unit stride along H; rows may be strided.
//! - `labels` `[N]` int32/int64 global ids; negative marks an ignored row.
//! - `workspace` is any contiguous tensor of at least `workspace_bytes(chunk, V)` bytes on the
//!   call's device, 16-byte aligned; its contents on entry do not matter and on return are
//!   unspecified. `chunk_size` tokens go through per GEMM.
//! - `d_weight` (and `d_bias`) are float32: they accumulate over chunks (and, with
//!   `accumulate`, over calls). `d_hidden` is any float dtype, overwritten.

use super::logits::{check_temperature_and_vocab_start, LOGITS_DTYPES, OUT_DTYPES, STATS_WIDTH};
use crate::error::{CalibrlStatus, Error, Result};
use crate::tensor::{common_device, DType, Device, Tensor};

/// Bytes of workspace the CPU backend needs for chunks of `chunk` tokens over `v` vocabulary
/// entries: one float32 logits block `[chunk, v]`.
pub fn workspace_bytes(chunk: usize, v: usize) -> Result<usize> {
    chunk
        .checked_mul(v)
        .and_then(|e| e.checked_mul(4))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| {
            Error::invalid(
                "chunk_size",
                format!("{chunk} tokens × {v} vocabulary entries overflow the address space"),
            )
        })
}

/// Bytes NVIDIA recommends giving cuBLAS as its workspace on Hopper (cuBLAS documentation,
/// `cublasSetWorkspace`: 32 MiB on Hopper, 4 MiB elsewhere); the CUDA backend passes this part
/// of the caller's workspace to cuBLAS so that cuBLAS never allocates.
pub(crate) const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// The CUDA backend's workspace, in byte offsets from its (16-byte aligned) start: the chunk's
/// logits in the input dtype `[chunk, ld]` (rows padded to 16 bytes), a vector of ones
/// `[chunk]` in the input dtype (bias broadcast and `d_bias`), float32 scratch `[chunk]` for
/// lse and entropy (the combined call), then cuBLAS's workspace, 256-byte aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaWorkspace {
    /// Row stride of the logits block, in elements.
    pub ld: usize,
    pub ones: usize,
    pub lse: usize,
    pub entropy: usize,
    /// cuBLAS's part starts at the first 256-byte boundary at or after this offset.
    pub cublas: usize,
    pub total: usize,
}

/// The CUDA workspace layout for chunks of `chunk` tokens over `v` entries of `dtype` logits.
pub fn cuda_workspace(chunk: usize, v: usize, dtype: DType) -> Result<CudaWorkspace> {
    let size = dtype.size();
    let ld = v.div_ceil(16 / size) * (16 / size);
    let bytes = |offset: usize, n: usize, elt: usize| -> Option<usize> {
        offset.checked_add(n.checked_mul(elt)?.checked_next_multiple_of(16)?)
    };
    (|| {
        let ones = chunk.checked_mul(ld)?.checked_mul(size)?;
        let lse = bytes(ones, chunk, size)?;
        let entropy = bytes(lse, chunk, 4)?;
        let cublas = bytes(entropy, chunk, 4)?;
        let total = cublas.checked_add(CUBLAS_WORKSPACE_BYTES + 256)?;
        (total <= isize::MAX as usize).then_some(CudaWorkspace {
            ld,
            ones,
            lse,
            entropy,
            cublas,
            total,
        })
    })()
    .ok_or_else(|| {
        Error::invalid(
            "chunk_size",
            format!("{chunk} tokens × {v} vocabulary entries overflow the address space"),
        )
    })
}

/// The workspace bytes a call needs on `device` (CPU: [`workspace_bytes`]; CUDA:
/// [`cuda_workspace`]).
pub fn workspace_bytes_on(device: Device, chunk: usize, v: usize, dtype: DType) -> Result<usize> {
    match device {
        Device::Cpu => workspace_bytes(chunk, v),
        Device::Cuda(_) => Ok(cuda_workspace(chunk, v, dtype)?.total),
    }
}

/// Validates `chunk_size` as the ABI passes it.
pub fn chunk_size(chunk: i64) -> Result<usize> {
    if chunk < 1 {
        return Err(Error::invalid(
            "chunk_size",
            format!("{chunk} must be >= 1"),
        ));
    }
    Ok(chunk as usize)
}

/// Row stride of a 2-D tensor with unit stride along its last dimension.
fn row_stride(t: &Tensor, inner: usize) -> Result<usize> {
    if inner > 1 && t.strides[1] != 1 {
        return Err(Error::layout(
            t.name,
            "the last dimension must have stride 1",
        ));
    }
    let rows = t.shape[0];
    let stride = if rows > 1 {
        t.strides[0]
    } else {
        inner as isize
    };
    if stride < inner as isize {
        return Err(Error::layout(
            t.name,
            format!("row stride {stride} is smaller than the row length {inner}"),
        ));
    }
    Ok(stride as usize)
}

/// Validated hidden states, LM head (or its shard), labels, temperature and workspace.
pub struct LinearInput<'a> {
    pub hidden: Tensor<'a>,
    pub weight: Tensor<'a>,
    pub bias: Option<Tensor<'a>>,
    pub labels: Tensor<'a>,
    pub temperature: f64,
    /// First global vocabulary id of `weight`'s rows (0 for a full vocabulary).
    pub vocab_start: i64,
    /// Tokens per GEMM (at most `n`).
    pub chunk: usize,
    pub workspace: Tensor<'a>,
    pub n: usize,
    pub h: usize,
    pub v: usize,
    pub hidden_stride: usize,
    pub weight_stride: usize,
}

impl<'a> LinearInput<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        hidden: Tensor<'a>,
        weight: Tensor<'a>,
        bias: Option<Tensor<'a>>,
        labels: Tensor<'a>,
        temperature: f64,
        vocab_start: i64,
        chunk_size: i64,
        workspace: Tensor<'a>,
    ) -> Result<Self> {
        hidden.require_dtype(&LOGITS_DTYPES)?;
        hidden.require_ndim(2)?;
        weight.require_ndim(2)?;
        let (n, h) = (hidden.shape[0], hidden.shape[1]);
        let v = weight.shape[0];
        if weight.dtype != hidden.dtype {
            return Err(Error::dtype(
                "weight",
                format!(
                    "is {}, but `hidden` is {}",
                    weight.dtype.name(),
                    hidden.dtype.name()
                ),
            ));
        }
        if weight.shape[1] != h {
            return Err(Error::shape(
                "weight",
                format!("has {} columns, `hidden` has H = {h}", weight.shape[1]),
            ));
        }
        if v == 0 {
            return Err(Error::shape("weight", "vocabulary dimension is 0"));
        }
        if h == 0 {
            return Err(Error::shape("hidden", "hidden dimension H is 0"));
        }
        let hidden_stride = row_stride(&hidden, h)?;
        let weight_stride = row_stride(&weight, h)?;
        if let Some(b) = &bias {
            if b.dtype != hidden.dtype {
                return Err(Error::dtype(
                    "bias",
                    format!(
                        "is {}, but `hidden` is {}",
                        b.dtype.name(),
                        hidden.dtype.name()
                    ),
                ));
            }
            b.require_shape(&[v])?;
            b.require_contiguous()?;
        }
        labels.require_dtype(&[DType::I32, DType::I64])?;
        labels.require_shape(&[n])?;
        labels.require_contiguous()?;
        check_temperature_and_vocab_start(temperature, vocab_start)?;
        let chunk = self::chunk_size(chunk_size)?.min(n.max(1));
        let need = workspace_bytes_on(workspace.device, chunk, v, hidden.dtype)?;
        workspace.require_contiguous()?;
        let have = workspace.numel() * workspace.dtype.size();
        if have < need {
            return Err(Error::new(
                CalibrlStatus::BufferTooSmall,
                format!(
                    "`workspace`: holds {have} bytes, chunks of {chunk} tokens over {v} \
                     vocabulary entries need {need}"
                ),
            ));
        }
        if need > 0 && workspace.ptr as usize % 16 != 0 {
            return Err(Error::layout("workspace", "data must be 16-byte aligned"));
        }
        for t in [Some(&hidden), Some(&weight), bias.as_ref(), Some(&labels)]
            .into_iter()
            .flatten()
        {
            if need > 0 && t.numel() > 0 && workspace.overlaps(t) {
                return Err(Error::invalid(
                    "workspace",
                    format!("overlaps `{}`", t.name),
                ));
            }
        }
        Ok(LinearInput {
            hidden,
            weight,
            bias,
            labels,
            temperature,
            vocab_start,
            chunk,
            workspace,
            n,
            h,
            v,
            hidden_stride,
            weight_stride,
        })
    }

    fn tensors(&self) -> [Option<&Tensor<'a>>; 5] {
        [
            Some(&self.hidden),
            Some(&self.weight),
            self.bias.as_ref(),
            Some(&self.labels),
            Some(&self.workspace),
        ]
    }

    fn require_full_vocab(&self) -> Result<()> {
        if self.vocab_start != 0 {
            return Err(Error::invalid(
                "vocab_start",
                "this call takes the full vocabulary, vocab_start = 0 (shards: use \
                 calibrl_fused_linear_shard_stats, calibrl_logits_shard_finish and the backward)",
            ));
        }
        Ok(())
    }
}

/// `[N]` float per-token tensors (inputs or outputs).
fn rows(ts: &[Option<&Tensor>], n: usize) -> Result<()> {
    for t in ts.iter().flatten() {
        t.require_dtype(&OUT_DTYPES)?;
        t.require_shape(&[n])?;
        t.require_contiguous()?;
    }
    Ok(())
}

/// Outputs must not share memory with any input nor with each other.
fn disjoint(outputs: &[Option<&Tensor>], inputs: &[Option<&Tensor>]) -> Result<()> {
    let outs: Vec<&Tensor> = outputs.iter().flatten().copied().collect();
    for (i, o) in outs.iter().enumerate() {
        if o.numel() == 0 {
            continue;
        }
        for other in inputs.iter().flatten().chain(outs[..i].iter()) {
            if other.numel() > 0 && o.overlaps(other) {
                return Err(Error::invalid(o.name, format!("overlaps `{}`", other.name)));
            }
        }
    }
    Ok(())
}

/// Forward: `logprobs`, `entropy` (optional) and `lse`, each `[N]`.
pub struct LinearForward<'a> {
    pub input: LinearInput<'a>,
    pub logprobs: Tensor<'a>,
    pub entropy: Option<Tensor<'a>>,
    pub lse: Tensor<'a>,
}

impl LinearForward<'_> {
    pub fn validate(&self) -> Result<Device> {
        self.input.require_full_vocab()?;
        let outs = [Some(&self.logprobs), self.entropy.as_ref(), Some(&self.lse)];
        rows(&outs, self.input.n)?;
        disjoint(&outs, &self.input.tensors())?;
        let mut all = self.input.tensors().to_vec();
        all.extend(outs);
        common_device(&all)
    }
}

/// Phase 1 of the vocabulary-parallel forward: `[N, 4]` float32 statistics of this shard (as
/// `calibrl_logits_shard_stats`), to all-gather and finish with `calibrl_logits_shard_finish`.
pub struct LinearShardStats<'a> {
    pub input: LinearInput<'a>,
    pub stats: Tensor<'a>,
}

impl LinearShardStats<'_> {
    pub fn validate(&self) -> Result<Device> {
        self.stats.require_dtype(&[DType::F32])?;
        self.stats.require_shape(&[self.input.n, STATS_WIDTH])?;
        self.stats.require_contiguous()?;
        disjoint(&[Some(&self.stats)], &self.input.tensors())?;
        let mut all = self.input.tensors().to_vec();
        all.push(Some(&self.stats));
        common_device(&all)
    }
}

/// Gradient outputs: `d_hidden [N, H]` (overwritten), `d_weight [V, H]` and `d_bias [V]`
/// (float32, overwritten or accumulated into).
pub struct LinearGrads<'a> {
    pub d_hidden: Tensor<'a>,
    pub d_weight: Tensor<'a>,
    pub d_bias: Option<Tensor<'a>>,
    pub accumulate: bool,
}

impl LinearGrads<'_> {
    fn validate(&self, input: &LinearInput) -> Result<()> {
        self.d_hidden.require_dtype(&OUT_DTYPES)?;
        self.d_hidden.require_shape(&[input.n, input.h])?;
        self.d_hidden.require_contiguous()?;
        self.d_weight.require_dtype(&[DType::F32])?;
        self.d_weight.require_shape(&[input.v, input.h])?;
        self.d_weight.require_contiguous()?;
        if let Some(db) = &self.d_bias {
            if input.bias.is_none() {
                return Err(Error::invalid("d_bias", "is given but `bias` is NULL"));
            }
            db.require_dtype(&[DType::F32])?;
            db.require_shape(&[input.v])?;
            db.require_contiguous()?;
        }
        Ok(())
    }
    fn tensors(&self) -> [Option<&Tensor<'_>>; 3] {
        [
            Some(&self.d_hidden),
            Some(&self.d_weight),
            self.d_bias.as_ref(),
        ]
    }
}

/// Backward from `grad_logprobs = ∂L/∂ℓ` and `grad_entropy = ∂L/∂H` (optional; then the saved
/// `entropy` is required) with the saved global `lse`, recomputing each chunk's logits. With a
/// shard, `d_hidden` is this shard's part: sum it over the tensor-parallel group.
pub struct LinearBackward<'a> {
    pub input: LinearInput<'a>,
    pub lse: Tensor<'a>,
    pub entropy: Option<Tensor<'a>>,
    pub grad_logprobs: Tensor<'a>,
    pub grad_entropy: Option<Tensor<'a>>,
    pub grads: LinearGrads<'a>,
}

impl LinearBackward<'_> {
    pub fn validate(&self) -> Result<Device> {
        let ins = [
            Some(&self.lse),
            self.entropy.as_ref(),
            Some(&self.grad_logprobs),
            self.grad_entropy.as_ref(),
        ];
        rows(&ins, self.input.n)?;
        if self.grad_entropy.is_some() && self.entropy.is_none() {
            return Err(
                Error::null("entropy").with_reason("is required when `grad_entropy` is given")
            );
        }
        self.grads.validate(&self.input)?;
        let mut inputs = self.input.tensors().to_vec();
        inputs.extend(ins);
        disjoint(&self.grads.tensors(), &inputs)?;
        inputs.extend(self.grads.tensors());
        common_device(&inputs)
    }
}

/// Forward and backward in one pass over the chunks, for losses whose `∂L/∂ℓ` and `∂L/∂H` per
/// token are known before the call (3 GEMMs per chunk). Full vocabulary only.
pub struct LinearForwardBackward<'a> {
    pub input: LinearInput<'a>,
    pub grad_logprobs: Tensor<'a>,
    pub grad_entropy: Option<Tensor<'a>>,
    pub logprobs: Tensor<'a>,
    pub entropy: Option<Tensor<'a>>,
    pub lse: Option<Tensor<'a>>,
    pub grads: LinearGrads<'a>,
}

impl LinearForwardBackward<'_> {
    pub fn validate(&self) -> Result<Device> {
        self.input.require_full_vocab()?;
        let ins = [Some(&self.grad_logprobs), self.grad_entropy.as_ref()];
        let outs = [
            Some(&self.logprobs),
            self.entropy.as_ref(),
            self.lse.as_ref(),
        ];
        rows(&ins, self.input.n)?;
        rows(&outs, self.input.n)?;
        // d_weight is written during the pass, the per-token outputs after it: their range
        // must be certain before the pass starts, which float16 (max 65504) is not.
        for t in outs.into_iter().flatten() {
            if t.dtype == DType::F16 {
                return Err(Error::dtype(
                    t.name,
                    "float16 is not accepted by the combined call (use float32)",
                ));
            }
        }
        self.grads.validate(&self.input)?;
        let mut inputs = self.input.tensors().to_vec();
        inputs.extend(ins);
        let mut all_outs = outs.to_vec();
        all_outs.extend(self.grads.tensors());
        disjoint(&all_outs, &inputs)?;
        inputs.extend(all_outs);
        common_device(&inputs)
    }
}
