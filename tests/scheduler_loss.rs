//! The plan's normalisers make the loss additive: the gradients (and loss values) of the
//! training pass's micro-batch slices, each computed with the mini-batch's global normalisers,
//! sum to those of one call over the whole mini-batch. The expert baseline goes through the
//! scheduler's expert helper, as a trainer would run it.

use calibrl::config::{Aggregation, Config, LossKind};
use calibrl::cpu::loss::{compute, ExpertBaseline, LossBatch};
use calibrl::scheduler::{
    self, scatter_expert_logprobs, Plan, PromptInput, SchedulerConfig, SeqKind, SeqRef, StepInput,
};

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
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Per sequence id: current and old log-probs of its response tokens; per row: A, w, c.
struct StepData {
    logp: Vec<Vec<f64>>,
    old: Vec<Vec<f64>>,
    adv: Vec<f64>,
    sign: Vec<f64>,
}

fn step_data(rng: &mut Rng, plan: &Plan) -> StepData {
    let n = plan.num_seqs();
    let mut d = StepData {
        logp: Vec::new(),
        old: Vec::new(),
        adv: Vec::new(),
        sign: Vec::new(),
    };
    for id in 0..n as i64 {
        let s = plan.seq(id).unwrap();
        let lp: Vec<f64> = (0..s.response_len)
            .map(|_| -3.0 * rng.unit() - 0.01)
            .collect();
        d.old
            .push(lp.iter().map(|&l| l + 0.6 * (rng.unit() - 0.5)).collect());
        d.logp.push(lp);
        d.adv.push(2.0 * rng.unit() - 1.0);
        d.sign.push(if rng.unit() < 0.5 { 1.0 } else { -1.0 });
    }
    d
}

/// The packed no-grad output of all ranks, in plan order (what the no-grad pass returns).
fn nograd_output(plan: &Plan, d: &StepData) -> Vec<f64> {
    plan.nograd
        .seqs()
        .flat_map(|s| d.logp[s.id(plan.num_rollouts()) as usize].iter().copied())
        .collect()
}

/// A loss batch over `seqs` with the expert baseline from the helper's packed tensor.
fn batch(
    plan: &Plan,
    d: &StepData,
    seqs: &[SeqRef],
    expert: &[f64],
    norm: Option<calibrl::desc::metrics::CalibrlNormalizers>,
) -> LossBatch {
    let r = plan.num_rollouts();
    let mut b = LossBatch {
        normalizers: norm,
        ..Default::default()
    };
    let mut index = Vec::new();
    let mut is_expert = Vec::new();
    for s in seqs {
        let id = s.id(r) as usize;
        let start = b.logprobs.len();
        b.logprobs.extend(&d.logp[id]);
        b.old_logprobs
            .get_or_insert_with(Vec::new)
            .extend(&d.old[id]);
        b.rows.push(start..b.logprobs.len());
        b.advantages.push(d.adv[id]);
        b.weights.push(d.adv[id].abs());
        b.signs.push(d.sign[id]);
        is_expert.push(s.kind == SeqKind::Expert);
        index.push(if s.kind == SeqKind::Rollout {
            plan.gather[id]
        } else {
            -1
        });
    }
    b.mask = vec![1.0; b.logprobs.len()];
    b.is_expert = Some(is_expert);
    b.expert = Some(ExpertBaseline {
        rows: plan
            .expert_offsets
            .windows(2)
            .map(|w| w[0] as usize..w[1] as usize)
            .collect(),
        logprobs: expert.to_vec(),
        mask: vec![1.0; expert.len()],
        index,
    });
    b
}

/// Per sequence id, the gradient of its tokens, from one call.
fn scatter_grad(plan: &Plan, seqs: &[SeqRef], grad: &[f64], into: &mut [Vec<f64>]) {
    let mut at = 0;
    for s in seqs {
        let g = &mut into[s.id(plan.num_rollouts()) as usize];
        for (x, y) in g.iter_mut().zip(&grad[at..at + s.response_len as usize]) {
            *x += y;
        }
        at += s.response_len as usize;
    }
}

