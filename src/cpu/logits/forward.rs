//! The forward operations: log-prob and entropy of every row, a vocabulary shard's
//! statistics, and the finish that combines the shards'.

use super::stats::{all_row_stats, combine, stats_rows};
use crate::desc::logits::{Forward, ShardFinish, ShardStats, STATS_WIDTH};
use crate::error::{Error, Result};
use crate::tensor::{try_vec, write_all};

pub fn forward(args: &Forward) -> Result<()> {
    let input = &args.input;
    let labels = input.labels.read_i64()?;
    let stats = all_row_stats(input, &labels, true)?;
    let mut lp = try_vec(input.n, 0.0, "logprobs")?;
    let mut ent = try_vec(input.n, 0.0, "entropy")?;
    let mut lse = try_vec(input.n, 0.0, "lse")?;
    for k in 0..input.n {
        if labels[k] >= 0 {
            lse[k] = stats[k].lse();
            lp[k] = stats[k].target - lse[k];
            ent[k] = stats[k].entropy();
        }
    }
    write_all(&[
        (Some(&args.logprobs), &lp),
        (args.entropy.as_ref(), &ent),
        (Some(&args.lse), &lse),
    ])
}

pub fn shard_stats(args: &ShardStats) -> Result<()> {
    let input = &args.input;
    let labels = input.labels.read_i64()?;
    let stats = all_row_stats(input, &labels, false)?;
    write_all(&[(Some(&args.stats), &stats_rows(&stats)?)])
}

pub fn shard_finish(args: &ShardFinish) -> Result<()> {
    let labels = args.labels.read_i64()?;
    let raw = args.stats.read_f64()?;
    let (n, r) = (args.n, args.shards);
    let mut lp = try_vec(n, 0.0, "logprobs")?;
    let mut ent = try_vec(n, 0.0, "entropy")?;
    let mut lse = try_vec(n, 0.0, "lse")?;
    let mut rows = try_vec(r, [0.0; 4], "stats")?;
    for k in 0..n {
        if labels[k] < 0 {
            continue;
        }
        for (s, row) in rows.iter_mut().enumerate() {
            let o = (s * n + k) * STATS_WIDTH;
            *row = [raw[o], raw[o + 1], raw[o + 2], raw[o + 3]];
        }
        let st = combine(&rows);
        if !(st.max.is_finite() && st.sum_exp > 0.0) || rows.iter().flatten().any(|v| v.is_nan()) {
            return Err(Error::new(
                crate::error::CalibrlStatus::NonFinite,
                format!("`stats`: row {k} has no finite statistics in any shard"),
            ));
        }
        lse[k] = st.lse();
        lp[k] = st.target - lse[k];
        ent[k] = st.entropy();
    }
    write_all(&[
        (Some(&args.logprobs), &lp),
        (args.entropy.as_ref(), &ent),
        (Some(&args.lse), &lse),
    ])
}
