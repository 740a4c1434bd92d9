//! Group advantages and the loss on CUDA (kernels in `cuda/loss.cu`).
//!
//! Same semantics as the CPU backend (`crate::cpu::loss`, computed in double on the device),
//! with these CUDA-specific rules:
//! - Values are not copied back to be checked: NaN inputs propagate, an out-of-range group id or
//!   expert slot yields NaN in the affected outputs, instead of an error status.
//! - Every tensor must be contiguous.
//! - Workspace: each (device, stream) pair gets a cached device buffer, grown on demand and
//!   never freed while the process lives (a captured CUDA graph may still point at it). Make one
//!   call outside stream capture before capturing, so the allocation happens then.
//! - `host_metrics` synchronises the stream; otherwise nothing synchronises.

use super::compile::KernelSource;
use super::device::{device, driver_error, Device};
use super::workspace::{launch_struct, tickets, workspace};
use crate::config::{Activation, Aggregation, Baseline, Config, DeltaMode, KlKind, LossKind};
use crate::desc::loss::{Advantages, Layout, Loss, Rows};
use crate::desc::metrics::{CalibrlMetrics, METRICS_LEN};
use crate::desc::Stream;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use cudarc::driver::{result as drv, sys};
use std::ffi::c_void;

/// The loss family (SPEC §3–§4, and the expert baseline of §7).
pub const LOSS: KernelSource = KernelSource {
    name: "loss",
    source: include_str!("../../cuda/loss.cu"),
    kernels: &[
        "calibrl_group_stats",
        "calibrl_group_advantages",
        "calibrl_loss_counts",
        "calibrl_loss_rows",
        "calibrl_loss_f32",
        "calibrl_loss_f64",
        "calibrl_loss_bf16",
        "calibrl_loss_f16",
        "calibrl_loss_any",
        "calibrl_collect_experts",
        "calibrl_cov_prepare",
        "calibrl_cov_histogram",
    ],
};

const BLOCK_FIELDS: usize = 18; // BLOCK_FIELDS in cuda/loss.cu
const EDGE_FIELDS: usize = 4; // EDGE_FIELDS in cuda/loss.cu
const ROW_WS: usize = 5; // ROW_WS in cuda/loss.cu
const FINAL_FIELDS: usize = 4; // FINAL_FIELDS in cuda/loss.cu
const THREADS: u32 = 256; // LOSS_THREADS in cuda/loss.cu
/// Tokens a thread of the row pass loads before using them (BATCH in cuda/loss.cu).
const BATCH: usize = 8;
/// The most threads that share a row in the row pass: a whole block (few long rows).
const MAX_TEAM: usize = THREADS as usize;
/// The token pass's blocks own a multiple of this many consecutive tokens: a multiple of every
/// instantiation's tile (LOSS_THREADS × 16-byte vector: 512 f64 … 2048 bf16 tokens).
const TOKEN_QUANTUM: usize = 2048;
/// Resident blocks per SM the grids are sized for (the kernels loop over rows or tiles).
const BLOCKS_PER_SM: usize = 4;

/// dtype codes (`DT_*` in cuda/loss.cu).
fn code(t: &Tensor) -> i64 {
    match t.dtype {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::BF16 => 2,
        DType::F16 => 3,
        DType::U8 | DType::Bool => 4,
        DType::I8 => 5,
        DType::I32 => 6,
        DType::I64 => 7,
    }
}

fn contiguous(t: &Tensor) -> Result<()> {
    t.require_contiguous()
}

/// (pointer, dtype code) of an optional tensor.
fn opt(t: Option<&Tensor>) -> Result<(*const c_void, i64)> {
    match t {
        None => Ok((std::ptr::null(), 0)),
        Some(t) => {
            contiguous(t)?;
            Ok((t.ptr as *const c_void, code(t)))
        }
    }
}

fn req(t: &Tensor) -> Result<(*const c_void, i64)> {
    opt(Some(t))
}

fn launch<P>(
    dev: &Device,
    kernel: &'static str,
    blocks: usize,
    threads: u32,
    stream: Stream,
    params: &mut P,
) -> Result<()> {
    launch_struct(dev, &LOSS, kernel, blocks, threads, stream, params)
}

