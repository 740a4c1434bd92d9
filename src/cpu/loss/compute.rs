//! The loss of one call (SPEC §4): aggregation over rows and tokens, the denominators, the
//! gradient with respect to ℓ and H, and the metrics.

use super::baseline::explore_baseline;
use super::batch::{LossBatch, LossOutput};
use super::terms::{activation, clipped_pg, fsum, kl_cov_pg, kl_term, masked, off_policy};
use crate::config::{Aggregation, Baseline, Config, DeltaMode, EntropyControl};
use crate::desc::metrics::{CalibrlMetrics as Metrics, CalibrlNormalizers as Normalizers};
use crate::error::{Error, Result};
use crate::tensor::{out_of_memory, try_collect, try_vec};

/// The denominators of one call (SPEC §4.5, §4.7): `tokens`/`seqs` for L_pg and L_explore,
/// `all_tokens`/`all_seqs` for entropy and KL (every row under the authors' arithmetic, else
/// the same rows).
struct Denominators {
    tokens: f64,
    seqs: f64,
    all_tokens: f64,
    all_seqs: f64,
}

impl Denominators {
    /// The caller's global normalisers (an all-row count left 0 means "the same as the
    /// rollout-row count"), or this call's own counts.
    fn resolve(
        given: Option<Normalizers>,
        local: Denominators,
        expert_tokens: f64,
    ) -> Result<Self> {
        let Some(n) = given else {
            return Ok(local);
        };
        if expert_tokens > 0.0 {
            // Left 0, the all-row counts say the mini-batch has no expert-row token; this call has.
            for (name, v) in [
                ("normalizers.all_token_count", n.all_token_count),
                ("normalizers.all_seq_count", n.all_seq_count),
            ] {
                if v == 0.0 {
                    return Err(Error::invalid(
                        name,
                        format!(
                            "is 0 (= the rollout-row count) but this call counts {expert_tokens} \
                             expert-row tokens; the `authors` preset needs every row's count"
                        ),
                    ));
                }
            }
        }
        let or = |all: f64, base: f64| if all == 0.0 { base } else { all };
        Ok(Denominators {
            tokens: n.token_count,
            seqs: n.seq_count,
            all_tokens: or(n.all_token_count, n.token_count),
            all_seqs: or(n.all_seq_count, n.seq_count),
        })
    }
}

