//! One training run of one method: per step, sample G rollouts per prompt, score them, weight
//! them by rarity, plan the passes, run the no-grad pass (old log-probs, expert log-probs), then
//! the training pass whose loss gradients go back through the fused logits path into W.

use super::fused::{self, Forward};
use super::plan::{plan_step, MicroBatch, PromptRows, RowRef, StepPlan};
use super::policy::{Adam, Policy};
use super::rng::Rng;
use super::stats::pass_at_k;
use super::task::{Dataset, Prompt, Task};
use calibrl::config::{Config, LossKind};
use calibrl::cpu::loss::{self, ExpertBaseline, LossBatch};
use calibrl::desc::metrics::{CalibrlMetrics, CalibrlNormalizers};
use calibrl::rarity::{group_advantages, GroupAdvantages};
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Grpo,
    /// GRPO with an entropy bonus of 0.01 (the paper's Table 6 row).
    Entropy,
    SftGrpo,
    Luffy,
    Rlplus,
    Calibrl,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::Grpo,
        Method::Entropy,
        Method::SftGrpo,
        Method::Luffy,
        Method::Rlplus,
        Method::Calibrl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Grpo => "grpo",
            Method::Entropy => "entropy",
            Method::SftGrpo => "sft-grpo",
            Method::Luffy => "luffy",
            Method::Rlplus => "rlplus",
            Method::Calibrl => "calibrl",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }

    /// The library configuration of the method's RL loss: the `paper` preset for CalibRL, the
    /// `grpo` preset for the others (LUFFY / RL-PLUS switch the loss kind so expert rows train).
    pub fn config(self, s: &Settings) -> Config {
        let mut cfg = match self {
            Method::Calibrl => Config::preset("paper"),
            _ => Config::preset("grpo"),
        }
        .expect("preset exists");
        match self {
            Method::Calibrl => {
                cfg.alpha = s.alpha;
                cfg.lambda = s.lambda;
            }
            Method::Luffy => cfg.loss = LossKind::Luffy,
            Method::Rlplus => cfg.loss = LossKind::Rlplus,
            Method::Entropy => cfg.entropy_coef = 0.01,
            Method::Grpo | Method::SftGrpo => {}
        }
        cfg.validate().expect("valid configuration");
        cfg
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub task: Task,
    pub seed: u64,
    pub steps: usize,
    /// Prompts per training pool in each step's batch (2 pools for `reach`, 3 for `sums`).
    pub prompts_per_pool: usize,
    /// G, rollouts per prompt.
    pub group_size: usize,
    pub alpha: f64,
    pub lambda: f64,
    pub lr: f64,
    /// Optimiser updates per step (the second and later ones are slightly off-policy, which is
    /// what the clipped ratio is for).
    pub mini_batches: usize,
    /// Token budget of a micro-batch.
    pub token_budget: usize,
    /// SFT steps on expert responses before GRPO (sft-grpo only; part of the step budget).
    pub sft_steps: usize,
    pub eval_every: usize,
    /// Sampled responses per evaluation prompt (n of pass@k).
    pub eval_samples: usize,
    /// k of pass@k.
    pub pass_k: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            task: Task::Reach,
            seed: 1,
            steps: 150,
            prompts_per_pool: 8,
            group_size: 8,
            alpha: 0.5,
            lambda: 0.1,
            lr: 0.05,
            mini_batches: 2,
            token_budget: 256,
            sft_steps: 15,
            eval_every: 10,
            eval_samples: 16,
            pass_k: 8,
        }
    }
}

/// What one step saw (rollouts of the step's training prompts, policy at the step's start).
#[derive(Clone, Debug, PartialEq)]
pub struct StepLog {
    pub step: usize,
    /// Mean reward of the rollouts (the in-distribution pass@1 on the step's prompts).
    pub reward: f64,
    /// Mean token entropy of the rollouts.
    pub entropy: f64,
    pub length: f64,
}

