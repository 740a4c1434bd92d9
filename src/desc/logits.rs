//! The fused logits path (SPEC §6): log-prob, entropy and log-sum-exp from logits in one pass,
//! the backward to d-logits (optionally in place), and the two-phase vocabulary-shard form.
//!
//! Conventions shared by both backends:
//! - `logits` is `[N, V]` (bf16, f16 or f32) with unit stride along V; rows may be strided.
//! - `labels` is `[N]` int32/int64, *global* vocabulary ids; a negative label marks an ignored
//!   row (log-prob, entropy, lse written as 0; its d-logits row is 0).
//! - `logprobs`, `entropy`, `lse` are `[N]` float outputs (f32 recommended; any float dtype).
//! - Phase-1 shard statistics are `[N, 4]` f32 per shard: row max m, Σ e^(u−m), Σ e^(u−m)·(u−m),
//!   and the target's u (0 when the label is outside the shard). The caller all-gathers them
//!   into `[R, N, 4]` and calls `shard_finish`.

use crate::error::{Error, Result};
use crate::tensor::{common_device, require_disjoint, DType, Device, Tensor};

pub const LOGITS_DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];
pub const OUT_DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];
pub const STATS_WIDTH: usize = 4;

/// Validated `[N, V]` logits plus labels and temperature.
pub struct LogitsInput<'a> {
    pub logits: Tensor<'a>,
    pub labels: Tensor<'a>,
    pub temperature: f64,
    /// First global vocabulary id held by `logits` (0 for a full vocabulary).
    pub vocab_start: i64,
    pub n: usize,
    pub v: usize,
    /// Row stride of `logits` in elements.
    pub row_stride: usize,
}

impl<'a> LogitsInput<'a> {
    pub fn new(
        logits: Tensor<'a>,
        labels: Tensor<'a>,
        temperature: f64,
        vocab_start: i64,
    ) -> Result<Self> {
        logits.require_dtype(&LOGITS_DTYPES)?;
        logits.require_ndim(2)?;
        labels.require_dtype(&[DType::I32, DType::I64])?;
        labels.require_ndim(1)?;
        labels.require_contiguous()?;
        let (n, v) = (logits.shape[0], logits.shape[1]);
        if labels.shape[0] != n {
            return Err(Error::shape(
                "labels",
                format!("has {} rows, `logits` has {n}", labels.shape[0]),
            ));
        }
        if v == 0 {
            return Err(Error::shape("logits", "vocabulary dimension is 0"));
        }
        if v > 1 && logits.strides[1] != 1 {
            return Err(Error::layout(
                "logits",
                "the vocabulary dimension must have stride 1",
            ));
        }
        let row_stride = if n > 1 { logits.strides[0] } else { v as isize };
        if row_stride < v as isize {
            return Err(Error::layout(
                "logits",
                format!("row stride {row_stride} is smaller than the vocabulary size {v}"),
            ));
        }
        check_temperature_and_vocab_start(temperature, vocab_start)?;
        Ok(LogitsInput {
            logits,
            labels,
            temperature,
            vocab_start,
            n,
            v,
            row_stride: row_stride as usize,
        })
    }
}

/// The temperature and a shard's first vocabulary id, as every logits-path call takes them
/// (also the fused linear path's, `crate::desc::linear`).
pub fn check_temperature_and_vocab_start(temperature: f64, vocab_start: i64) -> Result<()> {
    // Both backends scale by 1/T in f32: the reciprocal must be finite there too.
    if !(temperature.is_finite() && temperature > 0.0 && inv_temperature(temperature).is_finite()) {
        return Err(Error::invalid(
            "temperature",
            format!("{temperature} must be finite and > 0, with a finite float32 1/temperature"),
        ));
    }
    if vocab_start < 0 {
        return Err(Error::invalid(
            "vocab_start",
            format!("{vocab_start} is negative"),
        ));
    }
    Ok(())
}

/// 1/T as both backends use it (f32).
pub fn inv_temperature(temperature: f64) -> f32 {
    (1.0 / temperature) as f32
}

fn row_output(t: &Option<Tensor>, n: usize) -> Result<()> {
    if let Some(t) = t {
        t.require_dtype(&OUT_DTYPES)?;
        t.require_shape(&[n])?;
        t.require_contiguous()?;
    }
    Ok(())
}

/// Forward: `logprobs[k] = u[k,y_k] − lse_k`, `entropy[k] = H_k`, `lse[k] = lse_k`.
pub struct Forward<'a> {
    pub input: LogitsInput<'a>,
    pub logprobs: Tensor<'a>,
    pub entropy: Option<Tensor<'a>>,
    pub lse: Tensor<'a>,
}