pub fn compute(cfg: &Config, batch: &LossBatch) -> Result<LossOutput> {
    let b = batch.rows.len();
    let expert_row = |i: usize| batch.is_expert.as_ref().is_some_and(|e| e[i]);
    // Rows that are trained: rollouts, plus expert rows for LUFFY / RL-PLUS.
    let trained = |i: usize| !expert_row(i) || cfg.trains_expert_rows();
    // SPEC §4.7: the authors' arithmetic counts every row in the regularisers and the metrics
    // (an untrained expert row's p and exploration term are 0).
    let authors = cfg.authors();
    let counted_row = |i: usize| trained(i) || authors;
    // Working memory is requested fallibly (an error status, never an abort; docs/abi.md).
    let n_tokens = try_collect(
        batch
            .rows
            .iter()
            .map(|r| fsum(batch.mask[r.clone()].iter().copied())),
        "logprobs",
    )?;
    let tokens_of =
        |row: &dyn Fn(usize) -> bool| fsum((0..b).filter(|&i| row(i)).map(|i| n_tokens[i]));
    // A row without counted tokens adds nothing and is not counted in N_seq (SPEC §4.5).
    let seqs_of = |row: &dyn Fn(usize) -> bool| {
        (0..b).filter(|&i| row(i) && n_tokens[i] > 0.0).count() as f64
    };
    let local = Denominators {
        tokens: tokens_of(&trained),
        seqs: seqs_of(&trained),
        all_tokens: tokens_of(&counted_row),
        all_seqs: seqs_of(&counted_row),
    };
    let (local_tokens, local_seqs) = (local.tokens, local.seqs);
    let expert_tokens = local.all_tokens - local.tokens;
    let norm = Denominators::resolve(batch.normalizers, local, expert_tokens)?;
    require_global_counts(norm.tokens, norm.seqs, local_tokens, local_seqs)?;
    let inv = |x: f64| if x > 0.0 { 1.0 / x } else { 0.0 };
    let weight = |i: usize, tokens: f64, seqs: f64| match cfg.agg {
        Aggregation::TokenMean => inv(tokens),
        Aggregation::SeqMeanTokenSum => inv(seqs),
        Aggregation::SeqMeanTokenMean => inv(seqs) * inv(n_tokens[i]),
        Aggregation::SeqMeanTokenSumNorm => inv(cfg.t_norm.unwrap_or(1.0)),
        Aggregation::TokenSum => 1.0,
    };
    // L_pg and L_explore over the rollout rows' counts; entropy and KL over every row's.
    let agg_weight = |i: usize| weight(i, norm.tokens, norm.seqs);
    let agg_weight_all = |i: usize| weight(i, norm.all_tokens, norm.all_seqs);

    let lambda = cfg.effective_lambda();
    let baseline = explore_baseline(cfg, batch, authors)?;
    require_inputs(cfg, batch, lambda > 0.0 && baseline.is_none())?;
    let (selected, cov_frac) = cov_selection(cfg, batch, expert_row)?;

    let mut out = LossOutput {
        grad_logprobs: try_vec(batch.logprobs.len(), 0.0, "grad_logprobs")?,
        grad_entropy: try_vec(batch.logprobs.len(), 0.0, "grad_entropy")?,
        metrics: Metrics {
            cov_selected_frac: cov_frac,
            ..Metrics::default()
        },
    };
    let m = &mut out.metrics;
    let (mut clip_n, mut lower_n, mut kl_sum, mut rollout_tokens) = (0.0, 0.0, 0.0, 0.0);
    let (mut delta_sum, mut delta_n) = (0.0, 0.0);

    for i in (0..b).filter(|&i| counted_row(i)) {
        let pg_row = trained(i);
        let a = batch.advantages[i];
        let w = batch.weights[i];
        let c = batch.signs[i];
        let aw = agg_weight(i);
        let aw_all = agg_weight_all(i);
        let is_exp = expert_row(i);
        for (t, k) in batch.rows[i].clone().enumerate() {
            if batch.mask[k] == 0.0 {
                continue;
            }
            let logp = batch.logprobs[k];
            let old = batch.old_logprobs.as_ref().map_or(logp, |o| o[k]);
            let (p, dp) = if is_exp && pg_row {
                off_policy(cfg, a, logp, old)
            } else {
                let (p, dp, clipped, lower) = clipped_pg(cfg, a, logp, old);
                clip_n += clipped as u8 as f64;
                lower_n += lower as u8 as f64;
                kl_sum += old - logp;
                rollout_tokens += 1.0;
                match cfg.entropy_control {
                    _ if !pg_row => (0.0, 0.0),
                    EntropyControl::ClipCov if selected[k] => (0.0, 0.0),
                    EntropyControl::KlCov => kl_cov_pg(cfg, a, logp, old, selected[k]),
                    // Clip-Cov's other tokens: max(p1, p2), no dual clip (dual_clip_on).
                    _ => (p, dp),
                }
            };
            // ρ is a constant per token (no gradient flows into it), as in verl.
            let rho = batch.token_weights.as_ref().map_or(1.0, |r| r[k]);
            m.pg_loss += aw * rho * p;
            out.grad_logprobs[k] += aw * rho * dp;
            if let Some(h) = &batch.entropy {
                m.entropy_loss += aw_all * h[k];
                out.grad_entropy[k] = -cfg.entropy_coef * aw_all;
            }
            if let Some(r) = &batch.ref_logprobs {
                let (kv, dk) = kl_term(cfg.kl_kind, logp, r[k]);
                m.kl_loss += aw_all * kv;
                out.grad_logprobs[k] += cfg.kl_coef * aw_all * dk;
            }
            if let (DeltaMode::TokenAligned, Some(base), false) =
                (cfg.delta_mode, &baseline, is_exp)
            {
                if let Some(bt) = base.token(i, t, k) {
                    let delta = logp - bt;
                    let (phi, dphi) = activation(cfg, -c * delta);
                    m.explore_loss += aw * w * phi;
                    out.grad_logprobs[k] += lambda * aw * w * dphi * -c;
                    delta_sum += delta;
                    delta_n += 1.0;
                }
            }
        }
        if let (DeltaMode::Sequence, Some(base), false, true) =
            (cfg.delta_mode, &baseline, is_exp, n_tokens[i] > 0.0)
        {
            if let Some(e) = base.sequence(cfg, batch, i) {
                let scale = if cfg.length_normalize {
                    inv(n_tokens[i])
                } else {
                    1.0
                };
                let s = fsum(
                    batch.rows[i]
                        .clone()
                        .map(|k| masked(batch.mask[k], batch.logprobs[k])),
                ) * scale;
                let delta = s - e;
                let (phi, dphi) = activation(cfg, -c * delta);
                let inv_seq = inv(norm.seqs);
                m.explore_loss += inv_seq * w * phi;
                let g = lambda * inv_seq * w * dphi * -c * scale;
                for k in batch.rows[i].clone() {
                    out.grad_logprobs[k] += g * batch.mask[k];
                }
                delta_sum += delta;
                delta_n += 1.0;
            }
        }
    }

    m.loss = m.pg_loss + lambda * m.explore_loss - cfg.entropy_coef * m.entropy_loss
        + cfg.kl_coef * m.kl_loss;
    m.clipfrac = mean(clip_n, rollout_tokens);
    m.clipfrac_lower = mean(lower_n, rollout_tokens);
    m.ppo_kl = mean(kl_sum, rollout_tokens);
    m.mean_delta = mean(delta_sum, delta_n);
    // Per-row metrics over rollouts (every row in the authors' arithmetic).
    let mut rollouts = Vec::new();
    rollouts
        .try_reserve_exact(b)
        .map_err(|_| out_of_memory("advantages", b, std::mem::size_of::<usize>()))?;
    rollouts.extend((0..b).filter(|&i| !expert_row(i) || authors));
    row_metrics(m, batch, &rollouts, &n_tokens);
    m.num_tokens = local_tokens;
    m.num_seqs = local_seqs;
    Ok(out)
}

