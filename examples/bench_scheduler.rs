//! The expert-baseline scheduler against the naive plan of the authors' trainer, side by side.
//!
//!     cargo run --release --example bench_scheduler
//!
//! Naive plan (what a verl-style trainer without dynamic batching does, as the authors' code):
//! the expert row of every group goes through both passes (its loss masked in training); rows
//! are split into equal contiguous chunks per rank and then into micro-batches of a fixed
//! number of sequences (8 for the no-grad pass, 4 for training). Token counts are real tokens
//! (padding removed), which is the naive plan's best case.
//!
//! Scheduler: expert rows once, in the no-grad pass only; Karmarkar–Karp rank balancing and
//! token-budgeted micro-batches (32768 tokens no-grad, 16384 training), equal micro-batch
//! counts across ranks.
//!
//! "Lockstep cost" models data-parallel ranks that synchronise every micro-batch (FSDP / ZeRO-3
//! all-gathers): Σ_m max_r W(r, m) with W the workload `tokens + tokens²/24576`, divided by the
//! ideal Σ W / R. The step estimate adds the no-grad pass's lockstep workload and 3× the
//! training pass's (forward + backward ≈ 3 forwards).
//!
//! "Dynamic sampling" compares the scheduler with and without SPEC §7.6 on the realistic step,
//! where a third of the groups are all-correct or all-wrong (typical late in training).

use calibrl::config::LossKind;
use calibrl::scheduler::{
    self, MicroBatch, PassPlan, Plan, PromptInput, SchedulerConfig, SeqKind, SeqRef, StepInput,
    CALIBRL_DEFAULT_QUADRATIC_COEF,
};
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }
    /// Log-normal with the given median and log-space σ, clipped to [lo, hi].
    fn log_normal(&mut self, median: f64, sigma: f64, lo: u32, hi: u32) -> u32 {
        ((median.ln() + sigma * self.normal()).exp().round() as u32).clamp(lo, hi)
    }
}

const G: usize = 10;
const RANKS: usize = 8;
const NOGRAD_BUDGET: u64 = 32768;
const TRAIN_BUDGET: u64 = 16384;
const NAIVE_NOGRAD_MB: usize = 8;
const NAIVE_TRAIN_MB: usize = 4;

fn step(n_prompts: usize, seed: u64) -> StepInput {
    let mut rng = Rng(seed);
    StepInput {
        prompts: (0..n_prompts)
            .map(|g| PromptInput {
                prompt_len: rng.log_normal(250.0, 0.6, 32, 2048),
                rollout_lens: (0..G)
                    .map(|_| rng.log_normal(600.0, 0.9, 16, 4096))
                    .collect(),
                expert_len: Some(rng.log_normal(900.0, 0.7, 16, 4096)),
                // A sixth of the groups all correct, a sixth all wrong, the rest mixed.
                rewards: Some(
                    (0..G)
                        .map(|j| match g % 6 {
                            0 => 1.0,
                            1 => 0.0,
                            _ => (j % 3 == 0) as u8 as f64,
                        })
                        .collect(),
                ),
            })
            .collect(),
    }
}

/// The naive plan's passes, as `PassPlan`s over the scheduler's sequence references.
struct Naive {
    nograd: PassPlan,
    train: Vec<PassPlan>,
}

fn naive_pass(rows: Vec<SeqRef>, mb_size: usize) -> PassPlan {
    let n = rows.len();
    let ranks: Vec<Vec<MicroBatch>> = (0..RANKS)
        .map(|r| {
            let chunk = &rows[r * n / RANKS..(r + 1) * n / RANKS];
            chunk
                .chunks(mb_size)
                .map(|c| MicroBatch { seqs: c.to_vec() })
                .collect()
        })
        .collect();
    PassPlan {
        microbatches: ranks.iter().map(Vec::len).max().unwrap_or(0),
        ranks,
        oversize: Vec::new(),
    }
}

fn naive_plan(plan: &Plan, minibatch_prompts: usize) -> Naive {
    // The rows of a group: its rollouts, then its expert row (every prompt has one here).
    let group = |g: usize| -> Vec<SeqRef> {
        let mut v: Vec<SeqRef> = (plan.rollout_offsets[g]..plan.rollout_offsets[g + 1])
            .map(|i| plan.seq(i as i64).unwrap())
            .collect();
        v.push(plan.seq((plan.num_rollouts() + g) as i64).unwrap());
        v
    };
    let p = plan.num_prompts();
    let all: Vec<SeqRef> = (0..p).flat_map(group).collect();
    let train = (0..p)
        .step_by(minibatch_prompts)
        .map(|first| {
            naive_pass(
                (first..(first + minibatch_prompts).min(p))
                    .flat_map(group)
                    .collect(),
                NAIVE_TRAIN_MB,
            )
        })
        .collect();
    Naive {
        nograd: naive_pass(all, NAIVE_NOGRAD_MB),
        train,
    }
}

fn work(s: &SeqRef) -> f64 {
    let t = s.tokens as f64;
    t + CALIBRL_DEFAULT_QUADRATIC_COEF * t * t
}

