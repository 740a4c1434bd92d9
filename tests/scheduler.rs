//! Scheduler properties on random inputs of many sizes, bad input, and the C ABI.

use calibrl::config::LossKind;
use calibrl::desc::metrics::CalibrlNormalizers;
use calibrl::error::CalibrlStatus;
use calibrl::ffi::common::calibrl_last_error_message;
use calibrl::ffi::scheduler::*;
use calibrl::ops::expert::collect_experts;
use calibrl::scheduler::{
    self, expert_sums, scatter_expert_logprobs, ExpertSelection, PassKind, PassPlan, Plan,
    PromptInput, SchedulerConfig, SeqKind, StepInput,
};
use calibrl::tensor::{HostTensor, Tensor};
use std::collections::BTreeSet;
use std::ffi::CStr;

/// Test-local SplitMix64 (independent of the library's).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Long-tailed length: log-uniform in [1, max].
    fn long_tail(&mut self, max: u64) -> u32 {
        ((max as f64).powf(self.unit()).round() as u64).clamp(1, max) as u32
    }
}

fn random_input(rng: &mut Rng, n_prompts: usize) -> StepInput {
    let prompts = (0..n_prompts)
        .map(|_| {
            let g = rng.range(1, 12) as usize;
            PromptInput {
                prompt_len: rng.range(0, 600) as u32,
                rollout_lens: (0..g).map(|_| rng.long_tail(4096)).collect(),
                expert_len: (rng.below(5) != 0).then(|| rng.long_tail(4096)),
                rewards: Some(
                    (0..g)
                        .map(|_| if rng.below(3) == 0 { 1.0 } else { 0.0 })
                        .collect(),
                ),
            }
        })
        .collect();
    StepInput { prompts }
}

fn random_config(rng: &mut Rng, n_prompts: usize) -> SchedulerConfig {
    let loss_kind = [
        LossKind::Calibrl,
        LossKind::Grpo,
        LossKind::Luffy,
        LossKind::Rlplus,
    ][rng.below(4) as usize];
    let expert_selection = match rng.below(3) {
        0 => ExpertSelection::All,
        1 => ExpertSelection::RandomFraction {
            fraction: rng.unit(),
            seed: rng.next(),
        },
        _ => {
            let a = rng.unit();
            let b = rng.unit();
            ExpertSelection::PassRate {
                low: a.min(b),
                high: a.max(b),
                threshold: 0.5,
            }
        }
    };
    SchedulerConfig {
        dp_ranks: rng.range(1, 9) as usize,
        // Budgets from below the longest sequence (oversize) to generous.
        nograd_token_budget: rng.range(2000, 40000),
        train_token_budget: rng.range(2000, 40000),
        minibatch_prompts: rng.range(1, n_prompts as u64 + 3) as usize,
        expert_selection,
        loss_kind,
        quadratic_coef: [0.0, scheduler::CALIBRL_DEFAULT_QUADRATIC_COEF, 1e-3]
            [rng.below(3) as usize],
        dynamic_sampling: rng.below(3) == 0,
    }
}

/// Which prompts' experts should be selected, computed from the definition.
/// SPEC §7.6: with dynamic sampling, a group of ≥ 2 rollouts whose rewards are all equal.
fn expected_dropped(input: &StepInput, cfg: &SchedulerConfig) -> Vec<bool> {
    input
        .prompts
        .iter()
        .map(|p| {
            let r = p.rewards.as_ref();
            cfg.dynamic_sampling && r.is_some_and(|r| r.len() > 1 && r.iter().all(|&x| x == r[0]))
        })
        .collect()
}

fn expected_selection(input: &StepInput, cfg: &SchedulerConfig, plan: &Plan) -> Vec<bool> {
    let dropped = expected_dropped(input, cfg);
    let has: Vec<bool> = input
        .prompts
        .iter()
        .zip(&dropped)
        .map(|(p, &d)| p.expert_len.is_some() && !d)
        .collect();
    if cfg.loss_kind == LossKind::Grpo {
        return vec![false; has.len()];
    }
    match cfg.expert_selection {
        ExpertSelection::All => has,
        ExpertSelection::PassRate {
            low,
            high,
            threshold,
        } => input
            .prompts
            .iter()
            .map(|p| {
                let r = p.rewards.as_ref().unwrap();
                let rate = r.iter().filter(|&&x| x > threshold).count() as f64 / r.len() as f64;
                p.expert_len.is_some() && low <= rate && rate <= high
            })
            .zip(&dropped)
            .map(|(s, &d)| s && !d)
            .collect(),
        ExpertSelection::RandomFraction { fraction, .. } => {
            // The set is random; its size and eligibility are not.
            let chosen: Vec<bool> = (0..has.len())
                .map(|g| plan.expert_prompts.contains(&(g as u32)))
                .collect();
            let e = has.iter().filter(|&&h| h).count();
            assert_eq!(
                chosen.iter().filter(|&&c| c).count(),
                (fraction * e as f64).round() as usize
            );
            assert!(chosen.iter().zip(&has).all(|(&c, &h)| !c || h));
            chosen
        }
    }
}

fn ids(pass: &PassPlan, r: usize) -> Vec<i64> {
    let mut v: Vec<i64> = pass.seqs().map(|s| s.id(r)).collect();
    v.sort_unstable();
    v
}