/// Runs the check for one loss configuration; returns the largest gradient difference seen
/// between the per-slice sums and the whole-batch call, and the same for slices that used their
/// local counts instead of the plan's normalisers.
fn check(cfg: &Config, seed: u64) -> (f64, f64) {
    let mut rng = Rng(seed);
    let input = StepInput {
        prompts: (0..24)
            .map(|g| {
                let n = rng.range(1, 6) as usize;
                PromptInput {
                    prompt_len: rng.range(1, 40) as u32,
                    rollout_lens: (0..n).map(|_| rng.range(1, 60) as u32).collect(),
                    expert_len: (g % 5 != 0).then(|| rng.range(1, 80) as u32),
                    rewards: None,
                }
            })
            .collect(),
    };
    let mut scfg = SchedulerConfig::new(3, 300, 200, 7);
    scfg.loss_kind = cfg.loss;
    let plan = scheduler::plan(&input, &scfg).unwrap();
    let d = step_data(&mut rng, &plan);
    let expert = scatter_expert_logprobs(&plan, None, &nograd_output(&plan, &d)).unwrap();
    let n = plan.num_seqs();
    let zeros = || -> Vec<Vec<f64>> {
        (0..n as i64)
            .map(|id| vec![0.0; plan.seq(id).unwrap().response_len as usize])
            .collect()
    };

    let (mut worst, mut worst_local) = (0.0f64, 0.0f64);
    for mb in &plan.minibatches {
        let all: Vec<SeqRef> = {
            let mut v: Vec<SeqRef> = mb.pass.seqs().copied().collect();
            v.sort_by_key(|s| s.id(plan.num_rollouts()));
            v
        };
        let whole = compute(cfg, &batch(&plan, &d, &all, &expert, None)).unwrap();
        // The plan's normalisers are the whole mini-batch's own counts.
        assert_eq!(
            (whole.metrics.num_tokens, whole.metrics.num_seqs),
            (mb.normalizers.token_count, mb.normalizers.seq_count)
        );
        let mut want = zeros();
        scatter_grad(&plan, &all, &whole.grad_logprobs, &mut want);

        let (mut got, mut got_local) = (zeros(), zeros());
        let mut loss_sum = 0.0;
        let mut slices = 0;
        for mbs in &mb.pass.ranks {
            for micro in mbs.iter().filter(|m| !m.seqs.is_empty()) {
                let out = compute(
                    cfg,
                    &batch(&plan, &d, &micro.seqs, &expert, Some(mb.normalizers)),
                )
                .unwrap();
                scatter_grad(&plan, &micro.seqs, &out.grad_logprobs, &mut got);
                loss_sum += out.metrics.loss;
                let local = compute(cfg, &batch(&plan, &d, &micro.seqs, &expert, None)).unwrap();
                scatter_grad(&plan, &micro.seqs, &local.grad_logprobs, &mut got_local);
                slices += 1;
            }
        }
        assert!(
            slices > 1,
            "the mini-batch must be split for the test to mean anything"
        );
        assert!(
            (loss_sum - whole.metrics.loss).abs() <= 1e-12 * whole.metrics.loss.abs().max(1.0),
            "loss {loss_sum} vs {}",
            whole.metrics.loss
        );
        for id in 0..n {
            for t in 0..want[id].len() {
                worst = worst.max((got[id][t] - want[id][t]).abs());
                worst_local = worst_local.max((got_local[id][t] - want[id][t]).abs());
            }
        }
        // Expert rows get gradient only when they are trained.
        let trains = matches!(cfg.loss, LossKind::Luffy | LossKind::Rlplus);
        for s in all.iter().filter(|s| s.kind == SeqKind::Expert) {
            assert!(trains, "an expert row in a {:?} training pass", cfg.loss);
            assert!(want[s.id(plan.num_rollouts()) as usize]
                .iter()
                .any(|&g| g != 0.0));
        }
    }
    (worst, worst_local)
}

#[test]
fn slice_gradients_with_plan_normalisers_sum_to_the_whole_batch() {
    let paper = Config::preset("paper").unwrap();
    let reference = Config::preset("reference").unwrap();
    let cases = [
        ("paper (sequence Δ, token-mean)", paper.clone()),
        ("reference (token-aligned Δ)", reference.clone()),
        (
            "seq-mean-token-mean, length-normalised Δ",
            Config {
                agg: Aggregation::SeqMeanTokenMean,
                length_normalize: true,
                ..paper.clone()
            },
        ),
        (
            "seq-mean-token-sum, token-aligned",
            Config {
                agg: Aggregation::SeqMeanTokenSum,
                ..reference
            },
        ),
        ("grpo", Config::preset("grpo").unwrap()),
        (
            "luffy",
            Config {
                loss: LossKind::Luffy,
                ..paper.clone()
            },
        ),
        (
            "rlplus",
            Config {
                loss: LossKind::Rlplus,
                ..paper
            },
        ),
    ];
    for (i, (name, cfg)) in cases.iter().enumerate() {
        let (worst, worst_local) = check(cfg, 100 + i as u64);
        assert!(
            worst <= 1e-12,
            "{name}: slices differ from the whole batch by {worst}"
        );
        // Without the plan's normalisers (each slice normalising by its own counts) the sum is
        // wrong: this is the bug the normalisers prevent.
        assert!(
            worst_local > 1e-6,
            "{name}: local normalisation unexpectedly matched ({worst_local})"
        );
    }
}