impl Forward<'_> {
    pub fn validate(&self) -> Result<Device> {
        let n = self.input.n;
        row_output(&Some(self.logprobs.clone()), n)?;
        row_output(&self.entropy, n)?;
        row_output(&Some(self.lse.clone()), n)?;
        if self.input.vocab_start != 0 {
            return Err(Error::invalid(
                "vocab_start",
                "the full-vocabulary forward takes vocab_start = 0 (use the shard functions)",
            ));
        }
        let device = common_device(&[
            Some(&self.input.logits),
            Some(&self.input.labels),
            Some(&self.logprobs),
            self.entropy.as_ref(),
            Some(&self.lse),
        ])?;
        require_disjoint(
            &[Some(&self.logprobs), self.entropy.as_ref(), Some(&self.lse)],
            &[Some(&self.input.logits), Some(&self.input.labels)],
        )?;
        Ok(device)
    }
}

/// Backward: `grad_logits = (1/T)·[g·(δ − p) − h·p·(u − lse + H)]` for the rows of this
/// (possibly sharded) logits tensor. `grad_logits` may be the logits tensor itself (in place).
pub struct Backward<'a> {
    pub input: LogitsInput<'a>,
    /// Saved `lse` (global over shards).
    pub lse: Tensor<'a>,
    /// Saved entropy; required when `grad_entropy` is given.
    pub entropy: Option<Tensor<'a>>,
    pub grad_logprobs: Tensor<'a>,
    pub grad_entropy: Option<Tensor<'a>>,
    pub grad_logits: Tensor<'a>,
}

impl Backward<'_> {
    pub fn validate(&self) -> Result<Device> {
        let n = self.input.n;
        for t in [
            Some(&self.lse),
            self.entropy.as_ref(),
            Some(&self.grad_logprobs),
            self.grad_entropy.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            t.require_dtype(&OUT_DTYPES)?;
            t.require_shape(&[n])?;
            t.require_contiguous()?;
        }
        if self.grad_entropy.is_some() && self.entropy.is_none() {
            return Err(
                Error::null("entropy").with_reason("is required when `grad_entropy` is given")
            );
        }
        let g = &self.grad_logits;
        g.require_dtype(&LOGITS_DTYPES)?;
        g.require_shape(&self.input.logits.shape)?;
        // Every backend writes grad_logits in the logits' element type, in place or not.
        if g.dtype != self.input.logits.dtype {
            return Err(Error::dtype(
                "grad_logits",
                format!(
                    "is {}, but it must have the logits' dtype {}",
                    g.dtype.name(),
                    self.input.logits.dtype.name()
                ),
            ));
        }
        let same_buffer = g.ptr == self.input.logits.ptr && g.strides == self.input.logits.strides;
        if !same_buffer {
            if g.overlaps(&self.input.logits) {
                return Err(Error::invalid(
                    "grad_logits",
                    "partially overlaps `logits` (pass the logits tensor itself for in-place)",
                ));
            }
            if g.ndim() == 2 && g.shape[1] > 1 && g.strides[1] != 1 {
                return Err(Error::layout(
                    "grad_logits",
                    "the vocabulary dimension must have stride 1",
                ));
            }
            // Rows must not overlap each other (nor run backwards).
            if n > 1 && g.strides[0] < self.input.v as isize {
                return Err(Error::layout(
                    "grad_logits",
                    format!(
                        "row stride {} is smaller than the vocabulary size {}",
                        g.strides[0], self.input.v
                    ),
                ));
            }
        }
        let device = common_device(&[
            Some(&self.input.logits),
            Some(&self.input.labels),
            Some(&self.lse),
            self.entropy.as_ref(),
            Some(&self.grad_logprobs),
            self.grad_entropy.as_ref(),
            Some(&self.grad_logits),
        ])?;
        // In place (the logits tensor itself) is the one documented overlap; a partial
        // overlap with the logits was rejected above.
        require_disjoint(
            &[Some(&self.grad_logits)],
            &[
                Some(&self.input.labels),
                Some(&self.lse),
                self.entropy.as_ref(),
                Some(&self.grad_logprobs),
                self.grad_entropy.as_ref(),
            ],
        )?;
        Ok(device)
    }

    pub fn in_place(&self) -> bool {
        self.grad_logits.ptr == self.input.logits.ptr
    }
}

/// Phase 1 of the vocabulary-parallel forward: per-row statistics of this shard.
pub struct ShardStats<'a> {
    pub input: LogitsInput<'a>,
    /// `[N, 4]` f32 output.
    pub stats: Tensor<'a>,
}

impl ShardStats<'_> {
    pub fn validate(&self) -> Result<Device> {
        self.stats.require_dtype(&[DType::F32])?;
        self.stats.require_shape(&[self.input.n, STATS_WIDTH])?;
        self.stats.require_contiguous()?;
        let device = common_device(&[
            Some(&self.input.logits),
            Some(&self.input.labels),
            Some(&self.stats),
        ])?;
        require_disjoint(
            &[Some(&self.stats)],
            &[Some(&self.input.logits), Some(&self.input.labels)],
        )?;
        Ok(device)
    }
}