/// Checks one pass's structural invariants: rank count, equal micro-batch counts, budgets,
/// oversize reporting, empty micro-batches only on short ranks, rank balance.
fn check_pass(pass: &PassPlan, ranks: usize, budget: u64, coef: f64, what: &str) {
    assert_eq!(pass.ranks.len(), ranks, "{what}: rank count");
    let m = pass.microbatches_per_rank();
    let mut oversize = BTreeSet::new();
    for (r, mbs) in pass.ranks.iter().enumerate() {
        // Only the micro-batches holding sequences are stored; the rest of the common count
        // `m` run empty.
        assert!(mbs.len() <= m, "{what}: rank {r} micro-batch count");
        let n_seqs: usize = mbs.iter().map(|mb| mb.seqs.len()).sum();
        assert!(
            mbs.len() == m || n_seqs < m,
            "{what}: rank {r} runs {} empty micro-batches with {n_seqs} >= {m} sequences",
            m - mbs.len()
        );
        for mb in mbs {
            if mb.tokens() > budget {
                assert_eq!(
                    mb.seqs.len(),
                    1,
                    "{what}: over budget with several sequences"
                );
            }
            assert!(
                !mb.seqs.is_empty(),
                "{what}: an empty micro-batch is stored"
            );
            for s in &mb.seqs {
                if s.tokens as u64 > budget {
                    oversize.insert((s.kind, s.index));
                }
            }
        }
    }
    let reported: BTreeSet<_> = pass.oversize.iter().map(|s| (s.kind, s.index)).collect();
    assert_eq!(reported, oversize, "{what}: oversize list");
    // Largest differencing and LPT both keep the rank spread within the heaviest sequence.
    let w = |t: u64| t as f64 + coef * (t as f64) * (t as f64);
    let loads: Vec<f64> = pass
        .ranks
        .iter()
        .map(|mbs| {
            mbs.iter()
                .flat_map(|mb| &mb.seqs)
                .map(|s| w(s.tokens as u64))
                .sum()
        })
        .collect();
    let heaviest = pass.seqs().map(|s| w(s.tokens as u64)).fold(0.0, f64::max);
    let spread = loads.iter().cloned().fold(f64::MIN, f64::max)
        - loads.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        spread <= heaviest * (1.0 + 1e-12) + 1e-9,
        "{what}: spread {spread} > heaviest {heaviest}"
    );
}

fn check_plan(input: &StepInput, cfg: &SchedulerConfig, plan: &Plan) {
    let selected = expected_selection(input, cfg, plan);
    let dropped = expected_dropped(input, cfg);
    let want_dropped: Vec<u32> = (0..dropped.len() as u32)
        .filter(|&g| dropped[g as usize])
        .collect();
    assert_eq!(plan.dropped_prompts, want_dropped, "dropped prompts");
    // Rollout ids of the groups kept.
    let dropped_ref = &dropped;
    let kept: Vec<i64> = input
        .prompts
        .iter()
        .enumerate()
        .flat_map(|(g, p)| {
            let first = plan.rollout_offsets[g] as i64;
            (0..p.rollout_lens.len() as i64)
                .map(move |j| first + j)
                .filter(move |_| !dropped_ref[g])
        })
        .collect();
    let want_prompts: Vec<u32> = (0..selected.len())
        .filter(|&g| selected[g])
        .map(|g| g as u32)
        .collect();
    assert_eq!(plan.expert_prompts, want_prompts, "expert slots");
    let r = input
        .prompts
        .iter()
        .map(|p| p.rollout_lens.len())
        .sum::<usize>();
    assert_eq!(plan.num_rollouts(), r);
    let slot_of = |g: usize| plan.expert_prompts.iter().position(|&p| p as usize == g);

    // Gather map and expert offsets from the definition.
    let mut rid = 0;
    let mut off = vec![0i64];
    for (g, p) in input.prompts.iter().enumerate() {
        for _ in &p.rollout_lens {
            assert_eq!(plan.gather[rid], slot_of(g).map_or(-1, |s| s as i64));
            rid += 1;
        }
        if selected[g] {
            off.push(off.last().unwrap() + p.expert_len.unwrap() as i64);
        }
    }
    assert_eq!(plan.expert_offsets, off);

    // No-grad pass: every kept rollout once, every selected expert once.
    let mut all = kept.clone();
    all.extend(r as i64..(r + want_prompts.len()) as i64);
    assert_eq!(ids(&plan.nograd, r), all, "no-grad pass ids");
    for s in plan.nograd.seqs() {
        let p = &input.prompts[s.prompt as usize];
        let len = match s.kind {
            SeqKind::Rollout => {
                p.rollout_lens[s.index as usize - plan.rollout_offsets[s.prompt as usize]]
            }
            SeqKind::Expert => p.expert_len.unwrap(),
        };
        assert_eq!((s.response_len, s.tokens), (len, p.prompt_len + len));
    }
    check_pass(
        &plan.nograd,
        cfg.dp_ranks,
        cfg.nograd_token_budget,
        cfg.quadratic_coef,
        "no-grad",
    );

    // Training pass: mini-batches tile the prompts in order; rollouts once; experts per kind.
    let trains_experts = matches!(cfg.loss_kind, LossKind::Luffy | LossKind::Rlplus);
    let mut next_prompt = 0;
    let mut train_rollouts = Vec::new();
    for (b, mb) in plan.minibatches.iter().enumerate() {
        assert_eq!(mb.first_prompt, next_prompt);
        assert!(mb.num_prompts >= 1 && mb.num_prompts <= cfg.minibatch_prompts);
        let prompts = mb.first_prompt..mb.first_prompt + mb.num_prompts;
        next_prompt = prompts.end;
        let mut want = Vec::new();
        let (mut tokens, mut rows) = (0u64, 0u64);
        for g in prompts.clone().filter(|&g| !dropped[g]) {
            let p = &input.prompts[g];
            for (j, &len) in p.rollout_lens.iter().enumerate() {
                want.push((plan.rollout_offsets[g] + j) as i64);
                tokens += len as u64;
                rows += 1;
            }
            if trains_experts && selected[g] {
                want.push((r + slot_of(g).unwrap()) as i64);
                tokens += p.expert_len.unwrap() as u64;
                rows += 1;
            }
        }
        want.sort_unstable();
        let got = ids(&mb.pass, r);
        assert_eq!(got, want, "mini-batch {b} ids");
        train_rollouts.extend(got.iter().copied().filter(|&i| (i as usize) < r));
        assert_eq!(
            mb.normalizers,
            CalibrlNormalizers {
                token_count: tokens as f64,
                seq_count: rows as f64,
                all_token_count: tokens as f64,
                all_seq_count: rows as f64,
            },
            "mini-batch {b} normalisers"
        );
        check_pass(
            &mb.pass,
            cfg.dp_ranks,
            cfg.train_token_budget,
            cfg.quadratic_coef,
            "train",
        );
    }
    assert_eq!(next_prompt, input.prompts.len());
    train_rollouts.sort_unstable();
    assert_eq!(train_rollouts, kept, "training pass rollouts");
}