/// An evaluation of the policy after `step` updates, with `eval_samples` responses per prompt
/// at temperature 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Eval {
    pub step: usize,
    /// In-distribution pass@1 (mean over samples and prompts).
    pub id_pass1: f64,
    /// In-distribution pass@k (unbiased estimate from the n samples).
    pub id_pass_k: f64,
    /// Out-of-distribution pass@1 (NaN when the task has no OOD split).
    pub ood_pass1: f64,
    /// Distinct correct responses per in-distribution prompt among its n samples.
    pub distinct: f64,
    /// Mean token entropy of the in-distribution samples (nats/token, fused forward).
    pub entropy: f64,
    /// Mean Δ = S − E of the in-distribution samples against their prompt's expert response
    /// (the loss's `mean_delta` metric, sequence mode): negative when the policy rates the
    /// expert's answer above its own samples. Measured the same way for every method.
    pub delta: f64,
    /// Mean length of the in-distribution samples (tokens incl. EOS).
    pub length: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub method: Method,
    pub seed: u64,
    /// Evaluations at step 0, every `eval_every` steps, and at the end.
    pub evals: Vec<Eval>,
    pub log: Vec<StepLog>,
}

impl RunResult {
    pub fn last(&self) -> &Eval {
        self.evals.last().expect("at least the initial evaluation")
    }
}

pub fn train(method: Method, s: &Settings, data: &Dataset) -> RunResult {
    let mut run = Run {
        method,
        cfg: method.config(s),
        s,
        policy: Policy::base(s.task),
        adam: Adam::new(s.lr, s.task.num_features() * s.task.vocab()),
    };
    let mut evals = vec![evaluate(&run.policy, data, s, 0)];
    let mut log = Vec::with_capacity(s.steps);
    for step in 0..s.steps {
        log.push(run.step(step, data));
        if (step + 1) % s.eval_every == 0 || step + 1 == s.steps {
            evals.push(evaluate(&run.policy, data, s, step + 1));
        }
    }
    RunResult {
        method,
        seed: s.seed,
        evals,
        log,
    }
}

struct Run<'a> {
    method: Method,
    cfg: Config,
    s: &'a Settings,
    policy: Policy,
    adam: Adam,
}

/// The rows of one step: prompts, their rollouts and their expert responses.
struct StepData {
    prompts: Vec<Prompt>,
    rollouts: Vec<Vec<Vec<usize>>>,
    experts: Vec<Vec<usize>>,
}

impl StepData {
    fn tokens(&self, r: RowRef) -> &[usize] {
        match r {
            RowRef::Rollout { group, index } => &self.rollouts[group][index],
            RowRef::Expert { group } => &self.experts[group],
        }
    }
    fn prompt(&self, r: RowRef) -> &Prompt {
        match r {
            RowRef::Rollout { group, .. } | RowRef::Expert { group } => &self.prompts[group],
        }
    }
    /// Row index in the advantage table: rollouts first, then one expert row per group.
    fn flat(&self, r: RowRef) -> usize {
        let g = self.rollouts[0].len();
        match r {
            RowRef::Rollout { group, index } => group * g + index,
            RowRef::Expert { group } => self.prompts.len() * g + group,
        }
    }
}

/// The token rows of a micro-batch, packed: features, labels and each row's range.
struct Packed {
    feats: Vec<[usize; 5]>,
    labels: Vec<i64>,
    rows: Vec<Range<usize>>,
}

impl Packed {
    fn new(task: Task, data: &StepData, rows: &[RowRef]) -> Packed {
        let mut p = Packed {
            feats: Vec::new(),
            labels: Vec::new(),
            rows: Vec::new(),
        };
        for &r in rows {
            let start = p.labels.len();
            let (prompt, toks) = (data.prompt(r), data.tokens(r));
            for (t, &tok) in toks.iter().enumerate() {
                p.feats.push(task.features(prompt, &toks[..t]));
                p.labels.push(tok as i64);
            }
            p.rows.push(start..p.labels.len());
        }
        p
    }