/// Mirrors `AdvParams` in cuda/loss.cu (every field 8 bytes wide, so the layouts agree).
#[repr(C)]
struct AdvParams {
    rewards: *const c_void,
    rewards_dt: i64,
    group_ids: *const c_void,
    group_ids_dt: i64,
    correct: *const c_void,
    correct_dt: i64,
    is_expert: *const c_void,
    is_expert_dt: i64,
    advantages: *const c_void,
    advantages_dt: i64,
    weights: *const c_void,
    weights_dt: i64,
    signs: *const c_void,
    signs_dt: i64,
    stats: sys::CUdeviceptr,
    rows: i64,
    num_groups: i64,
    adv_eps: f64,
    correct_threshold: f64,
    norm_by_std: i64,
    rarity_weighting: i64,
}

pub fn group_advantages(
    cfg: &Config,
    args: &Advantages,
    ordinal: i32,
    stream: Stream,
) -> Result<()> {
    let rows = args.rewards.shape[0];
    let (rewards, rewards_dt) = req(&args.rewards)?;
    let (group_ids, group_ids_dt) = req(&args.group_ids)?;
    let (correct, correct_dt) = opt(args.correct.as_ref())?;
    let (is_expert, is_expert_dt) = opt(args.is_expert.as_ref())?;
    let (advantages, advantages_dt) = req(&args.advantages)?;
    let (weights, weights_dt) = req(&args.weights)?;
    let (signs, signs_dt) = req(&args.signs)?;
    if rows == 0 {
        return Ok(());
    }
    let dev = device(ordinal)?;
    let stats = workspace(dev, ordinal, stream, args.num_groups.max(1) * 3 * 8)?;
    let mut p = AdvParams {
        rewards,
        rewards_dt,
        group_ids,
        group_ids_dt,
        correct,
        correct_dt,
        is_expert,
        is_expert_dt,
        advantages,
        advantages_dt,
        weights,
        weights_dt,
        signs,
        signs_dt,
        stats,
        rows: rows as i64,
        num_groups: args.num_groups as i64,
        adv_eps: cfg.adv_eps,
        correct_threshold: cfg.correct_threshold,
        norm_by_std: cfg.norm_by_std as i64,
        rarity_weighting: cfg.rarity_weighting as i64,
    };
    if args.num_groups > 0 {
        launch(
            dev,
            "calibrl_group_stats",
            args.num_groups,
            THREADS,
            stream,
            &mut p,
        )?;
    }
    launch(
        dev,
        "calibrl_group_advantages",
        rows.div_ceil(THREADS as usize),
        THREADS,
        stream,
        &mut p,
    )
}

/// Mirrors `LossParams` in cuda/loss.cu.
#[repr(C)]
struct LossParams {
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
    block_ws: sys::CUdeviceptr,
    final_ws: sys::CUdeviceptr,
    tickets: sys::CUdeviceptr,
    row_ws: sys::CUdeviceptr,
    team_log2: i64,
    row_pass: i64,
    block_tokens: i64,
    numel: i64,
    counts: i64,
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
    cov: super::cov::CovParams,
}

/// Where the kernel takes N_tok and N_seq from (`COUNTS_*` in cuda/loss.cu).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counts {
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

/// The same requirements the CPU reference enforces before computing.
fn check_inputs(cfg: &Config, args: &Loss) -> Result<()> {
    let baseline_present = match cfg.baseline {
        // The authors' arithmetic explores against ℓ* = 0 without expert data.
        Baseline::Expert => args.expert.is_some() || cfg.authors(),
        Baseline::RefPolicy => args.ref_logprobs.is_some(),
    };
    if cfg.effective_lambda() > 0.0 && !baseline_present {
        return Err(match cfg.baseline {
            Baseline::Expert => Error::null("expert_logprobs")
                .with_reason("λ > 0 with the expert baseline needs it"),
            Baseline::RefPolicy => Error::null("ref_logprobs")
                .with_reason("λ > 0 with the ref_policy baseline needs it"),
        });
    }
    if cfg.entropy_coef != 0.0 && args.entropy.is_none() {
        return Err(Error::null("entropy").with_reason("entropy_coef != 0 needs it"));
    }
    if cfg.kl_coef != 0.0 && args.ref_logprobs.is_none() {
        return Err(Error::null("ref_logprobs").with_reason("kl_coef != 0 needs it"));
    }
    Ok(())
}

