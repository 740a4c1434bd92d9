//! A loss descriptor's host tensors in, the outputs written (only on success): reading the
//! batch, checking the counted values, writing all outputs or none.

use super::batch::{ExpertBaseline, LossBatch};
use super::compute::compute;
use crate::config::Config;
use crate::desc::loss::Loss;
use crate::desc::metrics::CalibrlMetrics as Metrics;
use crate::error::{Error, Result};

/// Reads a loss call's host tensors, computes, and writes the outputs (only on success).
pub fn run(cfg: &Config, args: &Loss, host_metrics: Option<&mut Metrics>) -> Result<()> {
    let batch = read_batch(args)?;
    let out = compute(cfg, &batch)?;
    let metrics = out.metrics.to_array();
    // Extreme but finite inputs (say ℓ − ℓ_old = 1000) can overflow: report it, write nothing.
    if let Some(i) = metrics.iter().position(|v| !v.is_finite()) {
        return Err(Error::new(
            crate::error::CalibrlStatus::NonFinite,
            format!(
                "`metrics`: value {i} of the result is {} (the inputs are finite but out of \
                 range, e.g. a log-ratio that overflows exp)",
                metrics[i]
            ),
        ));
    }
    crate::tensor::write_all(&[
        (args.grad_logprobs.as_ref(), &out.grad_logprobs),
        (args.grad_entropy.as_ref(), &out.grad_entropy),
        (args.metrics.as_ref(), &metrics),
    ])?;
    if let Some(h) = host_metrics {
        *h = out.metrics;
    }
    Ok(())
}

/// Checks that the counted entries (mask ≠ 0) of `v` are finite and zeroes the others.
fn counted_only(name: &str, mut v: Vec<f64>, mask: &[f64]) -> Result<Vec<f64>> {
    for (k, (x, &m)) in v.iter_mut().zip(mask).enumerate() {
        if m == 0.0 {
            *x = 0.0;
        } else if !x.is_finite() {
            return Err(Error::non_finite(name, k, *x));
        }
    }
    Ok(v)
}

/// The policy's log-probabilities (this step's forward output, the one input every term
/// differentiates) are ≤ 0 (SPEC §4): a counted value above [`LOGPROB_TOLERANCE`] is a caller's
/// mistake (logits, or a sign error), not rounding. Masked entries were zeroed. The other
/// log-prob inputs (old, reference, expert) are taken as given (docs/abi.md).
fn require_log_probs(name: &str, values: &[f64]) -> Result<()> {
    match values.iter().position(|&v| v > LOGPROB_TOLERANCE) {
        None => Ok(()),
        Some(k) => Err(Error::invalid(
            name,
            format!(
                "element {k} is {}: a log-probability is <= 0 (up to {LOGPROB_TOLERANCE} of \
                 rounding)",
                values[k]
            ),
        )),
    }
}

/// How far above 0 a log-probability may be (rounding of a log-softmax computed in low
/// precision) before it is rejected.
const LOGPROB_TOLERANCE: f64 = 0.1;

fn read_batch(args: &Loss) -> Result<LossBatch> {
    let rows = args.policy.ranges()?;
    let mask = args.policy.mask_values()?;
    let b = rows.len();
    // Only tokens that count must be finite: padding may hold anything, and is replaced by 0
    // here so that no value (loss, Δ, metric) can ever read it.
    let counted = |name: &'static str, v: Vec<f64>| counted_only(name, v, &mask);
    let logprobs = counted("logprobs", args.policy.values.read_f64()?)?;
    let opt = |t: &Option<crate::tensor::Tensor>, name| -> Result<Option<Vec<f64>>> {
        t.as_ref().map(|t| counted(name, t.read_f64()?)).transpose()
    };
    let old_logprobs = opt(&args.old_logprobs, "old_logprobs")?;
    let ref_logprobs = opt(&args.ref_logprobs, "ref_logprobs")?;
    let entropy = opt(&args.entropy, "entropy")?;
    let token_weights = opt(&args.token_weights, "token_weights")?;
    if let Some((k, r)) = token_weights.as_ref().and_then(|w| {
        w.iter()
            .zip(&mask)
            .enumerate()
            .find(|(_, (r, m))| **m != 0.0 && **r < 0.0)
            .map(|(k, (r, _))| (k, *r))
    }) {
        return Err(Error::invalid(
            "token_weights",
            format!("element {k} is {r}; importance weights must be >= 0"),
        ));
    }
    require_log_probs("logprobs", &logprobs)?;
    let advantages = args.advantages.read_finite_f64()?;
    let weights = args.weights.read_finite_f64()?;
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| **w < 0.0) {
        return Err(Error::invalid(
            "weights",
            format!("element {i} is {w}; rarity weights are >= 0 (|A|, or 1)"),
        ));
    }
    let signs = args.signs.read_finite_f64()?;
    if let Some((i, s)) = signs.iter().enumerate().find(|(_, s)| s.abs() != 1.0) {
        return Err(Error::invalid(
            "signs",
            format!("element {i} is {s}, expected +1 or -1"),
        ));
    }
    let is_expert = args.is_expert.as_ref().map(|t| t.read_bool()).transpose()?;
    let expert = match &args.expert {
        None => None,
        Some(e) => {
            let erows = e.ranges()?;
            let emask = e.mask_values()?;
            let values = counted_only("expert_logprobs", e.values.read_f64()?, &emask)?;
            let index = args.expert_index.as_ref().expect("validated").read_i64()?;
            let p = erows.len() as i64;
            if let Some((i, s)) = index.iter().enumerate().find(|(_, &s)| s < -1 || s >= p) {
                return Err(Error::invalid(
                    "expert_index",
                    format!("row {i}: slot {s} is outside [-1, {p}) (expert rows given: {p})"),
                ));
            }
            Some(ExpertBaseline {
                rows: erows,
                logprobs: values,
                mask: emask,
                index,
            })
        }
    };
    debug_assert_eq!(advantages.len(), b);
    Ok(LossBatch {
        rows,
        logprobs,
        mask,
        old_logprobs,
        ref_logprobs,
        entropy,
        token_weights,
        advantages,
        weights,
        signs,
        is_expert,
        expert,
        normalizers: args.normalizers,
    })
}