/// Phase 2: combines the all-gathered `[R, N, 4]` statistics into log-prob, entropy and lse.
pub struct ShardFinish<'a> {
    pub stats: Tensor<'a>,
    pub labels: Tensor<'a>,
    pub logprobs: Tensor<'a>,
    pub entropy: Option<Tensor<'a>>,
    pub lse: Tensor<'a>,
    pub shards: usize,
    pub n: usize,
}

impl<'a> ShardFinish<'a> {
    pub fn new(
        stats: Tensor<'a>,
        labels: Tensor<'a>,
        logprobs: Tensor<'a>,
        entropy: Option<Tensor<'a>>,
        lse: Tensor<'a>,
    ) -> Result<Self> {
        stats.require_dtype(&[DType::F32])?;
        stats.require_ndim(3)?;
        stats.require_contiguous()?;
        if stats.shape[2] != STATS_WIDTH || stats.shape[0] == 0 {
            return Err(Error::shape(
                "stats",
                format!("expected [R >= 1, N, {STATS_WIDTH}], got {:?}", stats.shape),
            ));
        }
        let (shards, n) = (stats.shape[0], stats.shape[1]);
        labels.require_dtype(&[DType::I32, DType::I64])?;
        labels.require_shape(&[n])?;
        labels.require_contiguous()?;
        row_output(&Some(logprobs.clone()), n)?;
        row_output(&entropy, n)?;
        row_output(&Some(lse.clone()), n)?;
        Ok(ShardFinish {
            stats,
            labels,
            logprobs,
            entropy,
            lse,
            shards,
            n,
        })
    }
    pub fn device(&self) -> Result<Device> {
        let device = common_device(&[
            Some(&self.stats),
            Some(&self.labels),
            Some(&self.logprobs),
            self.entropy.as_ref(),
            Some(&self.lse),
        ])?;
        require_disjoint(
            &[Some(&self.logprobs), self.entropy.as_ref(), Some(&self.lse)],
            &[Some(&self.stats), Some(&self.labels)],
        )?;
        Ok(device)
    }
}

/// Forward and backward in one call, for losses whose `∂L/∂ℓ` and `∂L/∂H` are known per token
/// before the call (token-local losses with their normalisers given): the forward's outputs and
/// `grad_logits` exactly as `Forward` followed by `Backward` with the saved `lse` and `entropy`.
/// Full vocabulary only. `logprobs`, `entropy`, `lse` are float32 or float64 (the backward reads
/// them back where the backend runs the two steps); `entropy` is required with `grad_entropy`.
/// On CUDA this is where the single-pass kernel applies (`crate::cuda::logits`).
pub struct ForwardBackward<'a> {
    pub input: LogitsInput<'a>,
    pub grad_logprobs: Tensor<'a>,
    pub grad_entropy: Option<Tensor<'a>>,
    pub logprobs: Tensor<'a>,
    pub entropy: Option<Tensor<'a>>,
    pub lse: Tensor<'a>,
    pub grad_logits: Tensor<'a>,
}

impl<'a> ForwardBackward<'a> {
    fn input_view(&self) -> LogitsInput<'a> {
        LogitsInput {
            logits: self.input.logits.clone(),
            labels: self.input.labels.clone(),
            ..self.input
        }
    }

    /// The forward step of this call.
    pub fn forward(&self) -> Forward<'a> {
        Forward {
            input: self.input_view(),
            logprobs: self.logprobs.clone(),
            entropy: self.entropy.clone(),
            lse: self.lse.clone(),
        }
    }

    /// The backward step of this call, reading the forward's `lse` and `entropy`.
    pub fn backward(&self) -> Backward<'a> {
        Backward {
            input: self.input_view(),
            lse: self.lse.clone(),
            entropy: self.entropy.clone(),
            grad_logprobs: self.grad_logprobs.clone(),
            grad_entropy: self.grad_entropy.clone(),
            grad_logits: self.grad_logits.clone(),
        }
    }

    pub fn validate(&self) -> Result<Device> {
        for t in [Some(&self.logprobs), self.entropy.as_ref(), Some(&self.lse)]
            .into_iter()
            .flatten()
        {
            t.require_dtype(&[DType::F32, DType::F64])?;
        }
        let device = self.forward().validate()?;
        self.backward().validate()?;
        // The forward's outputs must not alias what the backward reads or writes.
        require_disjoint(
            &[Some(&self.logprobs), self.entropy.as_ref(), Some(&self.lse)],
            &[
                Some(&self.grad_logprobs),
                self.grad_entropy.as_ref(),
                Some(&self.grad_logits),
            ],
        )?;
        Ok(device)
    }
}