#[test]
fn random_inputs_of_many_sizes_satisfy_every_invariant() {
    let mut rng = Rng(42);
    let mut checked = 0;
    let mut saw_oversize = false;
    let mut saw_empty = false;
    for n_prompts in (1..40).chain([57, 120, 480]) {
        for _ in 0..3 {
            let input = random_input(&mut rng, n_prompts);
            let cfg = random_config(&mut rng, n_prompts);
            let plan = scheduler::plan(&input, &cfg).unwrap();
            check_plan(&input, &cfg, &plan);
            saw_oversize |= !plan.oversize(PassKind::NoGrad).is_empty()
                || !plan.oversize(PassKind::Train).is_empty();
            saw_empty |= plan
                .nograd
                .ranks
                .iter()
                .any(|mbs| mbs.len() < plan.nograd.microbatches_per_rank());
            checked += 1;
        }
    }
    assert_eq!(checked, 42 * 3);
    assert!(
        saw_oversize && saw_empty,
        "the random cases must exercise oversize and empty micro-batches"
    );
}

#[test]
fn calibrl_training_pass_never_holds_experts_luffy_holds_each_once() {
    let mut rng = Rng(7);
    let input = random_input(&mut rng, 64);
    let mut cfg = SchedulerConfig::new(4, 20000, 12000, 16);
    let calib = scheduler::plan(&input, &cfg).unwrap();
    assert!(calib.num_expert_slots() > 0);
    for mb in &calib.minibatches {
        assert!(mb.pass.seqs().all(|s| s.kind == SeqKind::Rollout));
    }
    cfg.loss_kind = LossKind::Luffy;
    let luffy = scheduler::plan(&input, &cfg).unwrap();
    let experts: Vec<u32> = luffy
        .minibatches
        .iter()
        .flat_map(|mb| {
            mb.pass
                .seqs()
                .filter(|s| s.kind == SeqKind::Expert)
                .map(|s| s.index)
        })
        .collect();
    assert_eq!(experts.len(), luffy.num_expert_slots());
    assert_eq!(experts.iter().collect::<BTreeSet<_>>().len(), experts.len());
    cfg.loss_kind = LossKind::Grpo;
    assert_eq!(scheduler::plan(&input, &cfg).unwrap().num_expert_slots(), 0);
}

#[test]
fn large_input_uses_the_greedy_path_and_stays_balanced() {
    // 2000 prompts × 11 sequences on 64 ranks: n·k above the Karmarkar–Karp limit.
    let mut rng = Rng(99);
    let input = StepInput {
        prompts: (0..2000)
            .map(|_| PromptInput {
                prompt_len: rng.range(50, 500) as u32,
                rollout_lens: (0..10).map(|_| rng.long_tail(4096)).collect(),
                expert_len: Some(rng.long_tail(4096)),
                rewards: None,
            })
            .collect(),
    };
    let cfg = SchedulerConfig::new(64, 32768, 16384, 500);
    let plan = scheduler::plan(&input, &cfg).unwrap();
    check_plan(&input, &cfg, &plan);
    let loads = plan.nograd.rank_tokens();
    let mean = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
    let max = *loads.iter().max().unwrap() as f64;
    assert!(max / mean < 1.02, "max/mean {}", max / mean);
}

#[test]
fn deterministic_and_seed_dependent() {
    let mut rng = Rng(5);
    let input = random_input(&mut rng, 80);
    let cfg = |seed| SchedulerConfig {
        expert_selection: ExpertSelection::RandomFraction {
            fraction: 0.5,
            seed,
        },
        ..SchedulerConfig::new(3, 9000, 7000, 20)
    };
    let a = scheduler::plan(&input, &cfg(1)).unwrap();
    assert_eq!(a, scheduler::plan(&input, &cfg(1)).unwrap());
    let b = scheduler::plan(&input, &cfg(2)).unwrap();
    assert_eq!(a.num_expert_slots(), b.num_expert_slots());
    assert_ne!(a.expert_prompts, b.expert_prompts);
    check_plan(&input, &cfg(1), &a);
    check_plan(&input, &cfg(2), &b);
}

#[test]
fn pass_rate_window_selects_by_share_of_passing_rollouts() {
    let prompt = |rewards: &[f64], expert: Option<u32>| PromptInput {
        prompt_len: 10,
        rollout_lens: vec![5; rewards.len()],
        expert_len: expert,
        rewards: Some(rewards.to_vec()),
    };
    let input = StepInput {
        prompts: vec![
            prompt(&[0.0, 0.0, 0.0, 0.0], Some(7)), // rate 0
            prompt(&[1.0, 0.0, 0.0, 0.0], Some(7)), // rate 0.25
            prompt(&[1.0, 1.0, 0.0, 0.0], Some(7)), // rate 0.5
            prompt(&[1.0, 1.0, 1.0, 1.0], Some(7)), // rate 1
            prompt(&[0.0, 0.0], None),              // rate 0, no expert
            prompt(&[0.1, 0.1], Some(7)),           // 0.1 is not > 0.1: rate 0
        ],
    };
    let sel = |low, high| {
        let cfg = SchedulerConfig {
            expert_selection: ExpertSelection::PassRate {
                low,
                high,
                threshold: 0.1,
            },
            ..SchedulerConfig::new(2, 100, 100, 6)
        };
        scheduler::plan(&input, &cfg).unwrap().expert_prompts
    };
    assert_eq!(sel(0.0, 0.0), vec![0, 5]);
    assert_eq!(sel(0.0, 0.3), vec![0, 1, 5]);
    assert_eq!(sel(0.25, 0.5), vec![1, 2]);
    assert_eq!(sel(0.6, 1.0), vec![3]);
    assert_eq!(sel(0.0, 1.0), vec![0, 1, 2, 3, 5]);
}