/// Statistics of one or more passes that run one after the other.
#[derive(Default)]
struct Stats {
    tokens: u64,
    expert_tokens: u64,
    /// Σ over passes of max_r tokens, and of mean_r tokens.
    max_rank: f64,
    mean_rank: f64,
    /// Σ over passes of Σ_m max_r W(r, m), and of Σ W / R.
    lockstep: f64,
    ideal: f64,
    microbatches_per_rank: usize,
    max_mb_tokens: u64,
    over_budget: usize,
}

fn stats(passes: &[&PassPlan], budget: u64) -> Stats {
    let mut s = Stats::default();
    for pass in passes {
        let rank_tokens: Vec<u64> = pass
            .ranks
            .iter()
            .map(|r| r.iter().map(MicroBatch::tokens).sum())
            .collect();
        s.tokens += rank_tokens.iter().sum::<u64>();
        s.expert_tokens += pass
            .seqs()
            .filter(|x| x.kind == SeqKind::Expert)
            .map(|x| x.tokens as u64)
            .sum::<u64>();
        s.max_rank += *rank_tokens.iter().max().unwrap() as f64;
        s.mean_rank += rank_tokens.iter().sum::<u64>() as f64 / RANKS as f64;
        let m = pass.microbatches_per_rank();
        s.microbatches_per_rank += m;
        for j in 0..m {
            s.lockstep += pass
                .ranks
                .iter()
                .map(|r| r.get(j).map_or(0.0, |mb| mb.seqs.iter().map(work).sum()))
                .fold(0.0, f64::max);
        }
        s.ideal += pass.seqs().map(work).sum::<f64>() / RANKS as f64;
        for mb in pass.ranks.iter().flatten() {
            s.max_mb_tokens = s.max_mb_tokens.max(mb.tokens());
            s.over_budget += (mb.tokens() > budget) as usize;
        }
    }
    s
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (T, f64) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(v);
    }
    (out.unwrap(), best)
}

fn row(name: &str, naive: f64, ours: f64, fmt: &dyn Fn(f64) -> String) {
    let ratio = if ours != 0.0 {
        format!("{:.3}", naive / ours)
    } else {
        "-".into()
    };
    println!(
        "| {name:<44} | {:>14} | {:>14} | {ratio:>8} |",
        fmt(naive),
        fmt(ours)
    );
}

fn scenario(title: &str, n_prompts: usize, minibatch_prompts: usize, runs: usize) {
    let input = step(n_prompts, 2025);
    let n_seqs = n_prompts * (G + 1);
    let mut cfg = SchedulerConfig::new(RANKS, NOGRAD_BUDGET, TRAIN_BUDGET, minibatch_prompts);
    cfg.loss_kind = LossKind::Calibrl;
    let (plan, t_ours) = best_of(runs, || scheduler::plan(&input, &cfg).unwrap());
    let (naive, t_naive) = best_of(runs, || naive_plan(&plan, minibatch_prompts));

    let ours_ng = stats(&[&plan.nograd], NOGRAD_BUDGET);
    let ours_tr = stats(
        &plan.minibatches.iter().map(|m| &m.pass).collect::<Vec<_>>(),
        TRAIN_BUDGET,
    );
    let naive_ng = stats(&[&naive.nograd], NOGRAD_BUDGET);
    let naive_tr = stats(&naive.train.iter().collect::<Vec<_>>(), TRAIN_BUDGET);

    println!("\n### {title}\n");
    println!(
        "{n_prompts} prompts × (G = {G} + 1 expert) = {n_seqs} sequences, {RANKS} DP ranks, {} mini-batch(es) of {minibatch_prompts} prompts; \
         total {:.1} M tokens (prompt + response).\n",
        plan.minibatches.len(),
        (ours_ng.tokens as f64) / 1e6
    );
    println!(
        "| {:<44} | {:>14} | {:>14} | {:>8} |",
        "per step", "naive", "scheduler", "naive/ours"
    );
    println!("|{:-<46}|{:->16}|{:->16}|{:->10}|", "", "", "", "");
    let mtok = |x: f64| format!("{:.3} M", x / 1e6);
    let plain = |x: f64| format!("{x:.0}");
    let ratio = |x: f64| format!("{x:.4}");
    let secs = |x: f64| {
        if x < 1.0 {
            format!("{:.2} ms", x * 1e3)
        } else {
            format!("{x:.2} s")
        }
    };
    row(
        "tokens forwarded (no-grad + training)",
        (naive_ng.tokens + naive_tr.tokens) as f64,
        (ours_ng.tokens + ours_tr.tokens) as f64,
        &mtok,
    );
    row(
        "  of which expert tokens",
        (naive_ng.expert_tokens + naive_tr.expert_tokens) as f64,
        (ours_ng.expert_tokens + ours_tr.expert_tokens) as f64,
        &mtok,
    );
    row(
        "tokens back-propagated",
        naive_tr.tokens as f64,
        ours_tr.tokens as f64,
        &mtok,
    );
    row(
        "  of which expert tokens (masked, wasted)",
        naive_tr.expert_tokens as f64,
        ours_tr.expert_tokens as f64,
        &mtok,
    );
    row(
        "no-grad: max/mean rank tokens",
        naive_ng.max_rank / naive_ng.mean_rank,
        ours_ng.max_rank / ours_ng.mean_rank,
        &ratio,
    );
    row(
        "training: Σ_mb max / Σ_mb mean rank tokens",
        naive_tr.max_rank / naive_tr.mean_rank,
        ours_tr.max_rank / ours_tr.mean_rank,
        &ratio,
    );
    row(
        "no-grad: lockstep cost / ideal",
        naive_ng.lockstep / naive_ng.ideal,
        ours_ng.lockstep / ours_ng.ideal,
        &ratio,
    );
    row(
        "training: lockstep cost / ideal",
        naive_tr.lockstep / naive_tr.ideal,
        ours_tr.lockstep / ours_tr.ideal,
        &ratio,
    );
    let est = |ng: &Stats, tr: &Stats| ng.lockstep + 3.0 * tr.lockstep;
    row(
        "step estimate (lockstep workload, M units)",
        est(&naive_ng, &naive_tr) / 1e6,
        est(&ours_ng, &ours_tr) / 1e6,
        &|x| format!("{x:.3}"),
    );
    row(
        "no-grad micro-batches per rank",
        naive_ng.microbatches_per_rank as f64,
        ours_ng.microbatches_per_rank as f64,
        &plain,
    );
    row(
        "training micro-batches per rank (all mbs)",
        naive_tr.microbatches_per_rank as f64,
        ours_tr.microbatches_per_rank as f64,
        &plain,
    );
    row(
        "largest no-grad micro-batch (tokens)",
        naive_ng.max_mb_tokens as f64,
        ours_ng.max_mb_tokens as f64,
        &plain,
    );
    row(
        "largest training micro-batch (tokens)",
        naive_tr.max_mb_tokens as f64,
        ours_tr.max_mb_tokens as f64,
        &plain,
    );
    row(
        "micro-batches over the token budget",
        (naive_ng.over_budget + naive_tr.over_budget) as f64,
        (ours_ng.over_budget + ours_tr.over_budget) as f64,
        &plain,
    );
    row(
        &format!("planning time (best of {runs})"),
        t_naive,
        t_ours,
        &secs,
    );
}