/// A global normaliser is a denominator: where this call counts tokens (rows), it must be
/// positive (a 0 would silently zero the terms that divide by it). It may be smaller than the
/// call's own count: a caller may fold its data-parallel factor into it (global count / D, as
/// the TRL drop-in does for TRL's `dapo` normalisation), and ranks' loads may be uneven.
fn require_global_counts(
    global_tokens: f64,
    global_seqs: f64,
    tokens: f64,
    seqs: f64,
) -> Result<()> {
    for (name, global, local) in [
        ("normalizers.token_count", global_tokens, tokens),
        ("normalizers.seq_count", global_seqs, seqs),
    ] {
        if local > 0.0 && global <= 0.0 {
            return Err(Error::invalid(
                name,
                format!(
                    "{global} while this call counts {local}: a global normaliser is a \
                     denominator and must be positive"
                ),
            ));
        }
    }
    Ok(())
}

fn mean(sum: f64, n: f64) -> f64 {
    if n > 0.0 {
        sum / n
    } else {
        0.0
    }
}

/// The inputs a configuration needs (the CUDA backend checks the same before launching).
fn require_inputs(cfg: &Config, batch: &LossBatch, baseline_missing: bool) -> Result<()> {
    if baseline_missing {
        return Err(match cfg.baseline {
            Baseline::Expert => Error::null("expert_logprobs")
                .with_reason("λ > 0 with the expert baseline needs it"),
            Baseline::RefPolicy => Error::null("ref_logprobs")
                .with_reason("λ > 0 with the ref_policy baseline needs it"),
        });
    }
    if cfg.entropy_coef != 0.0 && batch.entropy.is_none() {
        return Err(Error::null("entropy").with_reason("entropy_coef != 0 needs it"));
    }
    if cfg.kl_coef != 0.0 && batch.ref_logprobs.is_none() {
        return Err(Error::null("ref_logprobs").with_reason("kl_coef != 0 needs it"));
    }
    Ok(())
}

/// SPEC §4.6: per token, whether Clip-Cov detaches it or KL-Cov penalises it (among counted
/// rollout tokens), and the selected fraction. Allocation failures are errors, never aborts.
fn cov_selection(
    cfg: &Config,
    batch: &LossBatch,
    expert_row: impl Fn(usize) -> bool,
) -> Result<(Vec<bool>, f64)> {
    if cfg.entropy_control == EntropyControl::None {
        return Ok((Vec::new(), 0.0));
    }
    let mut selected = crate::tensor::try_vec(batch.logprobs.len(), false, "logprobs")?;
    let rollouts = || (0..batch.rows.len()).filter(|&i| !expert_row(i));
    let counted = |i: usize| batch.rows[i].clone().filter(|&k| batch.mask[k] != 0.0);
    let n: usize = rollouts().map(|i| counted(i).count()).sum();
    let mut tokens = Vec::new();
    tokens
        .try_reserve_exact(n)
        .map_err(|_| crate::cpu::cov::no_memory(n))?;
    for i in rollouts() {
        for k in counted(i) {
            let logp = batch.logprobs[k];
            let old = batch.old_logprobs.as_ref().map_or(logp, |o| o[k]);
            tokens.push(crate::cpu::cov::CovToken {
                k,
                adv: batch.advantages[i],
                logp,
                clipped: clipped_pg(cfg, batch.advantages[i], logp, old).2,
            });
        }
    }
    let picked = crate::cpu::cov::select(cfg, &tokens)?;
    let frac = mean(picked.len() as f64, tokens.len() as f64);
    for k in picked {
        selected[k] = true;
    }
    Ok((selected, frac))
}

/// The per-row metrics over `rollouts`, and the experts' mean log-prob.
fn row_metrics(m: &mut Metrics, batch: &LossBatch, rollouts: &[usize], n_tokens: &[f64]) {
    let nr = rollouts.len() as f64;
    m.mean_expert_logprob = batch.expert.as_ref().map_or(0.0, |e| {
        mean(
            fsum(e.logprobs.iter().zip(&e.mask).map(|(&l, &m)| masked(m, l))),
            fsum(e.mask.iter().copied()),
        )
    });
    m.mean_response_length = mean(fsum(rollouts.iter().map(|&i| n_tokens[i])), nr);
    m.frac_correct = mean(
        rollouts.iter().filter(|&&i| batch.signs[i] > 0.0).count() as f64,
        nr,
    );
    m.mean_rarity_weight = mean(fsum(rollouts.iter().map(|&i| batch.weights[i])), nr);
}