    fn logits(&self, policy: &Policy) -> Vec<f32> {
        let v = policy.task.vocab();
        let mut z = vec![0f32; self.labels.len() * v];
        for (f, row) in self.feats.iter().zip(z.chunks_mut(v)) {
            policy.logits(f, row);
        }
        z
    }

    /// Runs the fused forward on the current policy; returns the logits buffer (reused for the
    /// in-place backward) and the saved outputs.
    fn forward(&mut self, policy: &Policy) -> (Vec<f32>, Forward) {
        let mut z = self.logits(policy);
        let fw = fused::forward(&mut z, &mut self.labels, policy.task.vocab());
        (z, fw)
    }
}

impl Run<'_> {
    /// Everything a step computes before updating: rollouts, plan, advantages, old log-probs.
    fn prepare(&self, step: usize, dataset: &Dataset) -> Prepared {
        let s = self.s;
        // The same prompts at each step for every method; sampling has its own stream.
        let prompts = dataset.batch(
            &mut Rng::stream(s.seed, (1 << 32) | step as u64),
            s.prompts_per_pool,
        );
        let mut rng = Rng::stream(s.seed, (2 << 32) | step as u64);
        let rollouts: Vec<Vec<Vec<usize>>> = prompts
            .iter()
            .map(|p| {
                (0..s.group_size)
                    .map(|_| self.policy.generate(p, Some(&mut rng)))
                    .collect()
            })
            .collect();
        let experts = prompts.iter().map(|p| s.task.expert(p)).collect();
        let data = StepData {
            prompts,
            rollouts,
            experts,
        };
        let train_experts = self.cfg.trains_expert_rows();
        let plan = plan_step(
            &data
                .prompts
                .iter()
                .zip(&data.rollouts)
                .zip(&data.experts)
                .map(|((p, rs), e)| PromptRows {
                    prompt_len: p.len(),
                    rollout_lens: rs.iter().map(Vec::len).collect(),
                    expert_len: Some(e.len()),
                })
                .collect::<Vec<_>>(),
            self.cfg.loss,
            data.prompts.len().div_ceil(s.mini_batches),
            s.token_budget,
        );
        let (rewards, adv) = self.advantages(&data, train_experts);
        let old = self.no_grad_pass(&data, &plan);
        Prepared {
            data,
            plan,
            rewards,
            adv,
            old,
        }
    }

    fn step(&mut self, step: usize, dataset: &Dataset) -> StepLog {
        let p = self.prepare(step, dataset);
        if self.method == Method::SftGrpo && step < self.s.sft_steps {
            self.sft_update(&p.data);
        } else {
            self.rl_update(&p);
        }
        let n_rollouts = p.data.prompts.len() * self.s.group_size;
        let lengths: usize = p.data.rollouts.iter().flatten().map(Vec::len).sum();
        StepLog {
            step,
            reward: p.rewards[..n_rollouts].iter().sum::<f64>() / n_rollouts as f64,
            entropy: p.old.rollout_entropy,
            length: lengths as f64 / n_rollouts as f64,
        }
    }

    /// Rewards and rarity weighting over the advantage table (rollouts, then expert rows; the
    /// expert rows get an advantage against their group's rollouts but never enter its
    /// statistics).
    fn advantages(&self, data: &StepData, with_experts: bool) -> (Vec<f64>, GroupAdvantages) {
        let g = self.s.group_size;
        let p = data.prompts.len();
        let mut rewards = Vec::new();
        let mut groups = Vec::new();
        let mut is_expert = Vec::new();
        for (gi, (prompt, rs)) in data.prompts.iter().zip(&data.rollouts).enumerate() {
            for r in rs {
                rewards.push(self.s.task.reward(prompt, r));
                groups.push(gi as i64);
                is_expert.push(false);
            }
        }
        if with_experts {
            for (gi, (prompt, e)) in data.prompts.iter().zip(&data.experts).enumerate() {
                rewards.push(self.s.task.reward(prompt, e));
                groups.push(gi as i64);
                is_expert.push(true);
            }
        }
        let adv = group_advantages(&self.cfg, &rewards, &groups, p, None, Some(&is_expert))
            .expect("valid advantage inputs");
        debug_assert_eq!(
            adv.advantages.len(),
            p * g + if with_experts { p } else { 0 }
        );
        (rewards, adv)
    }

    /// The no-grad pass: old log-probs of every rollout and ℓ* of each expert slot.
    fn no_grad_pass(&self, data: &StepData, plan: &StepPlan) -> OldLogprobs {
        let mut out = OldLogprobs {
            rows: vec![Vec::new(); data.flat(RowRef::Expert { group: 0 }) + data.prompts.len()],
            expert: ExpertBaseline::default(),
            rollout_entropy: 0.0,
        };
        let (mut h_sum, mut h_n) = (0.0, 0.0);
        let mut slots: Vec<Vec<f64>> = vec![Vec::new(); plan.num_expert_slots];
        for mb in &plan.no_grad {
            let mut packed = Packed::new(self.s.task, data, &mb.rows);
            let (_, fw) = packed.forward(&self.policy);
            for (&r, range) in mb.rows.iter().zip(&packed.rows) {
                let lp = fw.logprobs[range.clone()].to_vec();
                match r {
                    RowRef::Expert { group } => {
                        slots[plan.expert_slot[group].expect("planned")] = lp.clone();
                    }
                    RowRef::Rollout { .. } => {
                        h_sum += fw.entropy[range.clone()].iter().sum::<f64>();
                        h_n += range.len() as f64;
                    }
                }
                out.rows[data.flat(r)] = lp;
            }
        }
        for lp in slots {
            let start = out.expert.logprobs.len();
            out.expert
                .mask
                .extend(std::iter::repeat(1.0).take(lp.len()));
            out.expert.logprobs.extend(lp);
            out.expert.rows.push(start..out.expert.logprobs.len());
        }
        out.rollout_entropy = h_sum / h_n;
        out
    }

    /// The training pass: per mini-batch, loss and gradient per micro-batch with the
    /// mini-batch's normalisers, then one Adam update.
    fn rl_update(&mut self, p: &Prepared) {
        for mini in &p.plan.train {
            let mut grad = vec![0.0; self.policy.w.len()];
            for mb in &mini.micro {
                self.micro_step(p, mb, mini.normalizers, &mut grad);
            }
            self.adam.step(&mut self.policy.w, &grad);
        }
    }

    /// Loss of one micro-batch at the current policy; adds its ∂L/∂W to `grad`.
    fn micro_step(
        &self,
        p: &Prepared,
        mb: &MicroBatch,
        normalizers: CalibrlNormalizers,
        grad: &mut [f64],
    ) -> CalibrlMetrics {
        let (data, plan, adv, old) = (&p.data, &p.plan, &p.adv, &p.old);
        let mut packed = Packed::new(self.s.task, data, &mb.rows);
        let (mut z, mut fw) = packed.forward(&self.policy);
        let flat: Vec<usize> = mb.rows.iter().map(|&r| data.flat(r)).collect();
        let group = |r: RowRef| match r {
            RowRef::Rollout { group, .. } | RowRef::Expert { group } => group,
        };
        let batch = LossBatch {
            rows: packed.rows.clone(),
            logprobs: fw.logprobs.clone(),
            mask: vec![1.0; packed.labels.len()],
            old_logprobs: Some(
                flat.iter()
                    .flat_map(|&i| old.rows[i].iter().copied())
                    .collect(),
            ),
            ref_logprobs: None,
            entropy: Some(fw.entropy.clone()),
            token_weights: None,
            advantages: flat.iter().map(|&i| adv.advantages[i]).collect(),
            weights: flat.iter().map(|&i| adv.weights[i]).collect(),
            signs: flat.iter().map(|&i| adv.signs[i]).collect(),
            is_expert: Some(
                mb.rows
                    .iter()
                    .map(|r| matches!(r, RowRef::Expert { .. }))
                    .collect(),
            ),
            // Whenever the plan forwarded experts, the loss gets the baseline, so that Δ is
            // measured for LUFFY / RL-PLUS too; it enters the gradient only for CalibRL (λ is 0
            // for the others).
            expert: (plan.num_expert_slots > 0).then(|| ExpertBaseline {
                index: mb
                    .rows
                    .iter()
                    .map(|&r| plan.expert_slot[group(r)].map_or(-1, |s| s as i64))
                    .collect(),
                ..old.expert.clone()
            }),
            normalizers: Some(normalizers),
        };
        let out = loss::compute(&self.cfg, &batch).expect("valid loss inputs");
        let (mut gl, mut gh) = (out.grad_logprobs, out.grad_entropy);
        let v = self.s.task.vocab();
        fused::backward(&mut z, &mut packed.labels, v, &mut fw, &mut gl, &mut gh);
        for (f, dz) in packed.feats.iter().zip(z.chunks(v)) {
            Policy::accumulate(f, dz, grad);
        }
        out.metrics
    }

    /// SFT on the step's expert responses: ∂(mean token NLL)/∂ℓ = −1/N, through the fused
    /// backward. (Only expert rows, so it needs no pass planning.)
    fn sft_update(&mut self, data: &StepData) {
        let rows: Vec<RowRef> = (0..data.prompts.len())
            .map(|group| RowRef::Expert { group })
            .collect();
        let v = self.s.task.vocab();
        let mut packed = Packed::new(self.s.task, data, &rows);
        let (mut z, mut fw) = packed.forward(&self.policy);
        let n = packed.labels.len();
        let mut gl = vec![-1.0 / n as f64; n];
        let mut gh = vec![0.0; n];
        fused::backward(&mut z, &mut packed.labels, v, &mut fw, &mut gl, &mut gh);
        let mut grad = vec![0.0; self.policy.w.len()];
        for (f, dz) in packed.feats.iter().zip(z.chunks(v)) {
            Policy::accumulate(f, dz, &mut grad);
        }
        self.adam.step(&mut self.policy.w, &grad);
    }
}