/// The scheduler with and without dynamic sampling on the same step (SPEC §7.6).
fn dynamic_sampling(n_prompts: usize, minibatch_prompts: usize) {
    let input = step(n_prompts, 2025);
    let off = SchedulerConfig::new(RANKS, NOGRAD_BUDGET, TRAIN_BUDGET, minibatch_prompts);
    let on = SchedulerConfig {
        dynamic_sampling: true,
        ..off.clone()
    };
    let (a, b) = (
        scheduler::plan(&input, &off).unwrap(),
        scheduler::plan(&input, &on).unwrap(),
    );
    let ng = |p: &Plan| stats(&[&p.nograd], NOGRAD_BUDGET);
    let tr = |p: &Plan| {
        stats(
            &p.minibatches.iter().map(|m| &m.pass).collect::<Vec<_>>(),
            TRAIN_BUDGET,
        )
    };
    let (ang, atr, bng, btr) = (ng(&a), tr(&a), ng(&b), tr(&b));
    println!(
        "\n### Dynamic sampling (realistic step, a third of the groups all-correct or all-wrong)\n"
    );
    println!(
        "{} of {n_prompts} prompts dropped (reported to the trainer, which may sample as many more).\n",
        b.dropped_prompts.len()
    );
    println!(
        "| {:<44} | {:>14} | {:>14} | {:>8} |",
        "per step", "scheduler", "+ dyn. samp.", "off/on"
    );
    println!("|{:-<46}|{:->16}|{:->16}|{:->10}|", "", "", "", "");
    let mtok = |x: f64| format!("{:.3} M", x / 1e6);
    row(
        "tokens forwarded (no-grad + training)",
        (ang.tokens + atr.tokens) as f64,
        (bng.tokens + btr.tokens) as f64,
        &mtok,
    );
    row(
        "tokens back-propagated",
        atr.tokens as f64,
        btr.tokens as f64,
        &mtok,
    );
    let est = |ng: &Stats, tr: &Stats| ng.lockstep + 3.0 * tr.lockstep;
    row(
        "step estimate (lockstep workload, M units)",
        est(&ang, &atr) / 1e6,
        est(&bng, &btr) / 1e6,
        &|x| format!("{x:.3}"),
    );
    row(
        "training micro-batches per rank (all mbs)",
        atr.microbatches_per_rank as f64,
        btr.microbatches_per_rank as f64,
        &|x| format!("{x:.0}"),
    );
}

fn main() {
    println!("## Scheduler benchmark (naive = expert rows in both passes, fixed {NAIVE_NOGRAD_MB}/{NAIVE_TRAIN_MB}-sequence micro-batches)");
    scenario("Realistic step", 480, 120, 5);
    dynamic_sampling(480, 120);
    scenario("1M sequences", 90_910, 480, 2);
}