/// The loss kernel instantiated for the common dtype of ℓ, ℓold and ∂L/∂ℓ, or the mixed one.
fn loss_kernel(args: &Loss) -> &'static str {
    let dt = args.policy.values.dtype;
    let same = |t: Option<&Tensor>| t.map_or(true, |t| t.dtype == dt);
    if !(same(args.old_logprobs.as_ref()) && same(args.grad_logprobs.as_ref())) {
        return "calibrl_loss_any";
    }
    match dt {
        DType::F32 => "calibrl_loss_f32",
        DType::F64 => "calibrl_loss_f64",
        DType::BF16 => "calibrl_loss_bf16",
        DType::F16 => "calibrl_loss_f16",
        _ => "calibrl_loss_any",
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

fn loss_params(cfg: &Config, args: &Loss) -> Result<LossParams> {
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
        cov: super::cov::params(cfg, args.policy.values.numel()),
    })
}

pub fn loss(
    cfg: &Config,
    args: &Loss,
    host_metrics: Option<&mut CalibrlMetrics>,
    ordinal: i32,
    stream: Stream,
) -> Result<()> {
    check_inputs(cfg, args)?;
    let mut p = loss_params(cfg, args)?;
    let dev = device(ordinal)?;
    let rows = args.policy.rows;
    let max_blocks = dev.sms * BLOCKS_PER_SM;
    let teams = (THREADS as usize) >> p.team_log2;
    let row_blocks = rows.div_ceil(teams).clamp(1, max_blocks);
    let count_blocks = rows.div_ceil(THREADS as usize / 32).clamp(1, max_blocks);
    // The token pass: consecutive tokens per block, whole quanta, at most max_blocks blocks.
    let numel = args.policy.values.numel();
    let quanta = numel.div_ceil(TOKEN_QUANTUM).max(1);
    let block_tokens = quanta.div_ceil(max_blocks) * TOKEN_QUANTUM;
    let blocks = numel.div_ceil(block_tokens).max(1);
    p.block_tokens = block_tokens as i64;
    // Workspace: the final values (N_tok, N_seq, metrics), the blocks' partial sums and edge
    // rows, the row pass's per-row results, then the entropy control's (src/cuda/cov.rs).
    let final_doubles = FINAL_FIELDS + METRICS_LEN;
    let block_doubles = blocks.max(count_blocks) * (BLOCK_FIELDS + EDGE_FIELDS);
    let row_doubles = if p.row_pass != 0 { rows * ROW_WS } else { 0 };
    let loss_bytes = (final_doubles + block_doubles + row_doubles) * 8;
    let ws = workspace(dev, ordinal, stream, loss_bytes + p.cov.workspace_bytes())?;
    p.final_ws = ws;
    p.block_ws = ws + (final_doubles * 8) as u64;
    p.row_ws = p.block_ws + (block_doubles * 8) as u64;
    p.cov.set_workspace(ws + loss_bytes as u64);
    p.tickets = tickets(dev, ordinal, stream)?;
    for (kernel, cov_blocks, pass) in p.cov.launches(max_blocks) {
        p.cov.set_pass(pass);
        launch(dev, kernel, cov_blocks, super::cov::THREADS, stream, &mut p)?;
    }
    if p.counts == Counts::Kernel as i64 {
        launch(
            dev,
            "calibrl_loss_counts",
            count_blocks,
            THREADS,
            stream,
            &mut p,
        )?;
    }
    if p.row_pass != 0 && rows > 0 {
        launch(
            dev,
            "calibrl_loss_rows",
            row_blocks,
            THREADS,
            stream,
            &mut p,
        )?;
    }
    launch(dev, loss_kernel(args), blocks, THREADS, stream, &mut p)?;
    if let Some(h) = host_metrics {
        *h = read_metrics(dev, stream, p.final_ws)?;
    }
    Ok(())
}

/// Waits for `stream` and reads the metrics the loss kernel's last block wrote to `final_ws`.
fn read_metrics(
    dev: &Device,
    stream: Stream,
    final_ws: sys::CUdeviceptr,
) -> Result<CalibrlMetrics> {
    let mut values = [0f64; METRICS_LEN];
    let _ctx = dev.activate()?;
    // SAFETY: the context is current; `final_ws` holds FINAL_FIELDS + METRICS_LEN doubles
    // written by the loss kernel's last block on `stream`, which is synchronised first.
    unsafe {
        drv::stream::synchronize(stream as sys::CUstream)
            .map_err(|e| driver_error("cuStreamSynchronize", e))?;
        drv::memcpy_dtoh_sync(&mut values, final_ws + (FINAL_FIELDS * 8) as u64)
            .map_err(|e| driver_error("cuMemcpyDtoH (metrics)", e))?;
    }
    Ok(CalibrlMetrics::from_array(&values))
}
