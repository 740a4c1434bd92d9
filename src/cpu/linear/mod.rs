//! CPU fused linear path (see `crate::desc::linear`). Per chunk of tokens: GEMM 1 writes the
//! float32 logits `[chunk, V]` into the workspace (threads split V), the fused logits arithmetic
//! runs per row (threads split the rows) and, for gradients, turns the block into ∂L/∂z in
//! place; GEMM 2 forms `d_hidden` (threads split H) and GEMM 3 `d_weight` (threads split V).
//! The GEMMs are the `gemm` crate's f32 kernels; bf16 / f16 operands are converted to f32 in
//! blocks of `VOCAB_BLOCK` weight rows per thread, so no f32 copy of the weight is ever made.
//!
//! Every check runs before anything is written. `d_weight` is accumulated chunk by chunk, so
//! its range is proven before the pass: hidden, weight and bias are finite, the logits are
//! bounded by Cauchy–Schwarz, and each element of ∂L/∂z by (1/T)·(|g| + |h|·(1/e + |H|))
//! (p is clamped to ≤ 1).
//!
//! Modules: `gemm` (the GEMMs on f32 views), `bounds` (reads and range proofs before the pass),
//! `pass` (the chunk driver); the entry points below.

mod bounds;
mod gemm;
mod pass;

use crate::cpu::logits::stats_rows;
use crate::desc::linear::{
    LinearBackward, LinearForward, LinearForwardBackward, LinearGrads, LinearShardStats,
};
use crate::error::{Error, Result};
use crate::tensor::{try_vec, write_all, Tensor};
use bounds::{check_gradient_range, prepare, TokenGrads};
use pass::{finish_rows, run_pass, RowWork};

pub fn forward(args: &LinearForward) -> Result<()> {
    let prep = prepare(&args.input, true)?;
    let (stats, _) = run_pass(&args.input, &prep, RowWork::Stats, None)?;
    let (lp, ent, lse) = finish_rows(&prep, &stats);
    write_all(&[
        (Some(&args.logprobs), &lp),
        (args.entropy.as_ref(), &ent),
        (Some(&args.lse), &lse),
    ])
}

pub fn shard_stats(args: &LinearShardStats) -> Result<()> {
    let prep = prepare(&args.input, false)?;
    let (stats, _) = run_pass(&args.input, &prep, RowWork::Stats, None)?;
    write_all(&[(Some(&args.stats), &stats_rows(&stats)?)])
}

fn read_or_zero(t: &Option<Tensor>, n: usize, name: &str) -> Result<Vec<f64>> {
    match t {
        Some(t) => t.read_finite_f64(),
        None => try_vec(n, 0.0, name),
    }
}

/// Writes `d_hidden` from the f32 buffer (after `d_weight`, which the pass wrote in place).
fn write_d_hidden(grads: &LinearGrads, dh: &[f32]) -> Result<()> {
    let mut vals = try_vec(dh.len(), 0f64, "d_hidden")?;
    for (o, &x) in vals.iter_mut().zip(dh) {
        *o = x as f64;
    }
    grads.d_hidden.write_f64(&vals)
}

pub fn backward(args: &LinearBackward) -> Result<()> {
    let input = &args.input;
    let prep = prepare(input, false)?;
    let n = input.n;
    let lse = args.lse.read_finite_f64()?;
    let entropy = read_or_zero(&args.entropy, n, "entropy")?;
    let tg = TokenGrads {
        g: args.grad_logprobs.read_finite_f64()?,
        h: read_or_zero(&args.grad_entropy, n, "grad_entropy")?,
    };
    for k in (0..n).filter(|&k| prep.labels[k] >= 0) {
        for (name, x) in [("lse", lse[k]), ("entropy", entropy[k])] {
            if !(x as f32).is_finite() {
                return Err(Error::invalid(
                    name,
                    format!("element {k} is {x}, outside the float32 range of the computation"),
                ));
            }
        }
    }
    check_gradient_range(input, &prep, &tg, &|k| entropy[k].abs(), &args.grads)?;
    let work = RowWork::Grad {
        lse: &lse,
        entropy: &entropy,
        tg: &tg,
    };
    let (_, dh) = run_pass(input, &prep, work, Some(&args.grads))?;
    write_d_hidden(&args.grads, &dh)
}

pub fn forward_backward(args: &LinearForwardBackward) -> Result<()> {
    let input = &args.input;
    let prep = prepare(input, true)?;
    let n = input.n;
    let tg = TokenGrads {
        g: args.grad_logprobs.read_finite_f64()?,
        h: read_or_zero(&args.grad_entropy, n, "grad_entropy")?,
    };
    // 0 ≤ H ≤ ln V (up to rounding).
    let h_max = (input.v as f64).ln() + 1.0;
    check_gradient_range(input, &prep, &tg, &|_| h_max, &args.grads)?;
    let (stats, dh) = run_pass(
        input,
        &prep,
        RowWork::StatsAndGrad { tg: &tg },
        Some(&args.grads),
    )?;
    let (lp, ent, lse) = finish_rows(&prep, &stats);
    write_d_hidden(&args.grads, &dh)?;
    write_all(&[
        (Some(&args.logprobs), &lp),
        (args.entropy.as_ref(), &ent),
        (args.lse.as_ref(), &lse),
    ])
}
