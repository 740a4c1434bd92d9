//! The loss kernels' parameter block: the descriptor's tensors and the configuration in the
//! layout of `LossParams` in cuda/loss.cu, and the modes chosen from them (where the counts
//! come from, whether the row pass runs, how many threads share a row). The workspace fields
//! are left for the launch to fill (`run.rs`).

use super::args::{opt, req, THREADS};
use crate::config::{Activation, Aggregation, Baseline, Config, DeltaMode, KlKind, LossKind};
use crate::cuda::cov::{self, CovParams};
use crate::desc::loss::{Layout, Loss, Rows};
use crate::error::Result;
use cudarc::driver::sys;
use std::ffi::c_void;

/// Tokens a thread of the row pass loads before using them (BATCH in cuda/loss.cu).
const BATCH: usize = 8;
/// The most threads that share a row in the row pass: a whole block (few long rows).
const MAX_TEAM: usize = THREADS as usize;

/// Mirrors `LossParams` in cuda/loss.cu.
#[repr(C)]
pub(super) struct LossParams {
    logprobs: *const c_void,
    logprobs_dt: i64,
    offsets: *const c_void,
    offsets_dt: i64,
    rows: i64,
    seq_len: i64,
    mask: *const c_void,
    mask_dt: i64,
    old_logprobs: *const c_void,
    old_dt: i64,
    ref_logprobs: *const c_void,
    ref_dt: i64,
    entropy: *const c_void,
    entropy_dt: i64,
    token_weights: *const c_void,
    token_weights_dt: i64,
    advantages: *const c_void,
    advantages_dt: i64,
    weights: *const c_void,
    weights_dt: i64,
    signs: *const c_void,
    signs_dt: i64,
    is_expert: *const c_void,
    is_expert_dt: i64,
    expert_logprobs: *const c_void,
    expert_dt: i64,
    expert_offsets: *const c_void,
    expert_offsets_dt: i64,
    expert_rows: i64,
    expert_seq_len: i64,
    expert_mask: *const c_void,
    expert_mask_dt: i64,
    expert_index: *const c_void,
    expert_index_dt: i64,
    grad_logprobs: *const c_void,
    grad_dt: i64,
    grad_entropy: *const c_void,
    grad_entropy_dt: i64,
    metrics: *const c_void,
    metrics_dt: i64,
    pub(super) block_ws: sys::CUdeviceptr,
    pub(super) final_ws: sys::CUdeviceptr,
    pub(super) tickets: sys::CUdeviceptr,
    pub(super) row_ws: sys::CUdeviceptr,
    pub(super) team_log2: i64,
    pub(super) row_pass: i64,
    pub(super) block_tokens: i64,
    numel: i64,
    pub(super) counts: i64,
    loss_kind: i64,
    token_aligned: i64,
    length_normalize: i64,
    activation: i64,
    baseline_ref: i64,
    agg: i64,
    kl_kind: i64,
    authors: i64,
    dual_on: i64,
    norm_tokens: f64,
    norm_seqs: f64,
    norm_all_tokens: f64,
    norm_all_seqs: f64,
    t_norm: f64,
    alpha: f64,
    lambda: f64,
    clip_low: f64,
    clip_high: f64,
    dual_clip: f64,
    entropy_coef: f64,
    kl_coef: f64,
    luffy_gamma: f64,
    pub(super) cov: CovParams,
}

/// Where the kernel takes N_tok and N_seq from (`COUNTS_*` in cuda/loss.cu).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Counts {
    /// The caller's global normalisers.
    Given = 0,
    /// Counted by `calibrl_loss_counts` before the loss kernel.
    Kernel = 1,
    /// Every row is trained and there is no mask: the layout's token and row counts.
    AllRows = 2,
}

/// (offsets pointer, offsets dtype, padded row length) of a row structure.
fn layout(rows: &Rows) -> Result<(*const c_void, i64, i64)> {
    match rows.layout {
        Layout::Packed => {
            let (p, dt) = req(rows.offsets.as_ref().expect("packed layout has offsets"))?;
            Ok((p, dt, 0))
        }
        Layout::Padded { seq_len } => Ok((std::ptr::null(), 0, seq_len as i64)),
    }
}

/// log2 of the threads that share one row in the row pass: about two batches of BATCH tokens
/// per thread for the mean row length, between 2 threads (many short rows) and a block (few
/// long rows: 8 × 4096 still gives 8 full blocks).
fn team_log2(tokens: usize, rows: usize) -> i64 {
    let threads = tokens.div_ceil(rows.max(1)).div_ceil(2 * BATCH);
    threads
        .clamp(2, MAX_TEAM)
        .next_power_of_two()
        .trailing_zeros() as i64
}

/// Whether a row sum is needed (sequence Δ with a baseline, seq-mean-token-mean): then
/// `calibrl_loss_rows` runs before the token pass (`has_baseline` in cuda/loss.cu).
fn needs_row_pass(cfg: &Config, args: &Loss) -> bool {
    let baseline = match cfg.baseline {
        Baseline::RefPolicy => args.ref_logprobs.is_some(),
        // The authors' arithmetic explores against ℓ* = 0 without expert data.
        Baseline::Expert => args.expert.is_some() || cfg.authors(),
    };
    cfg.agg == Aggregation::SeqMeanTokenMean || (cfg.delta_mode == DeltaMode::Sequence && baseline)
}