/// A step's inputs to its updates.
struct Prepared {
    data: StepData,
    plan: StepPlan,
    rewards: Vec<f64>,
    adv: GroupAdvantages,
    old: OldLogprobs,
}

/// The loss of the first mini-batch of step `step` evaluated at `policy`, and its gradient
/// ∂L/∂W, with rollouts and old log-probs from `behaviour`: lets a test compare the whole chain
/// (fused forward → loss → fused backward → outer product) with finite differences.
#[allow(dead_code)] // used by tests/train_demo.rs, not by the example
pub fn minibatch_loss(
    method: Method,
    s: &Settings,
    dataset: &Dataset,
    behaviour: &Policy,
    policy: &Policy,
    step: usize,
) -> (f64, Vec<f64>) {
    let mut run = Run {
        method,
        cfg: method.config(s),
        s,
        policy: behaviour.clone(),
        adam: Adam::new(s.lr, behaviour.w.len()),
    };
    let p = run.prepare(step, dataset);
    run.policy = policy.clone();
    let mini = &p.plan.train[0];
    let mut grad = vec![0.0; policy.w.len()];
    let loss = mini
        .micro
        .iter()
        .map(|mb| run.micro_step(&p, mb, mini.normalizers, &mut grad).loss)
        .sum();
    (loss, grad)
}

