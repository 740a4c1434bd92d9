//! The loss launch: the inputs the configuration needs, the grid and workspace geometry, the
//! passes in order (entropy control, counts, rows, tokens) and the metrics read back on request.

use super::args::{launch, THREADS};
use super::params::{loss_params, Counts};
use crate::config::{Baseline, Config};
use crate::cuda::cov;
use crate::cuda::device::{device, driver_error, Device};
use crate::cuda::workspace::{tickets, workspace};
use crate::desc::loss::Loss;
use crate::desc::metrics::{CalibrlMetrics, METRICS_LEN};
use crate::desc::Stream;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use cudarc::driver::{result as drv, sys};

const BLOCK_FIELDS: usize = 18; // BLOCK_FIELDS in cuda/loss.cu
const EDGE_FIELDS: usize = 4; // EDGE_FIELDS in cuda/loss.cu
const ROW_WS: usize = 5; // ROW_WS in cuda/loss.cu
const FINAL_FIELDS: usize = 4; // FINAL_FIELDS in cuda/loss.cu
/// The token pass's blocks own a multiple of this many consecutive tokens: a multiple of every
/// instantiation's tile (LOSS_THREADS × 16-byte vector: 512 f64 … 2048 bf16 tokens).
const TOKEN_QUANTUM: usize = 2048;
/// Resident blocks per SM the grids are sized for (the kernels loop over rows or tiles).
const BLOCKS_PER_SM: usize = 4;

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
        launch(dev, kernel, cov_blocks, cov::THREADS, stream, &mut p)?;
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