fn counts_mode(cfg: &Config, args: &Loss) -> Counts {
    if args.normalizers.is_some() {
        Counts::Given
    } else if args.policy.mask.is_none()
        && args.policy.layout != Layout::Packed
        && (args.is_expert.is_none() || cfg.trains_expert_rows())
    {
        // Padded rows all have the same length: all empty or none (a packed row may be empty).
        // (Under the authors' arithmetic expert rows count apart from the rollouts: Kernel.)
        Counts::AllRows
    } else {
        Counts::Kernel
    }
}

/// The parameter block of `args` under `cfg`, its workspace pointers and `block_tokens` still 0
/// (set by the launch once the grid is sized).
pub(super) fn loss_params(cfg: &Config, args: &Loss) -> Result<LossParams> {
    let (logprobs, logprobs_dt) = req(&args.policy.values)?;
    let (offsets, offsets_dt, seq_len) = layout(&args.policy)?;
    let (mask, mask_dt) = opt(args.policy.mask.as_ref())?;
    let (old_logprobs, old_dt) = opt(args.old_logprobs.as_ref())?;
    let (ref_logprobs, ref_dt) = opt(args.ref_logprobs.as_ref())?;
    let (entropy, entropy_dt) = opt(args.entropy.as_ref())?;
    let (token_weights, token_weights_dt) = opt(args.token_weights.as_ref())?;
    let (advantages, advantages_dt) = req(&args.advantages)?;
    let (weights, weights_dt) = req(&args.weights)?;
    let (signs, signs_dt) = req(&args.signs)?;
    let (is_expert, is_expert_dt) = opt(args.is_expert.as_ref())?;
    let (expert_logprobs, expert_dt) = opt(args.expert.as_ref().map(|e| &e.values))?;
    let (expert_offsets, expert_offsets_dt, expert_seq_len) = match &args.expert {
        Some(e) => layout(e)?,
        None => (std::ptr::null(), 0, 0),
    };
    let (expert_mask, expert_mask_dt) = opt(args.expert.as_ref().and_then(|e| e.mask.as_ref()))?;
    let (expert_index, expert_index_dt) = opt(args.expert_index.as_ref())?;
    let (grad_logprobs, grad_dt) = opt(args.grad_logprobs.as_ref())?;
    let (grad_entropy, grad_entropy_dt) = opt(args.grad_entropy.as_ref())?;
    let (metrics, metrics_dt) = opt(args.metrics.as_ref())?;
    Ok(LossParams {
        logprobs,
        logprobs_dt,
        offsets,
        offsets_dt,
        rows: args.policy.rows as i64,
        seq_len,
        mask,
        mask_dt,
        old_logprobs,
        old_dt,
        ref_logprobs,
        ref_dt,
        entropy,
        entropy_dt,
        token_weights,
        token_weights_dt,
        advantages,
        advantages_dt,
        weights,
        weights_dt,
        signs,
        signs_dt,
        is_expert,
        is_expert_dt,
        expert_logprobs,
        expert_dt,
        expert_offsets,
        expert_offsets_dt,
        expert_rows: args.expert.as_ref().map_or(0, |e| e.rows) as i64,
        expert_seq_len,
        expert_mask,
        expert_mask_dt,
        expert_index,
        expert_index_dt,
        grad_logprobs,
        grad_dt,
        grad_entropy,
        grad_entropy_dt,
        metrics,
        metrics_dt,
        block_ws: 0,
        final_ws: 0,
        tickets: 0,
        row_ws: 0,
        team_log2: team_log2(args.policy.values.numel(), args.policy.rows),
        row_pass: needs_row_pass(cfg, args) as i64,
        block_tokens: 0,
        numel: args.policy.values.numel() as i64,
        counts: counts_mode(cfg, args) as i64,
        loss_kind: match cfg.loss {
            LossKind::Calibrl => 0,
            LossKind::Grpo => 1,
            LossKind::Luffy => 2,
            LossKind::Rlplus => 3,
        },
        token_aligned: (cfg.delta_mode == DeltaMode::TokenAligned) as i64,
        length_normalize: cfg.length_normalize as i64,
        activation: match cfg.activation {
            Activation::LeakyRelu => 0,
            Activation::Relu => 1,
            Activation::Tanh => 2,
            Activation::Sigmoid => 3,
            Activation::Huber => 4,
        },
        baseline_ref: (cfg.baseline == Baseline::RefPolicy) as i64,
        agg: match cfg.agg {
            Aggregation::TokenMean => 0,
            Aggregation::SeqMeanTokenSum => 1,
            Aggregation::SeqMeanTokenMean => 2,
            Aggregation::SeqMeanTokenSumNorm => 3,
            Aggregation::TokenSum => 4,
        },
        kl_kind: match cfg.kl_kind {
            KlKind::K1 => 0,
            KlKind::Abs => 1,
            KlKind::K2 => 2,
            KlKind::K3 => 3,
        },
        authors: cfg.authors() as i64,
        dual_on: cfg.dual_clip_on() as i64,
        norm_tokens: args.normalizers.map_or(0.0, |n| n.token_count),
        norm_seqs: args.normalizers.map_or(0.0, |n| n.seq_count),
        norm_all_tokens: args.normalizers.map_or(0.0, |n| n.all_token_count),
        norm_all_seqs: args.normalizers.map_or(0.0, |n| n.all_seq_count),
        t_norm: cfg.t_norm.unwrap_or(1.0),
        alpha: cfg.alpha,
        lambda: cfg.lambda,
        clip_low: cfg.clip_low,
        clip_high: cfg.clip_high,
        dual_clip: cfg.dual_clip,
        entropy_coef: cfg.entropy_coef,
        kl_coef: cfg.kl_coef,
        luffy_gamma: cfg.luffy_gamma,
        cov: cov::params(cfg, args.policy.values.numel()),
    })
}