/// Outputs of the no-grad pass.
struct OldLogprobs {
    /// Per row of the advantage table (rollouts, then expert rows): its token log-probs.
    rows: Vec<Vec<f64>>,
    /// ℓ* per expert slot, in the layout the loss takes.
    expert: ExpertBaseline,
    rollout_entropy: f64,
}

/// Samples `n` responses per prompt at temperature 1.
fn sample_all(
    policy: &Policy,
    prompts: &[Prompt],
    n: usize,
    rng: &mut Rng,
) -> Vec<Vec<Vec<usize>>> {
    prompts
        .iter()
        .map(|p| (0..n).map(|_| policy.generate(p, Some(rng))).collect())
        .collect()
}

/// Evaluation after `step` updates: pass rates in and out of distribution, distinct correct
/// answers, and the entropy (through the fused forward), Δ and length of the in-distribution
/// samples. Its sampling stream depends on the seed and the step only, so every method is
/// evaluated on the same random numbers.
pub fn evaluate(policy: &Policy, data: &Dataset, s: &Settings, step: usize) -> Eval {
    let task = s.task;
    let n = s.eval_samples;
    let mut rng = Rng::stream(s.seed, (3 << 32) | step as u64);
    let id = &data.id_eval;
    let rollouts = sample_all(policy, id, n, &mut rng);
    let (mut pass1, mut pass_k, mut distinct) = (0.0, 0.0, 0.0);
    for (p, rs) in id.iter().zip(&rollouts) {
        let mut correct: Vec<&Vec<usize>> = rs.iter().filter(|r| task.reward(p, r) > 0.0).collect();
        pass1 += correct.len() as f64 / n as f64;
        pass_k += pass_at_k(n, correct.len(), s.pass_k);
        correct.sort();
        correct.dedup();
        distinct += correct.len() as f64;
    }
    let ood_pass1 = if data.ood_eval.is_empty() {
        f64::NAN
    } else {
        let ood = sample_all(policy, &data.ood_eval, n, &mut rng);
        let passed: f64 = data
            .ood_eval
            .iter()
            .zip(&ood)
            .map(|(p, rs)| rs.iter().map(|r| task.reward(p, r)).sum::<f64>())
            .sum();
        passed / (data.ood_eval.len() * n) as f64
    };

    let data = StepData {
        prompts: id.to_vec(),
        experts: id.iter().map(|p| task.expert(p)).collect(),
        rollouts,
    };
    let rows: Vec<RowRef> = (0..id.len())
        .flat_map(|group| (0..n).map(move |index| RowRef::Rollout { group, index }))
        .collect();
    let mut packed = Packed::new(task, &data, &rows);
    let (_, fw) = packed.forward(policy);
    let entropy = fw.entropy.iter().sum::<f64>() / fw.entropy.len() as f64;
    let length = packed.labels.len() as f64 / rows.len() as f64;
    let expert_rows: Vec<RowRef> = (0..id.len())
        .map(|group| RowRef::Expert { group })
        .collect();
    let mut expert = Packed::new(task, &data, &expert_rows);
    let (_, fw_expert) = expert.forward(policy);
    // Δ through the library: a loss call whose only output used is the `mean_delta` metric.
    let probe = LossBatch {
        rows: packed.rows.clone(),
        mask: vec![1.0; fw.logprobs.len()],
        logprobs: fw.logprobs,
        advantages: vec![0.0; rows.len()],
        weights: vec![0.0; rows.len()],
        signs: rows
            .iter()
            .map(|&r| match r {
                RowRef::Rollout { group, index } => {
                    2.0 * task.reward(&data.prompts[group], &data.rollouts[group][index]) - 1.0
                }
                RowRef::Expert { .. } => unreachable!("rollout rows only"),
            })
            .collect(),
        expert: Some(ExpertBaseline {
            mask: vec![1.0; fw_expert.logprobs.len()],
            rows: expert.rows,
            logprobs: fw_expert.logprobs,
            index: (0..id.len())
                .flat_map(|g| std::iter::repeat(g as i64).take(n))
                .collect(),
        }),
        ..LossBatch::default()
    };
    let paper = Config::preset("paper").expect("preset exists");
    let delta = loss::compute(&paper, &probe)
        .expect("valid loss inputs")
        .metrics
        .mean_delta;
    let k = id.len() as f64;
    Eval {
        step,
        id_pass1: pass1 / k,
        id_pass_k: pass_k / k,
        ood_pass1,
        distinct: distinct / k,
        entropy,
        delta,
        length,
    }
}