#[test]
fn oversize_sequences_get_their_own_micro_batch() {
    let input = StepInput {
        prompts: vec![PromptInput {
            prompt_len: 100,
            rollout_lens: vec![50, 5000, 60, 70],
            expert_len: Some(9000),
            rewards: None,
        }],
    };
    let cfg = SchedulerConfig::new(2, 1000, 1000, 1);
    let plan = scheduler::plan(&input, &cfg).unwrap();
    let nograd: Vec<i64> = plan
        .oversize(PassKind::NoGrad)
        .iter()
        .map(|s| s.id(4))
        .collect();
    assert_eq!(nograd, vec![1, 4]);
    let train: Vec<i64> = plan
        .oversize(PassKind::Train)
        .iter()
        .map(|s| s.id(4))
        .collect();
    assert_eq!(train, vec![1]);
    check_plan(&input, &cfg, &plan);
}

fn expect_err(input: &StepInput, cfg: &SchedulerConfig, status: CalibrlStatus, needle: &str) {
    let e = scheduler::plan(input, cfg).unwrap_err();
    assert_eq!(e.status, status, "{needle}: {}", e.message);
    assert!(
        e.message.contains(needle),
        "expected {needle:?} in {:?}",
        e.message
    );
}

/// A change to the configuration or to the first prompt, the status it must give and a text
/// the message must contain.
type Case<T> = (fn(&mut T), CalibrlStatus, &'static str);

#[test]
fn bad_input_gets_errors_that_name_the_argument() {
    let good = StepInput {
        prompts: vec![PromptInput {
            prompt_len: 10,
            rollout_lens: vec![5, 6],
            expert_len: Some(3),
            rewards: None,
        }],
    };
    let cfg = SchedulerConfig::new(2, 100, 100, 1);
    assert!(scheduler::plan(&good, &cfg).is_ok());
    use CalibrlStatus::{InvalidArgument as Inv, NonFinite, ShapeMismatch};
    let config_cases: [Case<SchedulerConfig>; 8] = [
        (|c| c.dp_ranks = 0, Inv, "`config.dp_ranks`"),
        (
            |c| c.nograd_token_budget = 0,
            Inv,
            "`config.nograd_token_budget`",
        ),
        (
            |c| c.train_token_budget = 0,
            Inv,
            "`config.train_token_budget`",
        ),
        (
            |c| c.minibatch_prompts = 0,
            Inv,
            "`config.minibatch_prompts`",
        ),
        (
            |c| c.quadratic_coef = f64::NAN,
            Inv,
            "`config.quadratic_coef`",
        ),
        (
            |c| {
                c.expert_selection = ExpertSelection::RandomFraction {
                    fraction: 1.5,
                    seed: 0,
                }
            },
            Inv,
            "`config.expert_selection.fraction`",
        ),
        (
            |c| {
                c.expert_selection = ExpertSelection::PassRate {
                    low: 0.6,
                    high: 0.4,
                    threshold: 0.1,
                }
            },
            Inv,
            "`config.expert_selection`",
        ),
        // Pass-rate selection needs the prompts' rewards.
        (
            |c| {
                c.expert_selection = ExpertSelection::PassRate {
                    low: 0.0,
                    high: 1.0,
                    threshold: 0.1,
                }
            },
            Inv,
            "`prompts[0].rewards`",
        ),
    ];
    for (change, status, needle) in config_cases {
        let mut c = cfg.clone();
        change(&mut c);
        expect_err(&good, &c, status, needle);
    }
    expect_err(&StepInput::default(), &cfg, Inv, "`prompts`");

    let prompt_cases: [Case<PromptInput>; 6] = [
        (|p| p.rollout_lens.clear(), Inv, "`prompts[0].rollout_lens`"),
        (
            |p| p.rollout_lens[1] = 0,
            Inv,
            "`prompts[0].rollout_lens[1]`",
        ),
        (|p| p.prompt_len = u32::MAX, Inv, "overflows"),
        (
            |p| p.expert_len = Some(u32::MAX),
            Inv,
            "`prompts[0].expert_len`",
        ),
        (
            |p| p.rewards = Some(vec![1.0]),
            ShapeMismatch,
            "`prompts[0].rewards`",
        ),
        (
            |p| p.rewards = Some(vec![1.0, f64::NAN]),
            NonFinite,
            "`prompts[0].rewards`",
        ),
    ];
    for (change, status, needle) in prompt_cases {
        let mut input = good.clone();
        change(&mut input.prompts[0]);
        expect_err(&input, &cfg, status, needle);
    }
}

// ---------------------------------------------------------------------------------------------
// The expert helper.

/// A distinct log-prob for token `t` of sequence `id`.
fn fake_logprob(id: i64, t: usize) -> f64 {
    -((id as f64) * 0.001 + (t as f64) * 1e-7 + 0.5)
}

/// The packed no-grad output of one rank (or all ranks) in plan order.
fn nograd_output(plan: &Plan, rank: Option<usize>) -> Vec<f64> {
    let ranks: Vec<usize> = rank.map_or((0..plan.nograd.ranks.len()).collect(), |r| vec![r]);
    let mut out = Vec::new();
    for r in ranks {
        for mb in &plan.nograd.ranks[r] {
            for s in &mb.seqs {
                let id = s.id(plan.num_rollouts());
                out.extend((0..s.response_len as usize).map(|t| fake_logprob(id, t)));
            }
        }
    }
    out
}

#[test]
fn expert_helper_recovers_each_slot_from_any_rank_split() {
    let mut rng = Rng(11);
    let input = random_input(&mut rng, 30);
    let cfg = SchedulerConfig::new(3, 8000, 8000, 10);
    let plan = scheduler::plan(&input, &cfg).unwrap();
    let r = plan.num_rollouts();
    // Expected from the definition: slot s holds fake_logprob(R + s, t) for t < n*_s.
    let mut want = Vec::new();
    for (s, &len) in plan.expert_lens.iter().enumerate() {
        want.extend((0..len as usize).map(|t| fake_logprob((r + s) as i64, t)));
    }
    let whole = scatter_expert_logprobs(&plan, None, &nograd_output(&plan, None)).unwrap();
    assert_eq!(whole, want);
    // Per rank parts add up (the all-reduce a trainer does).
    let mut summed = vec![0.0; want.len()];
    for rank in 0..3 {
        let part =
            scatter_expert_logprobs(&plan, Some(rank), &nograd_output(&plan, Some(rank))).unwrap();
        for (a, b) in summed.iter_mut().zip(part) {
            *a += b;
        }
    }
    assert_eq!(summed, want);
    let sums = expert_sums(&plan, &whole, false).unwrap();
    let normed = expert_sums(&plan, &whole, true).unwrap();
    for s in 0..plan.num_expert_slots() {
        let seg = &want[plan.expert_offsets[s] as usize..plan.expert_offsets[s + 1] as usize];
        let e: f64 = seg.iter().sum();
        assert!((sums[s] - e).abs() < 1e-12);
        assert!((normed[s] - e / seg.len() as f64).abs() < 1e-12);
    }
    // Wrong length and NaN name the argument.
    let e = scatter_expert_logprobs(&plan, Some(0), &[0.0]).unwrap_err();
    assert!(e.message.contains("`nograd_logprobs`"));
    let mut bad = nograd_output(&plan, None);
    let (slot0_start, _) = {
        // Position of expert slot 0 in the all-ranks output.
        let mut at = 0;
        let mut pos = None;
        for s in plan.nograd.seqs() {
            if s.kind == SeqKind::Expert && s.index == 0 {
                pos = Some(at);
            }
            at += s.response_len as usize;
        }
        (pos.unwrap(), at)
    };
    bad[slot0_start] = f64::NAN;
    let e = scatter_expert_logprobs(&plan, None, &bad).unwrap_err();
    assert_eq!(e.status, CalibrlStatus::NonFinite);
}

#[test]
fn collect_experts_writes_tensors_and_rejects_bad_shapes() {
    let mut rng = Rng(12);
    let input = random_input(&mut rng, 12);
    let plan = scheduler::plan(&input, &SchedulerConfig::new(2, 9000, 9000, 4)).unwrap();
    let mut src: Vec<f32> = nograd_output(&plan, Some(1))
        .iter()
        .map(|&v| v as f32)
        .collect();
    let t_star = *plan.expert_offsets.last().unwrap() as usize;
    let mut packed = vec![7.0f64; t_star];
    let mut sums = vec![7.0f64; plan.num_expert_slots()];
    let n_src = src.len();
    let hs = HostTensor::f32(&mut src, &[n_src]);
    let hp = HostTensor::f64(&mut packed, &[t_star]);
    let hsum = HostTensor::f64(&mut sums, &[plan.num_expert_slots()]);
    unsafe {
        let s = Tensor::from_raw(hs.as_ptr(), "nograd_logprobs").unwrap();
        let p = Tensor::from_raw(hp.as_ptr(), "expert_logprobs").unwrap();
        let q = Tensor::from_raw(hsum.as_ptr(), "expert_sums").unwrap();
        collect_experts(
            &plan,
            Some(1),
            &s,
            Some(&p),
            Some(&q),
            false,
            std::ptr::null_mut(),
        )
        .unwrap();
        // Wrong rank for this input: shape error, outputs untouched afterwards.
        let before = (packed.clone(), sums.clone());
        let e = collect_experts(
            &plan,
            Some(0),
            &s,
            Some(&p),
            Some(&q),
            false,
            std::ptr::null_mut(),
        )
        .unwrap_err();
        assert_eq!(e.status, CalibrlStatus::ShapeMismatch);
        assert!(e.message.contains("`nograd_logprobs`"), "{}", e.message);
        assert_eq!((packed.clone(), sums.clone()), before);
    }
    let want = scatter_expert_logprobs(
        &plan,
        Some(1),
        &src.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(packed, want);
    assert_eq!(sums, expert_sums(&plan, &want, false).unwrap());
}

// ---------------------------------------------------------------------------------------------
// The C ABI.

fn last_error() -> String {
    unsafe { CStr::from_ptr(calibrl_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// Flattens a step into the C arrays.
fn to_c(input: &StepInput) -> (Vec<CalibrlPromptDesc>, Vec<u32>, Vec<f64>) {
    let descs = input
        .prompts
        .iter()
        .map(|p| CalibrlPromptDesc {
            prompt_len: p.prompt_len,
            num_rollouts: p.rollout_lens.len() as u32,
            expert_len: p.expert_len.map_or(-1, |l| l as i64),
        })
        .collect();
    let lens = input
        .prompts
        .iter()
        .flat_map(|p| p.rollout_lens.iter().copied())
        .collect();
    let rewards = input
        .prompts
        .iter()
        .flat_map(|p| p.rewards.clone().unwrap_or(vec![0.0; p.rollout_lens.len()]))
        .collect();
    (descs, lens, rewards)
}

fn c_config(cfg: &SchedulerConfig) -> CalibrlSchedulerConfig {
    let mut c = std::mem::MaybeUninit::uninit();
    assert_eq!(
        unsafe { calibrl_scheduler_config_default(c.as_mut_ptr()) },
        CalibrlStatus::Ok
    );
    let mut c = unsafe { c.assume_init() };
    c.dp_ranks = cfg.dp_ranks as u32;
    c.minibatch_prompts = cfg.minibatch_prompts as u32;
    c.nograd_token_budget = cfg.nograd_token_budget;
    c.train_token_budget = cfg.train_token_budget;
    c.quadratic_coef = cfg.quadratic_coef;
    c.dynamic_sampling = cfg.dynamic_sampling as u32;
    c.loss_kind = match cfg.loss_kind {
        LossKind::Calibrl => CALIBRL_LOSS_CALIBRL,
        LossKind::Grpo => CALIBRL_LOSS_GRPO,
        LossKind::Luffy => CALIBRL_LOSS_LUFFY,
        LossKind::Rlplus => CALIBRL_LOSS_RLPLUS,
    };
    match cfg.expert_selection {
        ExpertSelection::All => c.expert_selection = CALIBRL_SELECT_ALL,
        ExpertSelection::RandomFraction { fraction, seed } => {
            c.expert_selection = CALIBRL_SELECT_RANDOM_FRACTION;
            c.fraction = fraction;
            c.seed = seed;
        }
        ExpertSelection::PassRate {
            low,
            high,
            threshold,
        } => {
            c.expert_selection = CALIBRL_SELECT_PASS_RATE;
            c.pass_rate_low = low;
            c.pass_rate_high = high;
            c.reward_threshold = threshold;
        }
    }
    c
}

unsafe fn c_plan(
    cfg: &CalibrlSchedulerConfig,
    input: &StepInput,
) -> (CalibrlStatus, *mut CalibrlPlan) {
    let (descs, lens, rewards) = to_c(input);
    let mut plan = std::ptr::null_mut();
    let st = calibrl_plan_new(
        cfg,
        descs.as_ptr(),
        descs.len(),
        lens.as_ptr(),
        lens.len(),
        rewards.as_ptr(),
        &mut plan,
    );
    (st, plan)
}

/// Reads a micro-batch through the ABI: size query, then fill.
unsafe fn read_mb(
    f: &dyn Fn(*mut i64, *mut u8, usize, *mut usize) -> CalibrlStatus,
) -> Vec<(i64, u8)> {
    let mut n = usize::MAX;
    assert_eq!(
        f(std::ptr::null_mut(), std::ptr::null_mut(), 0, &mut n),
        CalibrlStatus::Ok
    );
    let mut ids = vec![-7i64; n];
    let mut kinds = vec![9u8; n];
    let mut got = 0;
    assert_eq!(
        f(ids.as_mut_ptr(), kinds.as_mut_ptr(), n, &mut got),
        CalibrlStatus::Ok
    );
    assert_eq!(got, n);
    ids.into_iter().zip(kinds).collect()
}

#[test]
fn c_abi_reads_back_the_same_plan() {
    let mut rng = Rng(2024);
    for n_prompts in [1, 5, 33, 100] {
        let input = random_input(&mut rng, n_prompts);
        let cfg = random_config(&mut rng, n_prompts);
        let want = scheduler::plan(&input, &cfg).unwrap();
        unsafe {
            let (st, plan) = c_plan(&c_config(&cfg), &input);
            assert_eq!(st, CalibrlStatus::Ok, "{}", last_error());
            let mut sum = CalibrlPlanInfo::default();
            assert_eq!(calibrl_plan_summary(plan, &mut sum), CalibrlStatus::Ok);
            assert_eq!(sum.num_rollouts as usize, want.num_rollouts());
            assert_eq!(sum.num_expert_slots as usize, want.num_expert_slots());
            assert_eq!(
                sum.nograd_microbatches as usize,
                want.nograd.microbatches_per_rank()
            );
            assert_eq!(sum.num_minibatches as usize, want.minibatches.len());
            assert_eq!(sum.nograd_oversize as usize, want.nograd.oversize.len());
            assert_eq!(sum.dropped_prompts as usize, want.dropped_prompts.len());
            let mut dropped = vec![-1i64; want.dropped_prompts.len()];
            let mut nd = usize::MAX;
            assert_eq!(
                calibrl_plan_dropped_prompts(plan, dropped.as_mut_ptr(), dropped.len(), &mut nd),
                CalibrlStatus::Ok
            );
            assert_eq!(nd, dropped.len());
            let want_dropped: Vec<i64> = want.dropped_prompts.iter().map(|&g| g as i64).collect();
            assert_eq!(dropped, want_dropped);
            let r = want.num_rollouts();
            let as_pairs = |seqs: &[scheduler::SeqRef]| -> Vec<(i64, u8)> {
                seqs.iter().map(|s| (s.id(r), s.kind as u8)).collect()
            };
            for rank in 0..cfg.dp_ranks {
                for mb in 0..sum.nograd_microbatches as usize {
                    let got = read_mb(&|i, k, c, l| {
                        calibrl_plan_nograd_microbatch(plan, rank, mb, i, k, c, l)
                    });
                    assert_eq!(got, as_pairs(want.nograd.microbatch(rank, mb)));
                }
            }
            for (b, mbw) in want.minibatches.iter().enumerate() {
                let mut info = CalibrlMinibatchInfo::default();
                assert_eq!(
                    calibrl_plan_minibatch(plan, b, &mut info),
                    CalibrlStatus::Ok
                );
                assert_eq!(
                    (info.first_prompt as usize, info.num_prompts as usize),
                    (mbw.first_prompt, mbw.num_prompts)
                );
                let mut norm = CalibrlNormalizers::default();
                assert_eq!(
                    calibrl_plan_normalizers(plan, b, &mut norm),
                    CalibrlStatus::Ok
                );
                assert_eq!(norm, mbw.normalizers);
                assert_eq!(info.normalizers, mbw.normalizers);
                for rank in 0..cfg.dp_ranks {
                    for mb in 0..info.microbatches as usize {
                        let got = read_mb(&|i, k, c, l| {
                            calibrl_plan_train_microbatch(plan, b, rank, mb, i, k, c, l)
                        });
                        assert_eq!(got, as_pairs(mbw.pass.microbatch(rank, mb)));
                    }
                }
            }
            let mut gather = vec![0i64; r];
            let mut n = 0;
            assert_eq!(
                calibrl_plan_gather_map(plan, gather.as_mut_ptr(), r, &mut n),
                CalibrlStatus::Ok
            );
            assert_eq!((n, gather), (r, want.gather.clone()));
            let mut offs = vec![0i64; want.num_expert_slots() + 1];
            assert_eq!(
                calibrl_plan_expert_offsets(plan, offs.as_mut_ptr(), offs.len(), &mut n),
                CalibrlStatus::Ok
            );
            assert_eq!(offs, want.expert_offsets);
            let mut eps = vec![0i64; want.num_expert_slots()];
            assert_eq!(
                calibrl_plan_expert_prompts(plan, eps.as_mut_ptr(), eps.len(), &mut n),
                CalibrlStatus::Ok
            );
            assert_eq!(
                eps,
                want.expert_prompts
                    .iter()
                    .map(|&g| g as i64)
                    .collect::<Vec<_>>()
            );
            for id in 0..want.num_seqs() as i64 {
                let mut info = CalibrlSeqInfo::default();
                assert_eq!(calibrl_plan_seq(plan, id, &mut info), CalibrlStatus::Ok);
                let s = want.seq(id).unwrap();
                assert_eq!(
                    (info.kind, info.index, info.tokens),
                    (s.kind as u32, s.index, s.tokens)
                );
            }
            for (pass, which) in [
                (CALIBRL_PASS_NOGRAD, PassKind::NoGrad),
                (CALIBRL_PASS_TRAIN, PassKind::Train),
            ] {
                let mut n = 0;
                assert_eq!(
                    calibrl_plan_oversize(plan, pass, std::ptr::null_mut(), 0, &mut n),
                    CalibrlStatus::Ok
                );
                let mut v = vec![0i64; n];
                assert_eq!(
                    calibrl_plan_oversize(plan, pass, v.as_mut_ptr(), n, &mut n),
                    CalibrlStatus::Ok
                );
                assert_eq!(
                    v,
                    want.oversize(which)
                        .iter()
                        .map(|s| s.id(r))
                        .collect::<Vec<_>>()
                );
            }
            calibrl_plan_free(plan);
        }
    }
}

#[test]
fn c_abi_rejects_bad_input_with_named_arguments() {
    let input = StepInput {
        prompts: vec![
            PromptInput {
                prompt_len: 10,
                rollout_lens: vec![5, 6],
                expert_len: Some(4),
                rewards: None,
            },
            PromptInput {
                prompt_len: 3,
                rollout_lens: vec![7],
                expert_len: None,
                rewards: None,
            },
        ],
    };
    let base = c_config(&SchedulerConfig::new(2, 100, 100, 1));
    let (descs, lens, _) = to_c(&input);
    unsafe {
        let check = |cfg: &CalibrlSchedulerConfig,
                     descs: &[CalibrlPromptDesc],
                     lens: &[u32],
                     n_rollouts: usize,
                     status: CalibrlStatus,
                     needle: &str| {
            let mut plan = std::ptr::null_mut();
            let st = calibrl_plan_new(
                cfg,
                descs.as_ptr(),
                descs.len(),
                lens.as_ptr(),
                n_rollouts,
                std::ptr::null(),
                &mut plan,
            );
            assert_eq!(st, status, "{needle}: {}", last_error());
            assert!(plan.is_null(), "{needle}: output written on failure");
            assert!(
                last_error().contains(needle),
                "expected {needle:?} in {:?}",
                last_error()
            );
        };
        let cfg_with = |f: &dyn Fn(&mut CalibrlSchedulerConfig)| {
            let mut c = base;
            f(&mut c);
            c
        };
        let inv = CalibrlStatus::InvalidArgument;
        check(
            &cfg_with(&|c| c.dp_ranks = 0),
            &descs,
            &lens,
            3,
            inv,
            "`config.dp_ranks`",
        );
        check(
            &cfg_with(&|c| c.nograd_token_budget = 0),
            &descs,
            &lens,
            3,
            inv,
            "`config.nograd_token_budget`",
        );
        check(
            &cfg_with(&|c| c.train_token_budget = 0),
            &descs,
            &lens,
            3,
            inv,
            "`config.train_token_budget`",
        );
        check(
            &cfg_with(&|c| c.loss_kind = 9),
            &descs,
            &lens,
            3,
            inv,
            "`config.loss_kind`",
        );
        check(
            &cfg_with(&|c| c.expert_selection = 9),
            &descs,
            &lens,
            3,
            inv,
            "`config.expert_selection`",
        );
        check(
            &cfg_with(&|c| c.expert_selection = CALIBRL_SELECT_PASS_RATE),
            &descs,
            &lens,
            3,
            inv,
            "`prompts[0].rewards`",
        );
        check(
            &base,
            &descs,
            &lens,
            2,
            CalibrlStatus::ShapeMismatch,
            "`n_rollouts`",
        );
        check(
            &base,
            &descs[..1],
            &lens,
            3,
            CalibrlStatus::ShapeMismatch,
            "`n_rollouts`",
        );
        check(&base, &[], &[], 0, inv, "`prompts`");
        let mut d = descs.clone();
        d[1].num_rollouts = 0;
        check(&base, &d, &lens[..2], 2, inv, "`prompts[1].num_rollouts`");
        let mut d = descs.clone();
        d[0].expert_len = -2;
        check(&base, &d, &lens, 3, inv, "`prompts[0].expert_len`");
        let mut d = descs.clone();
        d[1].prompt_len = u32::MAX - 3;
        check(&base, &d, &lens, 3, inv, "`rollout_lens[2]`");
        let mut l = lens.clone();
        l[1] = 0;
        check(&base, &descs, &l, 3, inv, "`rollout_lens[1]`");

        // NULL pointers.
        let mut plan = std::ptr::null_mut();
        assert_eq!(
            calibrl_plan_new(
                std::ptr::null(),
                descs.as_ptr(),
                2,
                lens.as_ptr(),
                3,
                std::ptr::null(),
                &mut plan
            ),
            CalibrlStatus::NullArgument
        );
        assert!(last_error().contains("`config`"));
        assert_eq!(
            calibrl_plan_new(
                &base,
                std::ptr::null(),
                2,
                lens.as_ptr(),
                3,
                std::ptr::null(),
                &mut plan
            ),
            CalibrlStatus::NullArgument
        );
        assert!(last_error().contains("`prompts`"));
        assert_eq!(
            calibrl_plan_new(
                &base,
                descs.as_ptr(),
                2,
                std::ptr::null(),
                3,
                std::ptr::null(),
                &mut plan
            ),
            CalibrlStatus::NullArgument
        );
        assert!(last_error().contains("`rollout_lens`"));
        assert_eq!(
            calibrl_plan_new(
                &base,
                descs.as_ptr(),
                2,
                lens.as_ptr(),
                3,
                std::ptr::null(),
                std::ptr::null_mut()
            ),
            CalibrlStatus::NullArgument
        );
        assert!(last_error().contains("`out`"));

        // Queries: out-of-range indices, small buffers, NULL handle.
        let (st, plan) = c_plan(&base, &input);
        assert_eq!(st, CalibrlStatus::Ok);
        assert_eq!(last_error(), "");
        let mut n = 0;
        let mut ids = [0i64; 1];
        let (ids_ptr, n_ptr): (*mut i64, *mut usize) = (ids.as_mut_ptr(), &mut n);
        let null = std::ptr::null_mut();
        // (the call, the argument its message must name); each is refused as invalid.
        let bad_queries: [(&dyn Fn() -> CalibrlStatus, &str); 6] = [
            (
                &|| calibrl_plan_nograd_microbatch(plan, 2, 0, ids_ptr, null, 1, n_ptr),
                "`rank`",
            ),
            (
                &|| calibrl_plan_nograd_microbatch(plan, 0, 1000, ids_ptr, null, 1, n_ptr),
                "`mb`",
            ),
            (
                &|| calibrl_plan_train_microbatch(plan, 5, 0, 0, ids_ptr, null, 1, n_ptr),
                "`minibatch`",
            ),
            (
                &|| calibrl_plan_normalizers(plan, 2, &mut CalibrlNormalizers::default()),
                "`minibatch`",
            ),
            (
                &|| calibrl_plan_seq(plan, 4, &mut CalibrlSeqInfo::default()),
                "`seq_id`",
            ),
            (
                &|| calibrl_plan_oversize(plan, 7, std::ptr::null_mut(), 0, n_ptr),
                "`pass`",
            ),
        ];
        for (query, needle) in bad_queries {
            assert_eq!(query(), inv, "{needle}");
            assert!(last_error().contains(needle), "{needle}: {}", last_error());
        }
        let mut gather = [5i64; 2];
        assert_eq!(
            calibrl_plan_gather_map(plan, gather.as_mut_ptr(), 2, &mut n),
            CalibrlStatus::BufferTooSmall
        );
        assert_eq!((n, gather), (3, [5, 5]));
        assert!(last_error().contains("`expert_index`"));
        assert_eq!(
            calibrl_plan_gather_map(plan, gather.as_mut_ptr(), 2, std::ptr::null_mut()),
            CalibrlStatus::NullArgument
        );
        assert_eq!(
            calibrl_plan_summary(std::ptr::null(), &mut CalibrlPlanInfo::default()),
            CalibrlStatus::NullArgument
        );
        assert!(last_error().contains("`plan`"));
        // collect_experts: bad rank, wrong shape.
        let mut src = vec![0.0f64; 3];
        let hs = HostTensor::f64(&mut src, &[3]);
        assert_eq!(
            calibrl_plan_collect_experts(
                plan,
                -3,
                hs.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                false,
                std::ptr::null_mut()
            ),
            inv
        );
        assert!(last_error().contains("`rank`"));
        assert_eq!(
            calibrl_plan_collect_experts(
                plan,
                -1,
                hs.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                false,
                std::ptr::null_mut()
            ),
            CalibrlStatus::ShapeMismatch
        );
        assert!(last_error().contains("`nograd_logprobs`"));
        calibrl_plan_free(plan);
        calibrl_plan_free(std::ptr::null_mut());
    }
}

#[test]
fn c_abi_collect_experts_matches_rust() {
    let mut rng = Rng(77);
    let input = random_input(&mut rng, 20);
    let cfg = SchedulerConfig::new(2, 6000, 6000, 5);
    let plan = scheduler::plan(&input, &cfg).unwrap();
    let mut src = nograd_output(&plan, None);
    let t_star = *plan.expert_offsets.last().unwrap() as usize;
    let mut packed = vec![0.0f64; t_star];
    let mut sums = vec![0.0f32; plan.num_expert_slots()];
    unsafe {
        let (st, handle) = c_plan(&c_config(&cfg), &input);
        assert_eq!(st, CalibrlStatus::Ok);
        let n_src = src.len();
        let hs = HostTensor::f64(&mut src, &[n_src]);
        let mut hp = HostTensor::f64(&mut packed, &[t_star]);
        let mut hq = HostTensor::f32(&mut sums, &[plan.num_expert_slots()]);
        let st = calibrl_plan_collect_experts(
            handle,
            -1,
            hs.as_ptr(),
            hp.as_mut_ptr(),
            hq.as_mut_ptr(),
            true,
            std::ptr::null_mut(),
        );
        assert_eq!(st, CalibrlStatus::Ok, "{}", last_error());
        calibrl_plan_free(handle);
    }
    let want = scatter_expert_logprobs(&plan, None, &nograd_output(&plan, None)).unwrap();
    assert_eq!(packed, want);
    let want_sums = expert_sums(&plan, &want, true).unwrap();
    for (a, b) in sums.iter().zip(want_sums) {
        assert!((*a as f64 - b).abs() < 1e-6);
    }
}

#[test]
fn dynamic_sampling_leaves_out_all_equal_groups_and_reports_them() {
    let lens = |n: usize| vec![100u32; n];
    let prompt = |rewards: Vec<f64>| PromptInput {
        prompt_len: 50,
        rollout_lens: lens(rewards.len()),
        expert_len: Some(80),
        rewards: Some(rewards),
    };
    let input = StepInput {
        prompts: vec![
            prompt(vec![1.0, 1.0, 1.0, 1.0]), // all correct: dropped
            prompt(vec![1.0, 0.0, 1.0, 0.0]),
            prompt(vec![0.0, 0.0, 0.0, 0.0]), // all wrong: dropped
            prompt(vec![0.7]),                // one rollout: A = r (SPEC §3), kept
            prompt(vec![1.2155; 3]),          // all equal: dropped
        ],
    };
    let cfg = SchedulerConfig {
        dynamic_sampling: true,
        ..SchedulerConfig::new(2, 1000, 1000, 2)
    };
    let plan = scheduler::plan(&input, &cfg).unwrap();
    assert_eq!(plan.dropped_prompts, vec![0, 2, 4]);
    assert_eq!(plan.expert_prompts, vec![1, 3]);
    check_plan(&input, &cfg, &plan);
    // Mini-batch 0 (prompts 0, 1) trains prompt 1's four rollouts only.
    assert_eq!(
        plan.minibatches[0].normalizers,
        CalibrlNormalizers {
            token_count: 400.0,
            seq_count: 4.0,
            all_token_count: 400.0,
            all_seq_count: 4.0,
        }
    );
    // Off: nothing is dropped.
    let off = scheduler::plan(&input, &SchedulerConfig::new(2, 1000, 1000, 2)).unwrap();
    assert!(off.dropped_prompts.is_empty());
    assert_eq!(off.num_expert_slots(), 5);
    // Without rewards it is refused, naming the prompt's rewards.
    let mut bare = input.clone();
    bare.prompts[2].rewards = None;
    expect_err(
        &bare,
        &cfg,
        CalibrlStatus::InvalidArgument,
        "`prompts[2].rewards`",
    );
}
